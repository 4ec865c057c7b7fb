"""Hand-checked tests for coreg_ray/coreg/losses.py (paper-method.md, "Training")."""
from __future__ import annotations

import math

import pytest
import torch

from coreg_ray.coreg.losses import (consistency_loss, contrastive_masks, division_loss,
                                    negative_entropy, noisy_contrastive_loss, partial_ce,
                                    prototype_alignment_loss, soft_cross_entropy, squared_error,
                                    warmup_loss)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits_123():
    """Logits whose softmax is exactly [1/6, 2/6, 3/6]."""
    return torch.tensor([[0.0, LN2, LN3]])


def _close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- warm-up terms
def test_partial_ce_is_minus_log_mass_on_candidate_set():
    logits = torch.cat([_logits_123(), _logits_123(), _logits_123()])
    cand = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    got = partial_ce(logits, cand)
    assert got.shape == (3,)
    # mass on {0,2} = 4/6; on {1} = 2/6; on everything = 1
    assert _close(got, [math.log(6 / 4), math.log(3.0), 0.0])


def test_partial_ce_accepts_bool_candidates():
    got = partial_ce(_logits_123(), torch.tensor([[False, True, True]]))
    assert _close(got, [math.log(6 / 5)])


def test_negative_entropy_hand_values():
    p = [1 / 6, 2 / 6, 3 / 6]
    expected = sum(x * math.log(x) for x in p)
    logits = torch.cat([_logits_123(), torch.zeros(1, 3)])
    got = negative_entropy(logits)
    assert _close(got, [expected, -math.log(3.0)])
    assert (got <= 0).all()


def test_warmup_loss_skips_rows_whose_set_is_every_class():
    logits = torch.tensor([[0.0, LN2, LN3], [1.0, 0.0, -1.0], [5.0, -3.0, 0.5]])
    cand = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    per = []
    for r in range(2):  # row 2 is uninformative and must not count
        p = torch.softmax(logits[r].double(), 0)
        mass = float(p[cand[r].bool()].sum())
        per.append(-math.log(mass) + float((p * p.log()).sum()))
    expected = sum(per) / 2
    assert _close(warmup_loss(logits, cand), expected, 1e-5)
    # Changing the skipped row's logits does not change the loss.
    logits2 = logits.clone()
    logits2[2] = torch.tensor([-9.0, 9.0, 0.0])
    assert _close(warmup_loss(logits2, cand), expected, 1e-5)


def test_warmup_loss_all_rows_uninformative_gives_zero():
    logits = torch.randn(4, 5)
    assert float(warmup_loss(logits, torch.ones(4, 5))) == 0.0


# ----------------------------------------------------------------------------- division loss
def test_division_loss_uses_max_prob_inside_set():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    cand = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1]])
    got = division_loss(probs, cand)
    assert _close(got[:2], [-math.log(0.3), -math.log(0.6)])
    # No mass on the set: clamped, finite and large.
    assert math.isfinite(float(got[2])) and _close(got[2], -math.log(1e-12), 1e-3)


# ----------------------------------------------------------------------------- consistency
def test_soft_cross_entropy_hand_value():
    t = torch.tensor([[0.5, 0.0, 0.5]])
    got = soft_cross_entropy(_logits_123(), t)
    assert _close(got, [-(0.5 * math.log(1 / 6) + 0.5 * math.log(3 / 6))])


def test_squared_error_is_mean_over_classes():
    probs = torch.tensor([[0.2, 0.8], [0.25, 0.25]])
    targets = torch.tensor([[1.0, 0.0], [0.25, 0.25]])
    assert _close(squared_error(probs, targets), [0.64, 0.0])
    # 4 classes: sum of squares 0.5 -> mean 0.125 (not 0.5)
    p4 = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    t4 = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    assert _close(squared_error(p4, t4), [0.125])


