"""The kernel wheel as the development environment built it, seen next to torch."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import ssm2d_kernels as k


def test_device_count_agrees_with_torch():
    torch_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if k.build_info()["cuda"]:
        assert k.cuda_device_count() == torch_count
    else:
        assert k.cuda_device_count() == 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine: the CPU-only build is expected")
def test_development_build_compiled_cuda_when_nvcc_is_present():
    # tools/dev.py builds with SSM2D_WITH_CUDA=ON whenever nvcc is found, so a kernel that does not
    # compile fails the setup, and a silent CPU-only build fails here.
    if os.environ.get("SSM2D_WITH_CUDA", "ON").upper() == "OFF":
        pytest.skip("SSM2D_WITH_CUDA=OFF was asked for")
    info = k.build_info()
    assert info["cuda"], info
    assert int(info["cuda_runtime_version"].split(".")[0]) >= 12


@pytest.mark.gpu
def test_gpu_is_reported_and_runs_the_wheels_code():
    n = k.cuda_device_count()
    assert n >= 1 and n == torch.cuda.device_count()
    archs = k.build_info()["cuda_architectures"]
    for i in range(n):
        props = k.cuda_device_properties(i)
        assert props["capability"] == torch.cuda.get_device_capability(i)
        assert props["name"] == torch.cuda.get_device_name(i)
        major, minor = props["capability"]
        assert f"sm_{major}{minor}" in archs or any(
            a.startswith("compute_") and int(a[8:].rstrip("a")) <= major * 10 + minor for a in archs
        ), (props, archs)
        before = torch.cuda.current_device()
        r = k.cuda_selftest(i, elements=(1 << 24) + 17)
        assert r["ok"] and r["max_abs_error"] < 1e-4, r
        assert torch.cuda.current_device() == before, "the self-test must restore the current device"
