"""Learning tasks: what a bag's logits mean, the loss, and the per-bag predictions.

Classification: ``n_outputs = n_classes`` logits, cross-entropy, softmax probabilities.

Survival (the field's discrete-time recipe, see PATHOLOGY.md):

* time is cut into K = 4 bins by quantiles of the **uncensored** patients' times, outer edges widened
  (lowest to 0, highest to +inf, by 1e-6), computed once on the whole cohort (:func:`survival_bins`);
* the model outputs K logits, hazards ``h_k = sigmoid(f_k)``, survival ``S_k = prod_{j<=k} (1 - h_j)``;
* discrete-time NLL (c = censorship, 1 = censored; y = bin index; ``S_{-1} = 1``)::

      L_unc = -(1 - c) * [log S_{y-1} + log h_y]
      L     = -c * log S_y + L_unc
      loss  = (1 - alpha) * L + alpha * L_unc

  the blend with the uncensored term by ``alpha`` is the one of the released CLAM / PORPOISE / MambaMIL /
  2DMamba code (alpha = 0 by default); probabilities are clamped to ``eps`` before the log;
* risk score ``= -sum_k S_k`` (higher = worse).

Cox (option ``loss: cox``): one output, the log-risk ``r``; the negative Cox partial log-likelihood
(Breslow ties) needs several patients at once, and training runs one bag per step. The trainer therefore
keeps the risks of all bags of one gradient-accumulation window (``train.accumulation`` bags, graphs
included) and computes the partial likelihood over that window; a window without any event contributes
nothing. Memory grows with the window; use ``accumulation`` of 16-64 with Cox.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ClassificationTask",
    "SurvivalTask",
    "Task",
    "build_task",
    "cox_partial_nll",
    "nll_survival_loss",
    "risk_from_logits",
    "survival_bins",
    "survival_curve",
    "time_to_bin",
]

def survival_bins(times: Sequence[float], censorship: Sequence[int], k: int = 4) -> np.ndarray:
    """Bin edges (k + 1,) from quantiles of the uncensored times, outer edges widened.

    As in the field's code: the quantile edges' outer ends are first widened by 1e-6 and then replaced by
    ``edges[0] = 0`` and ``edges[-1] = +inf``, so every time >= 0 falls into a bin; bins are right-open.

    Args:
        times: (N,) survival times of the whole cohort (one per patient).
        censorship: (N,) 1 = censored, 0 = event.
        k: number of bins.
    Raises:
        ValueError when fewer than ``k`` uncensored times exist or the quantile edges collide.
    """
    t = np.asarray(times, dtype=np.float64)
    c = np.asarray(censorship)
    if t.ndim != 1 or c.shape != t.shape:
        raise ValueError(f"survival_bins: times {t.shape} and censorship {c.shape} must be equal 1D arrays")
    if not np.isin(c, (0, 1)).all():
        raise ValueError("survival_bins: censorship must be 0 (event) or 1 (censored)")
    if k < 1:
        raise ValueError(f"survival_bins: k must be >= 1, got {k}")
    unc = t[c == 0]
    if unc.size < k:
        raise ValueError(f"survival_bins: need at least k={k} uncensored times, got {unc.size}")
    edges = np.quantile(unc, np.linspace(0.0, 1.0, k + 1))
    edges[0] = 0.0
    edges[-1] = np.inf
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"survival_bins: quantile edges collide (too many tied times): {edges.tolist()}")
    return edges


def time_to_bin(times: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Bin index (N,) int64 of each time: ``edges[y] <= t < edges[y + 1]`` (right-open, as pandas.cut
    with right=False); times below the first edge go to bin 0."""
    t = np.asarray(times, dtype=np.float64)
    y = np.searchsorted(np.asarray(edges)[1:-1], t, side="right")
    return y.astype(np.int64)


