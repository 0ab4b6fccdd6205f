"""The scan2d kernel calls of the torch ops: descriptors built straight from tensors.

``scan2d`` validates its arguments once (``check_scan2d_args``); the calls below hand pointers and
strides to the compiled kernels without validating again, which keeps the host time of an op call
small (the checked array API of ``ssm2d_kernels.scan2d`` repeats every check for callers that
bring their own arrays). Buffer sizes come from the same C++ functions the kernels use.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _kernels():
    from ssm2d_kernels import _C

    return _C


def grid(t: Optional[Tensor], origin: str, order: str, has_state: bool = False):
    """(ptr, sb, sc, sn, si, sj) of a (batch, C[, N], H, W) tensor in the scan's logical frame."""
    if t is None:
        return None
    from ssm2d_kernels.scan2d import grid_descriptor

    return grid_descriptor(t.data_ptr(), t.shape, t.stride(), t.element_size(), origin, order, has_state)


def logical_hw(u: Tensor, order: str) -> tuple[int, int]:
    from ssm2d_kernels.scan2d import logical_hw as hw

    return hw(u.shape[-2], u.shape[-1], order)


def problem(u, delta, A, B, C, D, z, delta_bias, softplus: bool, origin: str, order: str, stream: int) -> dict:
    """The kernel's problem descriptor. A, D, delta_bias must already be float32 (float64 with
    float64 inputs); D and delta_bias contiguous."""
    b, d = u.shape[0], u.shape[1]
    lh, lw = logical_hw(u, order)
    return dict(
        batch=b, dim=d, dstate=A.shape[1], groups=B.shape[1], height=lh, width=lw,
        dtype=_DTYPE_CODES[u.dtype], param_dtype=_DTYPE_CODES[A.dtype], softplus=bool(softplus),
        u=grid(u, origin, order), delta=grid(delta, origin, order), z=grid(z, origin, order),
        B=grid(B, origin, order, True), C=grid(C, origin, order, True), A=A.data_ptr(), A_sd=A.stride(0),
        A_sn=A.stride(1), D=None if D is None else D.data_ptr(),
        delta_bias=None if delta_bias is None else delta_bias.data_ptr(),
        device=u.device.index if u.is_cuda else -1, stream=stream,
    )


def carry_floats(u: Tensor, A: Tensor, order: str) -> int:
    """float32 values the CUDA forward saves for the backward (0 on the CPU)."""
    if not u.is_cuda:
        return 0
    lh, lw = logical_hw(u, order)
    return _kernels().scan2d_carry_floats(u.shape[0], u.shape[1], A.shape[1], lh, lw)


def backward_needs_y(A: Tensor, z: Optional[Tensor]) -> bool:
    """Whether the forward must keep the pre-gate output for the backward (the tiled kernels, which
    run for N >= 8, need it when z is given; the band kernels rebuild it)."""
    return z is not None and bool(_kernels().scan2d_backward_needs_y(A.shape[1]))


def forward_workspace(u: Tensor, A: Tensor, order: str, with_carries: bool = False) -> Optional[Tensor]:
    """float32 scratch of the CUDA forward (band summaries of wide grids, partial sums for N > 16;
    for the tiled kernels, N >= 8, room for carries when none are kept)."""
    if not u.is_cuda or (with_carries and _kernels().scan2d_tiled(A.shape[1])):  # tiled: carries suffice
        return None
    lh, lw = logical_hw(u, order)
    n = _kernels().scan2d_forward_workspace_floats(u.shape[0], u.shape[1], A.shape[1], lh, lw)
    return torch.empty(n, dtype=torch.float32, device=u.device) if n else None


def backward_workspace(u: Tensor, A: Tensor, order: str) -> Optional[Tensor]:
    if not u.is_cuda:
        return None
    lh, lw = logical_hw(u, order)
    n = _kernels().scan2d_backward_workspace_floats(u.shape[0], u.shape[1], A.shape[1], lh, lw)
    return torch.empty(n, dtype=torch.float32, device=u.device)


def _ptr(t: Optional[Tensor]):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def forward(prob: dict, out: Tensor, y: Optional[Tensor], carries: Optional[Tensor], workspace: Optional[Tensor],
            origin: str, order: str) -> None:
    _kernels().scan2d_forward(prob, dict(out=grid(out, origin, order), y=grid(y, origin, order),
                                         carries=_ptr(carries), workspace=_ptr(workspace)))


def backward(prob: dict, origin: str, order: str, *, dout, y, carries, du, ddelta, dz, dB, dC, dA_part, dD_part,
             ddelta_bias_part, deterministic: bool, d_begin: int, d_end: int, workspace) -> None:
    g = lambda t, s=False: grid(t, origin, order, s)  # noqa: E731
    _kernels().scan2d_backward(prob, dict(
        dout=g(dout), y=g(y), carries=_ptr(carries), du=g(du), ddelta=g(ddelta), dz=g(dz), dB=g(dB, True),
        dC=g(dC, True), dA_part=_ptr(dA_part), dD_part=_ptr(dD_part), ddelta_bias_part=_ptr(ddelta_bias_part),
        deterministic=bool(deterministic), d_begin=int(d_begin), d_end=int(d_end), workspace=_ptr(workspace)))
