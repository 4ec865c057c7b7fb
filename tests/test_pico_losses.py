"""Hand-checked tests for coreg_ray/baselines/pico_losses.py (PiCO, PiCO+, ALIM)."""
from __future__ import annotations

import math

import numpy as np
import torch

from coreg_ray.baselines.pico_losses import (alim_lambda, alim_weights, candidate_margin,
                                             ema_target, estimate_noise_level, knn_index,
                                             masked_mean, mixup_batch, onehot_target,
                                             phi_schedule, pico_contrastive_masks,
                                             pico_plus_masks, prototype_distance,
                                             prototype_scores, scaled_target, select_reliable,
                                             supcon_per_anchor, uniform_over_candidates)


def _close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ----------------------------------------------------------------------------- pseudo-targets
def test_phi_schedule_is_linear_from_095_to_08():
    # 0.95 + (0.8 - 0.95) * e / 8: e=0 -> 0.95, e=4 -> 0.95 - 0.075 = 0.875, e=8 -> 0.8
    assert _close([phi_schedule(0, 8), phi_schedule(4, 8), phi_schedule(8, 8)], [0.95, 0.875, 0.8])


def test_uniform_over_candidates():
    got = uniform_over_candidates(torch.tensor([[1.0, 0, 1], [1, 1, 1]]))
    assert _close(got, [[0.5, 0, 0.5], [1 / 3, 1 / 3, 1 / 3]])


def test_alim_weights_keep_candidates_and_scale_the_rest():
    # S + lam (1 - S) with lam = 0.2: [1, 0, 1] -> [1, 0.2, 1]
    assert _close(alim_weights(torch.tensor([[1.0, 0, 1]]), 0.2), [[1, 0.2, 1]])
    assert _close(alim_weights(torch.tensor([[1.0, 0, 1]]), 0.0), [[1, 0, 1]])


def test_onehot_target_pico_restricts_to_candidates():
    scores = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    cand = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    # row 0: [0.2, 0, 0.3] -> class 2; row 1: [0, 0.3, 0.1] -> class 1 (not the global max 0)
    assert _close(onehot_target(scores, cand), [[0, 0, 1], [0, 1, 0]])


def test_onehot_target_alim_can_leave_the_candidate_set():
    scores = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    cand = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    # lam = 0.8: row 0: [0.2, 0.4, 0.3] -> class 1 (non-candidate); row 1: [0.48, 0.3, 0.1] -> 0
    assert _close(onehot_target(scores, alim_weights(cand, 0.8)), [[0, 1, 0], [1, 0, 0]])


def test_scaled_target_hand_computed():
    scores = torch.tensor([[0.2, 0.5, 0.3]])
    cand = torch.tensor([[1.0, 0, 1]])
    # lam = 0.5: [0.2, 0.25, 0.3] / 0.75 = [0.26667, 0.33333, 0.4]
    assert _close(scaled_target(scores, alim_weights(cand, 0.5)), [[0.2 / 0.75, 0.25 / 0.75, 0.4]])
    # lam = 0 (PiCO's set): [0.2, 0, 0.3] / 0.5 = [0.4, 0, 0.6]
    assert _close(scaled_target(scores, cand), [[0.4, 0, 0.6]])
    # no mass on the set: uniform over the weights
    assert _close(scaled_target(torch.tensor([[0.0, 1.0, 0.0]]), cand), [[0.5, 0, 0.5]])


def test_ema_target_hand_computed():
    # 0.9 * [0.5, 0, 0.5] + 0.1 * [0, 0, 1] = [0.45, 0, 0.55]
    got = ema_target(torch.tensor([[0.5, 0, 0.5]]), torch.tensor([[0.0, 0, 1]]), 0.9)
    assert _close(got, [[0.45, 0, 0.55]])


