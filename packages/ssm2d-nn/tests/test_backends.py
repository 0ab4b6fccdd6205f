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
    with pytest.raises(ssm2d_nn.BackendUnavailableError, match="has no kernels for device type 'meta'"):
        ssm2d_nn.resolve_backend("myop", "kernel", torch.device("meta"))


def test_auto_falls_back_loudly(caplog):
    with caplog.at_level(logging.INFO, logger="ssm2d_nn"):
        assert ssm2d_nn.resolve_backend("myop", "auto", torch.device("meta")) == "reference"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "pure-PyTorch reference (slow)" in record.getMessage() and "meta" in record.getMessage()


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
