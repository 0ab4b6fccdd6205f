"""Tasks: survival bins, the discrete-time NLL and the Cox loss against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ssm2d_path.tasks import (ClassificationTask, SurvivalTask, cox_partial_nll, nll_survival_loss,
                              risk_from_logits, survival_bins, time_to_bin)


def test_survival_bins_match_pandas_qcut_on_uncensored_times():
    rng = np.random.default_rng(1)
    t = rng.exponential(30.0, 200)
    c = (rng.random(200) < 0.35).astype(int)
    edges = survival_bins(t, c, 4)
    _, ref = pd.qcut(t[c == 0], q=4, retbins=True)
    assert edges.shape == (5,)
    assert edges[0] == 0.0 and math.isinf(edges[-1])
    np.testing.assert_allclose(edges[1:-1], ref[1:-1], rtol=1e-12)
    # Bin assignment: right-open intervals, as pandas.cut(right=False) with the widened edges.
    y = time_to_bin(t, edges)
    ref_y = pd.cut(t, bins=edges, right=False, labels=False)
    np.testing.assert_array_equal(y, ref_y)
    # Censored times do not move the edges.
    t2 = t.copy()
    t2[c == 1] *= 7.0
    np.testing.assert_array_equal(survival_bins(t2, c, 4), edges)


def test_survival_bins_reject_too_few_events():
    with pytest.raises(ValueError, match="uncensored"):
        survival_bins([1.0, 2.0, 3.0], [1, 1, 0], 4)


def _nll_hand(logits, y, c, alpha, eps=1e-7):
    total = 0.0
    for f, yy, cc in zip(logits, y, c):
        h = [1.0 / (1.0 + math.exp(-v)) for v in f]
        s = []
        acc = 1.0
        for hk in h:
            acc *= 1.0 - hk
            s.append(acc)
        s_prev = 1.0 if yy == 0 else s[yy - 1]
        unc = -(1 - cc) * (math.log(max(s_prev, eps)) + math.log(max(h[yy], eps)))
        cen = -cc * math.log(max(s[yy], eps))
        total += (1 - alpha) * (cen + unc) + alpha * unc
    return total / len(y)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_matches_float64_hand_formula(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    logits[0] = torch.tensor([40.0, 40.0, 40.0, 40.0])  # hazards 1: clamping keeps it finite
    y = torch.randint(0, 4, (9,), generator=g)
    c = torch.randint(0, 2, (9,), generator=g)
    got = nll_survival_loss(logits, y, c, alpha=alpha)
    ref = _nll_hand(logits.tolist(), y.tolist(), c.tolist(), alpha)
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(ref, rel=1e-12)


def test_risk_is_minus_sum_of_survival():
    logits = torch.randn(3, 4, dtype=torch.float64)
    h = torch.sigmoid(logits)
    s = torch.stack([torch.prod(1 - h[:, : k + 1], dim=1) for k in range(4)], 1)
    torch.testing.assert_close(risk_from_logits(logits), -s.sum(1))


def test_cox_matches_breslow_loop_with_ties():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    t = torch.randint(1, 6, (12,), generator=g).double()  # many tied times
    e = torch.randint(0, 2, (12,), generator=g)
    e[0] = 1
    terms = []
    for i in range(12):
        if e[i]:
            den = sum(math.exp(float(r[j])) for j in range(12) if t[j] >= t[i])
            terms.append(float(r[i]) - math.log(den))
    ref = -sum(terms) / len(terms)
    assert float(cox_partial_nll(r, t, e)) == pytest.approx(ref, rel=1e-12)
    zero = cox_partial_nll(r.clone().requires_grad_(), t, torch.zeros(12))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


class _Ex:
    def __init__(self, label=None, time=None, censorship=None):
        self.label, self.time, self.censorship = label, time, censorship
        self.bag = type("B", (), {"bag_id": "x"})()


def test_task_targets_and_predictions():
    task = SurvivalTask(np.array([0.0, 10.0, 20.0, 30.0, np.inf]))
    assert task.n_outputs == 4
    assert task.target(_Ex(time=10.0, censorship=1)).bin == 1
    assert task.target(_Ex(time=35.0, censorship=0)).bin == 3
    pred = task.prediction(torch.zeros(1, 4))
    assert pred["risk"] == pytest.approx(-(0.5 + 0.25 + 0.125 + 0.0625))
    assert SurvivalTask(task.edges, loss="cox").n_outputs == 1
    cls = ClassificationTask(3)
    p = cls.prediction(torch.tensor([[0.0, 1.0, 0.0]]))
    assert p["pred"] == 1 and sum(p[f"prob_{i}"] for i in range(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no label"):
        cls.target(_Ex())