def test_pico_updates_keep_rows_normalised_and_inside_the_candidates():
    g = torch.Generator().manual_seed(0)
    cand = (torch.rand(4, 3, generator=g) < 0.5).float()
    cand[torch.arange(4), torch.randint(0, 3, (4,), generator=g)] = 1.0
    conf = uniform_over_candidates(cand)
    for e in range(10):
        scores = torch.softmax(torch.randn(4, 3, generator=g), 1)
        conf = ema_target(conf, onehot_target(scores, cand), phi_schedule(e, 10))
        assert _close(conf.sum(1), torch.ones(4))
        assert (conf[cand == 0] == 0).all()
    soft = ema_target(conf, scaled_target(scores, cand), 0.8)
    assert _close(soft.sum(1), torch.ones(4)) and (soft[cand == 0] == 0).all()


def test_prototype_scores_hand_computed():
    z = torch.tensor([[1.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # softmax([1, 0, -1]) = [e, 1, 1/e] / (e + 1 + 1/e) = [0.66524, 0.24473, 0.09003]
    e = math.e
    s = e + 1 + 1 / e
    assert _close(prototype_scores(z, protos), [[e / s, 1 / s, 1 / e / s]])
    # T = 0.5: softmax([2, 0, -2])
    s2 = e ** 2 + 1 + e ** -2
    assert _close(prototype_scores(z, protos, 0.5), [[e ** 2 / s2, 1 / s2, e ** -2 / s2]])


# ----------------------------------------------------------------------------- contrastive
def test_pico_supcon_masks_hand_computed():
    # keys: [q0(0), q1(1), k0(0), k1(1), Q0(1), Q1(empty), Q2(0)]
    labels = torch.tensor([0, 1])
    queue = torch.tensor([1, -1, 0])
    pos, kept = pico_contrastive_masks(labels, queue, supervised=True)
    assert (pos == _b([[0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0, 0]])).all()
    assert (kept == _b([[0, 1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0, 1]])).all()
    assert not (pos & ~kept).any()


def test_pico_moco_masks_before_prot_start():
    # MoCo: positive = own key; denominator = own key + valid queue slots (Q0, Q2)
    pos, kept = pico_contrastive_masks(torch.tensor([0, 1]), torch.tensor([1, -1, 0]),
                                       supervised=False)
    assert (pos == _b([[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]])).all()
    assert (kept == _b([[0, 0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0, 1]])).all()


def test_pico_plus_masks_reliable_unreliable_and_knn():
    # keys: [q0(0,R), q1(0,U), k0(0,R), k1(0,U), Q0(0,R), Q1(0,U)]
    labels, is_rel = torch.tensor([0, 0]), _b([1, 0])
    qlab, qrel = torch.tensor([0, 0]), _b([1, 0])
    pos, kept = pico_plus_masks(labels, is_rel, qlab, qrel)
    # reliable anchor 0: reliable same-label keys k0, Q0; unreliable anchor 1: own key k1 only
    assert (pos == _b([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])).all()
    assert (kept == _b([[0, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]])).all()
    # kNN for unreliable rows: row 1's neighbours {q1 (itself, dropped), Q1} + own key k1;
    # row 0 (reliable) keeps its label positives
    pos, _ = pico_plus_masks(labels, is_rel, qlab, qrel, torch.tensor([[2, 4], [1, 5]]))
    assert (pos == _b([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 1]])).all()


def test_knn_index_skips_empty_slots():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    # sims [1, 0, 0.6, 0.8 (empty -> -inf)] -> top-2 = [0, 2]
    got = knn_index(q, keys, _b([1, 1, 1, 0]), 2)
    assert got.tolist() == [[0, 2]]


def test_supcon_per_anchor_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # [self, positive k, other n]
    kept = _b([[0, 1, 1]])
    # T = 1: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.31326
    got = supcon_per_anchor(q, keys, _b([[0, 1, 0]]), kept, 1.0)
    assert _close(got, [math.log(1 + math.exp(-1))])
    # two positives: mean(0.31326, -log(e^0 / (e + 1)) = 1.31326) = 0.81326
    got = supcon_per_anchor(q, keys, _b([[0, 1, 1]]), kept, 1.0)
    assert _close(got, [0.5 * (math.log(1 + math.exp(-1)) + math.log(math.e + 1))])
    # T = 0.5: logits [2, 0] -> log(1 + e^-2) = 0.12693
    got = supcon_per_anchor(q, keys, _b([[0, 1, 0]]), kept, 0.5)
    assert _close(got, [math.log(1 + math.exp(-2))])


def test_masked_mean():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert _close(masked_mean(v, _b([1, 0, 1])), 2.0)  # (1 + 3) / 2
    assert _close(masked_mean(v, _b([0, 0, 0])), 0.0)


# ----------------------------------------------------------------------------- PiCO+ selection
def test_prototype_distance_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # -z0.mu0 = -1; -z1.mu1 = -0.8
    assert _close(prototype_distance(z, protos, torch.tensor([0, 1])), [-1.0, -0.8])


def test_select_reliable_takes_the_closest_fraction():
    # int(4 * 0.5) = 2 smallest distances: -0.5 (idx 1), 0.1 (idx 2)
    got = select_reliable(torch.tensor([0.3, -0.5, 0.1, 0.9]), 0.5)
    assert got.tolist() == [False, True, True, False]


def test_mixup_batch_hand_computed():
    x = torch.tensor([[0.0], [10.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # lam = 0.3 -> lam' = 0.7; partner of row 0 is row 1: 0.7 * 0 + 0.3 * 10 = 3
    xm, tm = mixup_batch(x, t, 0.3, torch.tensor([1, 0]))
    assert _close(xm, [[3.0], [7.0]]) and _close(tm, [[0.7, 0.3], [0.3, 0.7]])


# ----------------------------------------------------------------------------- ALIM's lambda
def test_candidate_margin_hand_computed():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]])
    cand = torch.tensor([[0.0, 1, 1], [1, 0, 1], [1, 1, 1]])
    got = candidate_margin(scores, cand)
    # 0.3 / 0.5 = 0.6; 0.3 / 0.6 = 0.5; all classes candidates -> 0.5 / 1e-9 (huge)
    assert _close(got[:2], [0.6, 0.5]) and got[2] > 1e6


def test_alim_lambda_is_the_noise_quantile_of_the_margins():
    m = torch.tensor([0.5, 2.0, 0.2, 4.0])
    # sorted [0.2, 0.5, 2, 4]; noise 0.25 -> index int(4 * 0.25) = 1 -> 0.5
    assert _close(alim_lambda(m, 0.25), 0.5)
    # noise 0.5 -> index 2 -> 2.0, capped at 1 (--max1); uncapped 2.0
    assert _close(alim_lambda(m, 0.5), 1.0) and _close(alim_lambda(m, 0.5, 10.0), 2.0)
    assert alim_lambda(m, 0.0) == 0.0


def test_alim_lambda_moves_a_noise_fraction_out_of_the_sets():
    """With lambda from the rule, the onehot target leaves the set exactly for samples whose
    margin is below lambda: a `noise` fraction of them."""
    g = torch.Generator().manual_seed(1)
    scores = torch.softmax(3 * torch.randn(40, 3, generator=g), 1)
    cand = torch.zeros(40, 3)
    cand[:, 0] = 1.0
    margin = candidate_margin(scores, cand)
    lam = alim_lambda(margin, 0.25, max_lambda=100.0)
    left = onehot_target(scores, alim_weights(cand, lam))[:, 0] == 0
    assert left.float().mean().item() == 0.25
    assert (left == (margin < lam)).all()


def test_estimate_noise_level_is_the_high_loss_gmm_fraction():
    # six low losses (~0.1) and two high (~3): the high component holds 2 / 8 = 0.25
    losses = np.array([0.1, 0.12, 0.11, 0.09, 0.1, 0.13, 3.0, 3.1])
    assert estimate_noise_level(losses) == 0.25
    assert estimate_noise_level(torch.tensor(losses)) == 0.25
    assert estimate_noise_level(np.full(5, 0.7)) == 0.0  # degenerate: all clean
    assert estimate_noise_level(np.array([0.1, np.nan, 0.1])) == 0.0
