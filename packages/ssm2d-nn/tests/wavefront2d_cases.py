"""Random wavefront2d problems shared by the CPU and GPU tests: fresh inputs every run, never zeros."""

from __future__ import annotations

import random

import torch

from scan2d_cases import random_shape, rel_err  # noqa: F401  (re-exported)

ORIGINS = ("tl", "tr", "bl", "br")
NAMES = ("u", "dT", "dL", "AT", "AL", "BT", "BL", "C", "D")


def make_wave_inputs(rng: random.Random, *, batch, height, width, dim, dstate, groups=None, with_D=True,
                     dtype=torch.float64, device="cpu"):
    """groups=None: BT/BL/C of shape (b, H, W, N); else (b, H, W, G, N). Steps in (0.05, 0.6)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    f64 = dict(generator=gen, dtype=torch.float64)
    bn = (batch, height, width, dstate) if groups is None else (batch, height, width, groups, dstate)
    args = dict(
        u=torch.randn(batch, height, width, dim, **f64),
        dT=torch.rand(batch, height, width, dim, **f64) * 0.55 + 0.05,
        dL=torch.rand(batch, height, width, dim, **f64) * 0.55 + 0.05,
        AT=-(torch.rand(dim, dstate, **f64) * 2 + 0.1),
        AL=-(torch.rand(dim, dstate, **f64) * 2 + 0.1),
        BT=torch.randn(*bn, **f64), BL=torch.randn(*bn, **f64), C=torch.randn(*bn, **f64),
        D=torch.randn(dim, **f64) if with_D else None,
    )
    params = ("AT", "AL", "D")
    return {k: None if v is None else v.to(device=device, dtype=torch.float32 if (k in params and dtype != torch.float64)
                                           else dtype) for k, v in args.items()}


def random_wave_config(rng: random.Random, max_hw: int = 64) -> dict:
    h, w = random_shape(rng, max_hw)
    dim = rng.choice([4, 8])
    return dict(batch=rng.randint(1, 2), height=h, width=w, dim=dim, dstate=rng.choice([1, 4, 16]),
                groups=rng.choice([None, 1, 2, dim]), with_D=rng.random() < 0.7)
