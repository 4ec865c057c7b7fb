"""Hand-checked tests for coreg_ray/baselines/losses.py (the baselines' losses and label
updates). Logits [0, ln2, ln3] have softmax exactly [1/6, 2/6, 3/6]."""
from __future__ import annotations

import math

import pytest
import torch

from coreg_ray.baselines.losses import (candidate_confidence, complementary_loss, cr_confidence,
                                        kd_loss, kl_to_confidence, linear_ramp, lws_init,
                                        lws_loss, lws_weights, sigmoid_loss, uniform_confidence,
                                        weighted_ce_loss)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits_123(n=1):
    return torch.tensor([[0.0, LN2, LN3]] * n)


def _close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def _random_problem(b=64, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 30 * torch.randn(b, c, generator=g)  # large: some softmax entries underflow
    cand = (torch.rand(b, c, generator=g) < 0.4).float()
    cand[torch.arange(b), torch.randint(c, (b,), generator=g)] = 1.0  # never empty
    cand[0] = 1.0  # one row with every class a candidate
    return logits, cand


# ------------------------------------------------------------------- PRODEN / RC
def test_uniform_confidence_by_hand():
    cand = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    assert _close(uniform_confidence(cand), [[0.5, 0, 0.5], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]])


def test_weighted_ce_loss_by_hand_and_confidence_is_constant():
    conf = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]], requires_grad=True)
    logits = _logits_123(2).requires_grad_(True)
    loss = weighted_ce_loss(logits, conf)
    # row 0: -(.5 ln 1/6 + .5 ln 1/2) = .5 ln 12; row 1: -ln 1/3 = ln 3
    assert _close(loss, (0.5 * math.log(12) + LN3) / 2)
    loss.backward()
    assert conf.grad is None and logits.grad is not None


def test_candidate_confidence_by_hand():
    cand = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    got = candidate_confidence(_logits_123(3), cand)
    # {0,2}: (1/6, 3/6) / (4/6) = (1/4, 3/4); {1,2}: (2/6, 3/6) / (5/6) = (2/5, 3/5); all: p
    assert _close(got, [[0.25, 0, 0.75], [0, 0.4, 0.6], [1 / 6, 2 / 6, 3 / 6]])


def test_candidate_confidence_sums_to_one_on_the_candidates():
    logits, cand = _random_problem()
    w = candidate_confidence(logits, cand)
    assert torch.isfinite(w).all()
    assert _close(w.sum(1), torch.ones(len(w)), 1e-5)
    assert (w[cand == 0] == 0).all() and (w >= 0).all()


# ----------------------------------------------------------------------------- LWS
def test_lws_init_is_uniform_over_all_classes():
    assert _close(lws_init(torch.tensor([[1.0, 0.0, 0.0]])), [[1 / 3, 1 / 3, 1 / 3]])


def test_sigmoid_loss_by_hand():
    # 1 / (1 + e^z): z = 0 -> 1/2; z = ln 3 -> 1/4; z = -ln 3 -> 3/4
    assert _close(sigmoid_loss(torch.tensor([0.0, LN3, -LN3])), [0.5, 0.25, 0.75])


def test_lws_loss_by_hand():
    logits = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 0.0]])
    cand = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = torch.tensor([[0.25, 0.75, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    # row 0: .25 phi(0) + .75 phi(ln3) + beta * 1.0 * phi(-(-ln3)) = .125 + .1875 + 2 * .25
    #      = .8125 with beta = 2
    # row 1 (no non-candidates): (phi(ln3) + phi(0) + phi(0)) / 3 = 1.25 / 3
    assert _close(lws_loss(logits, cand, w, beta=2.0), (0.8125 + 1.25 / 3) / 2)
    # beta = 1: row 0 = .3125 + .25
    assert _close(lws_loss(logits, cand, w, beta=1.0), (0.5625 + 1.25 / 3) / 2)


def test_lws_weights_by_hand():
    cand = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1]])
    got = lws_weights(_logits_123(3), cand)
    # row 0: on S {0,2}: (1/4, 3/4); off S {1}: 1            -> (1/4, 1, 3/4)
    # row 1: S is everything: p; nothing off S               -> (1/6, 2/6, 3/6)
    # row 2: on S {2}: 1; off S {0,1}: (1/6, 2/6) / (3/6)    -> (1/3, 2/3, 1)
    assert _close(got, [[0.25, 1.0, 0.75], [1 / 6, 2 / 6, 3 / 6], [1 / 3, 2 / 3, 1.0]])