def survival_curve(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K) logits -> hazards (B, K) and survival ``S_k = prod_{j<=k} (1 - h_j)`` (B, K)."""
    h = torch.sigmoid(logits)
    return h, torch.cumprod(1.0 - h, dim=1)


def risk_from_logits(logits: Tensor) -> Tensor:
    """(B, K) -> (B,) risk ``-sum_k S_k``."""
    return -survival_curve(logits)[1].sum(dim=1)


def nll_survival_loss(logits: Tensor, y: Tensor, c: Tensor, alpha: float = 0.0, eps: float = 1e-7) -> Tensor:
    """Discrete-time survival NLL, mean over the batch.

    Args:
        logits: (B, K).  y: (B,) int64 bin index.  c: (B,) censorship (1 = censored).
        alpha: weight of the uncensored term in the blend (see module docstring).
        eps: probabilities are clamped to ``>= eps`` before the log.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (B, K), got {tuple(logits.shape)}")
    y = y.long().view(-1, 1)
    c = c.to(logits.dtype).view(-1, 1)
    h, s = survival_curve(logits)
    s_pad = torch.cat([torch.ones_like(c), s], dim=1)  # s_pad[:, k + 1] = S_k, s_pad[:, 0] = S_{-1} = 1
    s_prev = torch.gather(s_pad, 1, y).clamp_min(eps)
    h_y = torch.gather(h, 1, y).clamp_min(eps)
    s_y = torch.gather(s_pad, 1, y + 1).clamp_min(eps)
    uncensored = -(1.0 - c) * (torch.log(s_prev) + torch.log(h_y))
    censored = -c * torch.log(s_y)
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def cox_partial_nll(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), mean over the events of the batch.

    ``-1/E sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]``. Returns 0 (still attached to the
    graph) when the batch holds no event.

    Args:
        risk: (B,) log-risk.  time: (B,).  event: (B,) 1 = event observed.
    """
    risk = risk.view(-1)
    time = time.to(risk.device).view(-1)
    event = event.to(risk.device).view(-1).bool()
    if not bool(event.any()):
        return risk.sum() * 0.0
    at_risk = time.view(1, -1) >= time.view(-1, 1)  # [i, j]: j is at risk at t_i
    masked = risk.view(1, -1).expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    log_den = torch.logsumexp(masked, dim=1)
    return -(risk - log_den)[event].mean()


@dataclass
class Target:
    """What a loss needs from one example: label (classification) or bin/time/censorship (survival)."""

    label: Optional[int] = None
    time: Optional[float] = None
    censorship: Optional[int] = None
    bin: Optional[int] = None


class Task:
    """Base class: the loss and the per-bag prediction record of one task."""

    kind: str
    n_outputs: int

    def target(self, example) -> Target:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, logits: Tensor, targets: Sequence[Target]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def prediction(self, logits: Tensor) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class ClassificationTask(Task):
    """``n_classes`` logits, cross-entropy; predictions: ``prob_<i>`` per class and ``pred``."""

    kind = "classification"

    def __init__(self, n_classes: int, class_names: Optional[Sequence[str]] = None):
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_outputs = self.n_classes = int(n_classes)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.loss_name = "ce"

    def target(self, example) -> Target:
        if example.label is None:
            raise ValueError(f"bag {example.bag.bag_id!r} has no label")
        return Target(label=int(example.label))

    def loss(self, logits: Tensor, targets: Sequence[Target]) -> Tensor:
        y = torch.tensor([t.label for t in targets], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, y)

    def prediction(self, logits: Tensor) -> dict:
        p = torch.softmax(logits.detach().double(), dim=-1).view(-1).cpu().numpy()
        out = {f"prob_{i}": float(v) for i, v in enumerate(p)}
        out["pred"] = int(p.argmax())
        return out


class SurvivalTask(Task):
    """Discrete-time survival (``loss="nll"``, K outputs) or Cox (``loss="cox"``, one output).

    Args:
        edges: (K + 1,) bin edges from :func:`survival_bins` (needed for ``nll``; kept for ``cox`` too,
            where they only label the bins in the predictions).
        alpha: NLL blend weight.  loss: "nll" or "cox".
    """

    kind = "survival"

    def __init__(self, edges: np.ndarray, *, alpha: float = 0.0, loss: str = "nll", eps: float = 1e-7):
        if loss not in ("nll", "cox"):
            raise ValueError(f"survival loss must be 'nll' or 'cox', got {loss!r}")
        self.edges = np.asarray(edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2:
            raise ValueError(f"edges: expected (K + 1,) with K >= 1, got {self.edges.shape}")
        self.n_bins = self.edges.size - 1
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.loss_name = loss
        self.n_outputs = self.n_bins if loss == "nll" else 1

    def target(self, example) -> Target:
        if example.time is None or example.censorship is None:
            raise ValueError(f"bag {example.bag.bag_id!r} has no survival time / censorship")
        t = float(example.time)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"bag {example.bag.bag_id!r}: survival time must be finite and >= 0, got {t}")
        return Target(time=t, censorship=int(example.censorship), bin=int(time_to_bin([t], self.edges)[0]))

    def risk(self, logits: Tensor) -> Tensor:
        """(B, n_outputs) -> (B,) risk (higher = worse)."""
        return logits[:, 0] if self.loss_name == "cox" else risk_from_logits(logits)

    def loss(self, logits: Tensor, targets: Sequence[Target]) -> Tensor:
        dev = logits.device
        c = torch.tensor([t.censorship for t in targets], dtype=logits.dtype, device=dev)
        if self.loss_name == "cox":
            time = torch.tensor([t.time for t in targets], dtype=logits.dtype, device=dev)
            return cox_partial_nll(logits[:, 0], time, 1.0 - c)
        y = torch.tensor([t.bin for t in targets], dtype=torch.long, device=dev)
        return nll_survival_loss(logits, y, c, alpha=self.alpha, eps=self.eps)

    def prediction(self, logits: Tensor) -> dict:
        lg = logits.detach().double()
        out = {"risk": float(self.risk(lg).view(-1)[0])}
        if self.loss_name == "nll":
            h, s = survival_curve(lg)
            out.update({f"hazard_{k}": float(v) for k, v in enumerate(h.view(-1))})
            out.update({f"surv_{k}": float(v) for k, v in enumerate(s.view(-1))})
        return out


def build_task(kind: str, *, n_classes: Optional[int] = None, class_names=None, times=None, censorship=None,
               n_bins: int = 4, alpha: float = 0.0, loss: str = "auto") -> Task:
    """Classification from ``n_classes``; survival from the whole cohort's times/censorship (edges once)."""
    if kind == "classification":
        if loss not in ("auto", "ce"):
            raise ValueError(f"train.loss: classification takes 'ce', got {loss!r}")
        return ClassificationTask(n_classes, class_names)
    if kind == "survival":
        edges = survival_bins(times, censorship, n_bins)
        return SurvivalTask(edges, alpha=alpha, loss="nll" if loss == "auto" else loss)
    raise ValueError(f"task must be 'classification' or 'survival', got {kind!r}")
