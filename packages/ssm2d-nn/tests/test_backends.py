"""Backend selection: explicit choices honoured, 'kernel' never falls back, 'auto' says what it does."""

from __future__ import annotations

import logging

import pytest
import torch

import ssm2d_nn
from ssm2d_nn import backends


@pytest.fixture(autouse=True)
def _fresh_announcements():
    backends._announced.clear()
    yield
    backends._announced.clear()


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"myop: backend must be one of \('auto', 'kernel', 'reference'\), got 'fast'"):
        ssm2d_nn.resolve_backend("myop", "fast", torch.device("cpu"))


def test_reference_is_always_available():
    assert ssm2d_nn.resolve_backend("myop", "reference", torch.device("cpu")) == "reference"
    assert ssm2d_nn.resolve_backend("myop", "reference", torch.device("meta")) == "reference"


def test_cpu_kernel_is_used_when_installed(caplog):
    with caplog.at_level(logging.INFO, logger="ssm2d_nn"):
        assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("cpu")) == "kernel"
        assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("cpu")) == "kernel"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["myop on cpu: backend='auto' uses the ssm2d-kernels kernel"], "logged once, not per call"


def test_kernel_on_unsupported_device_raises_with_reason():
    with pytest.raises(ssm2d_nn.BackendUnavailableError, match="has no kernels for device type 'xpu'"):
        ssm2d_nn.resolve_backend("myop", "kernel", torch.device("xpu"))


def test_auto_falls_back_loudly(caplog):
    with caplog.at_level(logging.INFO, logger="ssm2d_nn"):
        assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("xpu")) == "reference"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "pure-PyTorch reference (slow)" in record.getMessage() and "xpu" in record.getMessage()


def test_meta_device_runs_the_ops_shape_only(caplog):
    # On "meta" the kernel ops' fake implementations give the output shapes at no cost (the
    # reference would loop over the grid in Python for nothing), so "meta" counts as supported.
    with caplog.at_level(logging.WARNING, logger="ssm2d_nn"):
        assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("meta")) == "kernel"
        assert ssm2d_nn.resolve_backend("myop", "kernel", torch.device("meta")) == "kernel"
    assert not caplog.records
    from ssm2d_nn.ops import scan2d, wavefront2d

    b, d, n, h, w = 2, 3, 4, 5, 6
    meta = dict(device="meta")
    u = torch.empty(b, d, h, w, **meta, requires_grad=True)
    y = scan2d(u, torch.empty(b, d, h, w, **meta), -torch.ones(d, n, **meta), torch.empty(b, 1, n, h, w, **meta),
               torch.empty(b, 1, n, h, w, **meta), backend="auto")
    assert y.shape == (b, d, h, w) and y.device.type == "meta"
    y.sum().backward()
    assert u.grad.shape == u.shape and u.grad.device.type == "meta"
    uw = torch.empty(b, h, w, d, **meta)
    yw = wavefront2d(uw, uw, uw, -torch.ones(d, n, **meta), -torch.ones(d, n, **meta),
                     torch.empty(b, h, w, n, **meta), torch.empty(b, h, w, n, **meta), torch.empty(b, h, w, n, **meta),
                     torch.ones(d, **meta), backend="auto")
    assert yw.shape == (b, h, w, d) and yw.device.type == "meta"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_kernel_without_gpu_raises():
    with pytest.raises(ssm2d_nn.BackendUnavailableError, match=r"cuda:0"):
        ssm2d_nn.resolve_backend("myop", "kernel", torch.device("cuda", 0))


@pytest.mark.gpu
def test_cuda_kernel_with_gpu_is_chosen():
    assert ssm2d_nn.resolve_backend("myop", "kernel", torch.device("cuda", 0)) == "kernel"
    assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("cuda")) == "kernel"


def test_info_report_lists_every_package_and_the_cpu_backend():
    from ssm2d_nn import info

    report = info.collect(selftest=True)
    text = info.format_report(report)
    for name in info.PACKAGES:
        assert name in text
    assert report["backends"]["cpu"] == "kernel"
    assert report["kernels"]["cpu_selftest"]["ok"]
    assert "CPU self-test" in text and "passed" in text and "FAILED" not in text
    assert {"scan2d kernel on cpu", "wavefront2d kernel on cpu"} <= set(report["kernel_checks"])