def test_lws_weights_each_part_sums_to_one():
    logits, cand = _random_problem(seed=1)
    w = lws_weights(logits, cand)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert _close((w * cand).sum(1), torch.ones(len(w)), 1e-5)
    off = (w * (1 - cand)).sum(1)
    has_off = (cand == 0).any(1)
    assert _close(off[has_off], torch.ones(int(has_off.sum())), 1e-5)
    assert (off[~has_off] == 0).all()


# ------------------------------------------------------------------------- CR-DPLL
def test_complementary_loss_by_hand():
    cand = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    # row 0: -ln(1 - 2/6) = ln 1.5; row 1: -ln(1 - 1/6) - ln(1 - 3/6) = ln 1.2 + ln 2; row 2: 0
    expected = (math.log(1.5) + math.log(1.2) + LN2 + 0.0) / 3
    assert _close(complementary_loss(_logits_123(3), cand), expected)


def test_complementary_loss_is_finite_when_a_non_candidate_has_all_the_mass():
    loss = complementary_loss(torch.tensor([[200.0, 0.0, 0.0]]), torch.tensor([[0, 1, 1]]))
    assert _close(loss, -math.log(1e-7), 1e-4)


def test_kl_to_confidence_by_hand_and_against_torch():
    q = torch.tensor([[0.5, 0.0, 0.5], [1 / 6, 2 / 6, 3 / 6]])
    # row 0: .5 ln(.5 / (1/6)) + 0 + .5 ln(.5 / .5) = .5 ln 3; row 1: q = p -> 0
    got = kl_to_confidence(_logits_123(2), q)
    assert _close(got, 0.25 * LN3)
    logits = torch.randn(4, 3)
    q = uniform_confidence(torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 1, 1]]))
    ref = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(logits, 1), q)
    assert _close(kl_to_confidence(logits, q), ref, 1e-5)


def test_cr_confidence_by_hand():
    views = [_logits_123(), torch.tensor([[LN3, LN2, 0.0]])]  # p = (1/6,1/3,1/2), (1/2,1/3,1/6)
    got = cr_confidence(views, torch.tensor([[1, 1, 0]]))
    # geometric means on S = {0, 1}: sqrt(1/12) = 1/(2 sqrt 3), sqrt(1/9) = 1/3
    # normalised: 3 / (3 + 2 sqrt 3), 2 sqrt 3 / (3 + 2 sqrt 3)
    a = 3 / (3 + 2 * math.sqrt(3))
    assert _close(got, [[a, 1 - a, 0.0]])


def test_cr_confidence_sums_to_one_on_the_candidates():
    logits, cand = _random_problem(seed=2)
    views = [logits, logits.flip(0), 0.5 * logits]
    q = cr_confidence(views, cand)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert _close(q.sum(1), torch.ones(len(q)), 1e-5)
    assert (q[cand == 0] == 0).all()


def test_linear_ramp():
    assert linear_ramp(0, 10, 1.0) == 0.0
    assert linear_ramp(5, 10, 1.0) == 0.5
    assert linear_ramp(20, 10, 2.0) == 2.0
    assert linear_ramp(3, 0, 1.0) == 1.0


# ------------------------------------------------------------------------------- KD
def test_kd_loss_by_hand():
    t = torch.tensor([[0.5, 0.5, 0.0]])
    # T = 1: -(.5 ln 1/6 + .5 ln 1/3) = .5 ln 18
    assert _close(kd_loss(_logits_123(), t), 0.5 * math.log(18))
    # T = 2: t' = sqrt(.64, .36, 0) = (.8, .6, 0) -> (4/7, 3/7, 0); logits (0, 2ln2, 2ln3) / 2
    # have softmax (1/6, 1/3, 1/2); loss = 2^2 * (4/7 ln 6 + 3/7 ln 3)
    got = kd_loss(2 * _logits_123(), torch.tensor([[0.64, 0.36, 0.0]]), temperature=2.0)
    assert _close(got, 4 * (4 / 7 * math.log(6) + 3 / 7 * LN3), 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_is_minimised_at_the_target(temperature):
    t = torch.tensor([[0.2, 0.3, 0.5]])
    z = (t.log() * 1.0).requires_grad_(True)  # softmax(z / T) = t' when z = log t
    kd_loss(z, t, temperature).backward()
    assert _close(z.grad, torch.zeros_like(z), 1e-6)
