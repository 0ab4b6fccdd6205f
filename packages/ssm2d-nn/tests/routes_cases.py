"""Random scan2d_routes problems shared by the CPU and GPU tests: fresh inputs every run."""

from __future__ import annotations

import random

import torch

from scan2d_cases import ORDERS, ORIGINS

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
PARAMS = ("A", "D", "delta_bias")


def random_routes(rng: random.Random, k: int) -> tuple:
    return tuple((rng.choice(ORIGINS), rng.choice(ORDERS)) for _ in range(k))


def make_route_inputs(rng: random.Random, *, batch, dim, dstate, groups, height, width, routes, with_D=True,
                      with_bias=True, softplus=True, strided_BC=False) -> dict:
    """float64 inputs of scan2d_routes (decays in (0, 1)). ``strided_BC``: B and C are views of
    one larger tensor, as SS2D passes them (pieces of its x_proj output)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    k = len(routes)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    delta = rnd(batch, k, dim, height, width, scale=0.5, shift=-1.0 if softplus else 0.0)
    if not softplus:
        delta = delta.abs() * 0.3 + 0.05
    if strided_BC:
        both = rnd(batch, k, groups, 2 * dstate + 3, height, width)
        B, C = both[:, :, :, 3:3 + dstate], both[:, :, :, 3 + dstate:]
    else:
        B, C = rnd(batch, k, groups, dstate, height, width), rnd(batch, k, groups, dstate, height, width)
    bias = rnd(k, dim, scale=0.3) if with_bias else None
    if bias is not None and not softplus:
        bias = bias.abs() * 0.1
    return dict(u=rnd(batch, dim, height, width), delta=delta,
                A=-(torch.rand(k, dim, dstate, generator=gen, dtype=torch.float64) + 0.1), B=B, C=C,
                D=rnd(k, dim) if with_D else None, delta_bias=bias)


def cast(inputs: dict, device, dtype) -> dict:
    """Leaves on ``device``: A, D, delta_bias in float32 (float64 for float64), the rest in dtype;
    views (strided B, C) keep their strides relative to one new base."""
    out = {}
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    bases = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        dt = pdt if name in PARAMS else dtype
        if t._base is not None:
            base = bases.get(id(t._base))
            if base is None:
                base = bases[id(t._base)] = t._base.to(device=device, dtype=dt).requires_grad_(True)
            out[name] = base.as_strided(t.shape, t.stride(), t.storage_offset())
        else:
            out[name] = t.to(device=device, dtype=dt).requires_grad_(True)
    return out
