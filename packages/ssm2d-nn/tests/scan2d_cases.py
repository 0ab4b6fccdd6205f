"""Random scan2d problems shared by the CPU and GPU tests: fresh inputs every run, never zeros."""

from __future__ import annotations

import random

import torch

ORIGINS = ("tl", "tr", "bl", "br")
ORDERS = ("hv", "vh")


def random_shape(rng: random.Random, max_hw: int = 70) -> tuple[int, int]:
    kind = rng.choice(["row", "col", "odd", "any", "any"])
    if kind == "row":
        return 1, rng.randint(1, max_hw)
    if kind == "col":
        return rng.randint(1, max_hw), 1
    if kind == "odd":
        return rng.randrange(1, max_hw, 2), rng.randrange(1, max_hw, 2)
    return rng.randint(1, max_hw), rng.randint(1, max_hw)


def make_inputs(rng: random.Random, *, batch, dim, dstate, groups, height, width, dtype=torch.float64,
                device="cpu", with_D=True, with_z=True, with_bias=True, softplus=True):
    """Inputs whose decays stay in (0, 1) so long scans neither vanish nor explode."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift)

    args = dict(
        u=rnd(batch, dim, height, width),
        delta=rnd(batch, dim, height, width, scale=0.5, shift=-1.0 if softplus else 0.0),
        A=-(torch.rand(dim, dstate, generator=gen, dtype=torch.float64) + 0.1),
        B=rnd(batch, groups, dstate, height, width),
        C=rnd(batch, groups, dstate, height, width),
        D=rnd(dim) if with_D else None,
        z=rnd(batch, dim, height, width) if with_z else None,
        delta_bias=rnd(dim, scale=0.3) if with_bias else None,
    )
    if not softplus:  # a positive step without the softplus
        args["delta"] = args["delta"].abs() * 0.3 + 0.05
        if with_bias:
            args["delta_bias"] = args["delta_bias"].abs() * 0.1
    params = ("A", "D", "delta_bias")
    return {k: None if v is None else v.to(device=device, dtype=torch.float32 if (k in params and dtype != torch.float64)
                                           else dtype) for k, v in args.items()}


def random_config(rng: random.Random, max_hw: int = 70) -> dict:
    h, w = random_shape(rng, max_hw)
    dim = rng.choice([4, 8])
    groups = rng.choice([g for g in (1, 2, 4, dim) if dim % g == 0])
    return dict(batch=rng.randint(1, 2), dim=dim, dstate=rng.choice([1, 4, 16]), groups=groups, height=h, width=w,
                with_D=rng.random() < 0.7, with_z=rng.random() < 0.6, with_bias=rng.random() < 0.6,
                softplus=rng.random() < 0.7)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with ||b|| taken as at least 1e-6 per element RMS: a gradient that is exactly
    zero in float64 (dA on a 1 x 1 grid, where every h - G vanishes) comes out of float32 arithmetic
    as the rounding of terms of size ~1 that cancel (~1e-10), which no relative measure accepts."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-6 * max(1, b.numel()) ** 0.5))
