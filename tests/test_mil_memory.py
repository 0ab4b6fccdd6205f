"""benchmarks/mil_memory.py counts bytes as a hand count of small graphs says it should."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from mil_memory import MemoryCounter  # noqa: E402

MB = 1000 * 1000 * 4  # bytes of a 1000 x 1000 float32 tensor


def test_saved_and_peak_bytes_by_hand():
    x = torch.randn(1000, 1000, requires_grad=True)
    c = MemoryCounter()
    with c:
        c.mark_preexisting([x])
        s = x.sin()            # saves x (pre-existing: free); s: 1 block
        y = (s * 2).exp()      # s * 2: 1 block, dies once exp is done; exp saves its output y
        del s                  # sin's output is saved by nothing: freed
        assert c.current == MB  # y only
        c.phase("backward")
        y.sum().backward()
        assert c.current == 2 * MB                  # y (still referenced here) and x.grad
        del y
    assert c.saved_bytes("forward") == MB           # exp's output
    assert sum(c.free_saved.values()) == MB         # sin's input x
    assert c.peaks["forward"] == 3 * MB             # s, s * 2, y alive together
    assert c.current == MB                          # x.grad; y and the graph's saved tensors are gone


def test_the_cuda_scan_carries_are_added_on_cpu():
    from ssm2d_kernels.scan2d import scan2d_carry_floats
    from ssm2d_nn.ops import scan2d

    u = torch.randn(1, 4, 40, 50, requires_grad=True)
    dt = torch.rand(1, 4, 40, 50)
    A = -torch.rand(4, 16)
    B, C = torch.randn(1, 1, 16, 40, 50), torch.randn(1, 1, 16, 40, 50)
    c = MemoryCounter()
    with c:
        c.mark_preexisting([u, dt, A, B, C])
        out = scan2d(u, dt, A, B, C, backend="kernel")
        carries = 4 * scan2d_carry_floats(1, 4, 16, 40, 50)
        assert c.current == out.untyped_storage().nbytes() + carries
        del out  # without z the carries live as long as the output the backward keeps