def test_consistency_loss_masked_means():
    logits = torch.tensor([[0.0, LN2, LN3], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    targets = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    is_p = torch.tensor([True, False, True])
    l_p, l_u = consistency_loss(logits, targets, is_p)
    ce0 = -(0.5 * math.log(1 / 6) + 0.5 * math.log(3 / 6))
    ce2 = -float(torch.log_softmax(logits[2].double(), 0)[1])
    assert _close(l_p, (ce0 + ce2) / 2)
    # U row: softmax = uniform 1/3 vs one-hot [1,0,0] -> ((2/3)^2 + 2*(1/3)^2)/3 = 2/9
    assert _close(l_u, 2 / 9)


def test_consistency_loss_empty_p_or_u_gives_zero():
    logits = torch.randn(3, 4)
    targets = torch.softmax(torch.randn(3, 4), 1)
    l_p, l_u = consistency_loss(logits, targets, torch.zeros(3, dtype=torch.bool))
    assert float(l_p) == 0.0 and float(l_u) > 0.0
    l_p, l_u = consistency_loss(logits, targets, torch.ones(3, dtype=torch.bool))
    assert float(l_u) == 0.0 and float(l_p) > 0.0


# ----------------------------------------------------------------------------- prototypes
def test_prototype_alignment_loss_hand_computation():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    is_p = torch.tensor([True, False, True])
    temp, u_weight = 0.3, 0.5

    def sim(r):
        logits = [sum(a * b for a, b in zip(z[r].tolist(), o)) / temp for o in protos.tolist()]
        e = [math.exp(v) for v in logits]
        return [v / sum(e) for v in e]

    def kl(r):
        s = sim(r)
        return sum(t * (math.log(t) - math.log(si)) for t, si in zip(targets[r].tolist(), s) if t > 0)

    s1 = sim(1)
    se = sum((a - b) ** 2 for a, b in zip(s1, targets[1].tolist())) / 3
    expected = (kl(0) + kl(2)) / 2 + u_weight * se
    got = prototype_alignment_loss(z, protos, targets, is_p, temp, u_weight)
    assert _close(got, expected, 1e-5)
    # Perfect agreement on P (target = s) and no U rows -> 0
    s = torch.softmax(z @ protos.t() / temp, 1)
    assert _close(prototype_alignment_loss(z, protos, s, torch.ones(3, dtype=torch.bool), temp),
                  0.0, 1e-6)


# ----------------------------------------------------------------------------- contrastive
# 3 anchors: a0 label 0 in P, a1 label 0 in U, a2 label 1 in P.
# Queue: slot 0 label 0 in P, slot 1 empty (label -1).
# Columns: 0..2 queries, 3..5 own second views, 6..7 queue.
A_LAB = torch.tensor([0, 0, 1])
A_P = torch.tensor([True, False, True])
Q_LAB = torch.tensor([0, -1])
Q_P = torch.tensor([True, False])


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_contrastive_masks_noisy_rules():
    pos, kept = contrastive_masks(A_LAB, A_P, Q_LAB, Q_P, noisy=True)
    assert pos.shape == kept.shape == (3, 8)
    assert pos.dtype == torch.bool and kept.dtype == torch.bool
    # a0 (P, label 0): own view 3 and P same-label queue key 6 are positives; same-label U keys
    # 1 and 4 are dropped; label-1 keys 2, 5 are negatives; self 0 and empty slot 7 excluded.
    # a1 (U, label 0): only its own view 4 is positive; every other same-label key (0, 3, 6)
    # is dropped; negatives 2, 5 kept.
    # a2 (P, label 1): own view 5 positive; every label-0 key is a negative.
    exp_pos = _bool([[0, 0, 0, 1, 0, 0, 1, 0],
                     [0, 0, 0, 0, 1, 0, 0, 0],
                     [0, 0, 0, 0, 0, 1, 0, 0]])
    exp_kept = _bool([[0, 0, 1, 1, 0, 1, 1, 0],
                      [0, 0, 1, 0, 1, 1, 0, 0],
                      [1, 1, 0, 1, 1, 1, 1, 0]])
    assert torch.equal(pos, exp_pos)
    assert torch.equal(kept, exp_kept)


def test_contrastive_masks_plain_supcon():
    pos, kept = contrastive_masks(A_LAB, A_P, Q_LAB, Q_P, noisy=False)
    exp_pos = _bool([[0, 1, 0, 1, 1, 0, 1, 0],
                     [1, 0, 0, 1, 1, 0, 1, 0],
                     [0, 0, 0, 0, 0, 1, 0, 0]])
    exp_kept = _bool([[0, 1, 1, 1, 1, 1, 1, 0],
                      [1, 0, 1, 1, 1, 1, 1, 0],
                      [1, 1, 0, 1, 1, 1, 1, 0]])
    assert torch.equal(pos, exp_pos)
    assert torch.equal(kept, exp_kept)


@pytest.mark.parametrize("noisy", [True, False])
def test_contrastive_masks_positives_are_kept(noisy):
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (6,), generator=g)
    is_p = torch.rand(6, generator=g) < 0.5
    qlab = torch.randint(-1, 3, (10,), generator=g)
    qp = torch.rand(10, generator=g) < 0.5
    pos, kept = contrastive_masks(lab, is_p, qlab, qp, noisy=noisy)
    assert not (pos & ~kept).any()
    assert pos[:, 6:12].diagonal().all()  # own view always positive
    assert not kept[:, :6].diagonal().any()  # the anchor itself never


def _loop_contrastive(q, keys, pos, kept, temp):
    q, keys = q.double(), keys.double()
    total = 0.0
    for i in range(q.shape[0]):
        sims = [float(q[i] @ keys[j]) / temp for j in range(keys.shape[0])]
        denom = sum(math.exp(s) for j, s in enumerate(sims) if kept[i, j])
        terms = [-(sims[j] - math.log(denom)) for j in range(keys.shape[0]) if pos[i, j]]
        total += sum(terms) / len(terms) if terms else 0.0
    return total / q.shape[0]


@pytest.mark.parametrize("noisy", [True, False])
def test_noisy_contrastive_loss_matches_loop(noisy):
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    k2 = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=1)
    keys = torch.cat([q, k2, queue])
    pos, kept = contrastive_masks(A_LAB, A_P, Q_LAB, Q_P, noisy=noisy)
    temp = 0.07
    got = noisy_contrastive_loss(q, keys, pos, kept, temp)
    assert _close(got, _loop_contrastive(q, keys, pos, kept, temp), 1e-4)


def test_noisy_contrastive_loss_anchor_without_positives_contributes_zero():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    pos = _bool([[0, 0, 1, 0], [0, 0, 0, 0]])
    kept = _bool([[0, 1, 1, 1], [1, 0, 1, 1]])
    temp = 0.5
    got = noisy_contrastive_loss(q, keys, pos, kept, temp)
    s = [0.0 / temp, 0.6 / temp, 0.8 / temp]  # anchor 0 against keys 1, 2, 3
    expected_a0 = -(s[1] - math.log(sum(math.exp(v) for v in s)))
    assert _close(got, expected_a0 / 2, 1e-5)
    assert _close(got, _loop_contrastive(q, keys, pos, kept, temp), 1e-5)
