"""Pure-PyTorch reference of wavefront2d (the Mamba2D scan): test oracle and fallback.

Straight from the definition (SCANS.md section 2): cells on one anti-diagonal depend only on the
previous anti-diagonal, so the loop runs over the H + W - 1 anti-diagonals, vectorised over batch,
cells of the diagonal, channels and states; differentiable through ordinary autograd. It
materialises aT, aL, vT, vL and h: ~5 * batch * H * W * E * N values of the accumulation type, plus
autograd's saved tensors. Use it to check, not to train.
"""

from __future__ import annotations

import torch

ORIGINS = ("tl", "tr", "bl", "br")


def flip_origin(t: torch.Tensor, origin: str) -> torch.Tensor:
    """(batch, H, W, ...) physical <-> the frame scanned from the top-left (an involution)."""
    dims = [d for d, on in ((1, origin in ("bl", "br")), (2, origin in ("tr", "br"))) if on]
    return t.flip(dims) if dims else t


def _with_groups(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(3) if t.dim() == 4 else t  # (b, H, W, N) -> (b, H, W, 1, N)


def wavefront2d_reference(u, dT, dL, AT, AL, BT, BL, C, D=None, *, origin: str = "tl") -> torch.Tensor:
    """Same contract as :func:`ssm2d_nn.ops.wavefront2d`; float32 (float64 for float64 u) inside."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    b, H, W, E = u.shape
    uu, t, l = (flip_origin(x, origin).to(acc) for x in (u, dT, dL))
    g = _with_groups(BT).shape[3]
    expand = lambda x: flip_origin(_with_groups(x), origin).to(acc).repeat_interleave(E // g, dim=3)  # noqa: E731
    BTe, BLe, Ce = expand(BT), expand(BL), expand(C)  # (b, H, W, E, N)
    aT = torch.exp(t[..., None] * AT.to(acc))
    aL = torch.exp(l[..., None] * AL.to(acc))
    vT = (t * uu)[..., None] * BTe
    vL = (l * uu)[..., None] * BLe
    y = torch.zeros(b, H, W, E, dtype=acc, device=u.device)
    prev, prev_i0 = None, 0
    for k in range(H + W - 1):
        i0, i1 = max(0, k - W + 1), min(k, H - 1)
        ii = torch.arange(i0, i1 + 1, device=u.device)
        jj = k - ii
        first_row, first_col = ii == 0, (jj == 0) & (ii > 0)
        cL = torch.where(first_row, 1.0, torch.where(first_col, 0.0, 0.5)).to(acc)[:, None, None]
        cT = torch.where(first_row, 0.0, torch.where(first_col, 1.0, 0.5)).to(acc)[:, None, None]
        if prev is None:
            left = top = torch.zeros_like(vL[:, ii, jj])
        else:
            padded = torch.cat([prev, torch.zeros_like(prev[:, :1])], dim=1)  # index len(prev): zero
            n_prev = prev.shape[1]
            li = torch.where(jj >= 1, ii - prev_i0, n_prev).clamp(max=n_prev)  # (i, j-1) on diagonal k-1
            ti = torch.where(ii >= 1, ii - 1 - prev_i0, n_prev).clamp(min=0, max=n_prev)  # (i-1, j)
            left, top = padded[:, li], padded[:, ti]
        h = cL * (aL[:, ii, jj] * left + vL[:, ii, jj]) + cT * (aT[:, ii, jj] * top + vT[:, ii, jj])
        y[:, ii, jj] = (Ce[:, ii, jj] * h).sum(-1)
        prev, prev_i0 = h, i0
    if D is not None:
        y = y + D.to(acc) * uu
    return flip_origin(y, origin).to(u.dtype)
