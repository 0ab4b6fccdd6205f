"""Independent component analysis of patch features: an unsupervised input transform fitted on the
training patches (no labels) before training.

:func:`fit_ica` whitens the features (PCA) and finds ``n`` directions of the whitened space that maximise
the kurtosis of the projections (symmetric FastICA with the cubic nonlinearity, Hyvärinen & Oja 2000),
ordered by decreasing excess kurtosis, each signed so that its skewness is >= 0. Rare patch types whose
features stand out along a direction of their own make heavy-tailed projections and are found first;
the Gaussian part of the features has excess kurtosis 0 along every direction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["fit_ica"]


def fit_ica(x: Tensor, n: int, *, iters: int = 500, tol: float = 1e-8, seed: int = 0,
            eps: float = 1e-6, restarts: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """ICA of the rows of ``x``.

    Args:
        x: (N, F) features, N > F.
        n: number of components, 1 <= n <= F.
        iters, tol: FastICA iterations at most, and the convergence threshold on 1 - |cos| between
            successive estimates of every direction.
        seed: the random orthonormal start.
        eps: eigenvalues of the covariance below ``eps`` times the largest are treated as eps times it.
        restarts: FastICA runs from the random starts of seeds ``seed, seed + 1, ...``; the run with the
            largest contrast, the sum over its components of |excess kurtosis|, is returned (one run can
            settle in a local optimum that misses a heavy-tailed direction). 1: one run.
    Returns:
        (mean (F,), unmix (F, n), kurtosis (n,)), float64: the components are ``(x - mean) @ unmix``,
        each of unit variance, uncorrelated with each other, excess kurtosis ``kurtosis`` (descending)
        and skewness >= 0.
    Raises:
        ValueError naming ``x``, ``n`` or ``restarts``.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected an (N, F) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    num, feat = x.shape
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= feat:
        raise ValueError(f"n: need an integer in [1, F={feat}], got {n!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts: need an integer >= 1, got {restarts!r}")
    if num <= feat:
        raise ValueError(f"x: need more rows than features to whiten, got {num} x {feat}")
    xd = x.detach().to(torch.float64)
    if not torch.isfinite(xd).all():
        raise ValueError("x: holds NaN or infinite values")
    mean = xd.mean(0)
    xc = xd - mean
    cov = xc.T @ xc / (num - 1)
    ev, vec = torch.linalg.eigh(cov)
    ev = ev.clamp_min(eps * float(ev.max().clamp_min(1e-300)))
    whiten = vec / ev.sqrt()  # (F, F): z = xc @ whiten has identity covariance
    z = xc @ whiten
    best = None
    for r in range(restarts):
        q = _fastica(z, n, int(seed) + r, iters, tol)
        u = z @ q  # (N, n): kept with the best run for its skewness below
        k = u.pow(4).mean(0) - 3.0
        contrast = float(k.abs().sum())
        if best is None or contrast > best[0]:
            best = (contrast, q, u, k)
    _, q, u, kurt = best
    skew = u.pow(3).mean(0)
    q = q * torch.where(skew < 0, -1.0, 1.0).to(q.dtype)
    order = torch.argsort(kurt, descending=True)
    return mean, whiten @ q[:, order], kurt[order]


def _fastica(z: Tensor, n: int, seed: int, iters: int, tol: float) -> Tensor:
    """Symmetric FastICA (cubic nonlinearity) on whitened rows ``z`` (N, F) from the random orthonormal
    start of ``seed``: (F, n) orthonormal directions."""
    num, feat = z.shape
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(feat, n, generator=g, dtype=torch.float64))
    for _ in range(iters):
        u = z @ q
        q_new = z.T @ u.pow(3) / num - 3.0 * q  # fixed point of the kurtosis contrast
        left, _, right = torch.linalg.svd(q_new, full_matrices=False)
        q_new = left @ right  # symmetric decorrelation
        done = float((1.0 - (q_new * q).sum(0).abs()).abs().max()) < tol
        q = q_new
        if done:
            break
    return q


def subsample_rows(x: Tensor, max_rows: Optional[int], seed: int = 0) -> Tensor:
    """At most ``max_rows`` rows of ``x``, drawn without replacement (all of them when fewer or None)."""
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    g = torch.Generator().manual_seed(int(seed))
    return x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
