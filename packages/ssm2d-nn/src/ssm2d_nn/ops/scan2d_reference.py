"""Pure-PyTorch reference of scan2d: the test oracle and the fallback where no kernel runs.

Straight from the definition (SCANS.md section 1), vectorised over batch, channels and states,
looping over columns and then rows; differentiable through ordinary autograd. It materialises the
full state: memory ~ 4 * batch * D * N * H * W values of the accumulation type (float32, or float64
for float64 inputs), plus autograd's saved tensors for every step. Use it to check, not to train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._scan2d_args import to_logical, from_logical


def scan2d_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                     origin: str = "tl", order: str = "hv") -> torch.Tensor:
    """Same contract as :func:`ssm2d_nn.ops.scan2d`; computes in float32 (float64 for float64 u)."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    b, d, _, _ = u.shape
    g, n = B.shape[1], A.shape[1]
    uu = to_logical(u, origin, order).to(acc)
    dt = to_logical(delta, origin, order).to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None, None]
    if delta_softplus:
        dt = F.softplus(dt, beta=1.0, threshold=20.0)
    Bl = to_logical(B, origin, order).to(acc).repeat_interleave(d // g, dim=1)  # (b, d, n, H, W)
    Cl = to_logical(C, origin, order).to(acc).repeat_interleave(d // g, dim=1)
    a = torch.exp(dt[:, :, None] * A.to(acc)[None, :, :, None, None])
    x = (dt * uu)[:, :, None] * Bl
    H, W = uu.shape[-2:]
    carry = x.new_zeros(b, d, n, H)
    cols = []
    for j in range(W):  # rows: G[i, j] = a G[i, j-1] + x
        carry = a[..., j] * carry + x[..., j]
        cols.append(carry)
    G = torch.stack(cols, dim=-1)
    carry = x.new_zeros(b, d, n, W)
    rows = []
    for i in range(H):  # columns: h[i, j] = a h[i-1, j] + G
        carry = a[..., i, :] * carry + G[..., i, :]
        rows.append(carry)
    h = torch.stack(rows, dim=-2)
    y = (Cl * h).sum(dim=2)
    if D is not None:
        y = y + D.to(acc)[:, None, None] * uu
    if z is not None:
        y = y * F.silu(to_logical(z, origin, order).to(acc))
    return from_logical(y, origin, order).to(u.dtype)
