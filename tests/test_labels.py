"""Hand-checked tests for coreg_ray/coreg/labels.py (paper-method.md, "Training")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coreg_ray.coreg.labels import (candidate_agreement, classwise_minmax, co_pseudo_labels, distribution_alignment,
                                    gmm_clean_probability, mask_to_candidates, minmax_normalize,
                                    mixup, sharpen, update_prototypes)


def _close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- alignment
def test_distribution_alignment_hand_values():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    mean = probs.mean(0)  # [0.7, 0.3]
    got = distribution_alignment(probs, mean)
    # row 0: [0.5/1.4, 0.5/0.6] ∝ [3, 7]; row 1: [0.9/1.4, 0.1/0.6] ∝ [27, 7]
    assert _close(got, [[0.3, 0.7], [27 / 34, 7 / 34]])


def test_distribution_alignment_uniform_mean_is_identity():
    probs = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), 1)
    assert _close(distribution_alignment(probs, torch.full((4,), 0.25)), probs)


def test_sharpen_hand_values():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
    got = sharpen(p, 0.5)
    assert _close(got, [[1 / 17, 16 / 17], [0.5, 0.5], [0.0, 1.0]])
    assert _close(sharpen(p[:2], 1.0), p[:2])


def test_minmax_normalize():
    assert _close(minmax_normalize(torch.tensor([2.0, 4.0, 6.0, 3.0])), [0.0, 0.5, 1.0, 0.25])
    flat = minmax_normalize(torch.tensor([3.0, 3.0]))
    assert torch.isfinite(flat).all() and _close(flat, [0.0, 0.0])


def test_classwise_minmax_per_group():
    x = torch.tensor([1.0, 3.0, 2.0, 10.0, 20.0, 7.0])
    cls = torch.tensor([0, 0, 0, 2, 2, 3])  # class 1 is empty; class 3 is a singleton
    got = classwise_minmax(x, cls, 4)
    assert torch.isfinite(got).all()
    assert _close(got, [0.0, 1.0, 0.5, 0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- GMM split
def test_gmm_low_loss_cluster_is_clean():
    rng = np.random.default_rng(0)
    low = rng.normal(0.1, 0.03, 60)
    high = rng.normal(0.9, 0.03, 40)
    losses = np.concatenate([high[:20], low, high[20:]])
    w = gmm_clean_probability(losses)
    assert w.shape == (100,)
    is_low = losses < 0.5
    assert (w[is_low] > 0.5).all()
    assert (w[~is_low] < 0.5).all()
    assert ((w >= 0) & (w <= 1)).all()


def test_gmm_degenerate_inputs_all_clean():
    assert np.array_equal(gmm_clean_probability(np.full(10, 0.3)), np.ones(10))
    assert np.array_equal(gmm_clean_probability(np.array([0.7])), np.ones(1))


# ----------------------------------------------------------------------------- pseudo-labels
def test_mask_to_candidates():
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    cand = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    got = mask_to_candidates(probs, cand)
    # row 1 has no mass on its set -> uniform over the set
    assert _close(got, [[0.0, 0.6, 0.4], [0.0, 0.5, 0.5]])


def test_co_pseudo_labels_p_and_u_rows():
    peer_scores = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    peer_probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2]])
    own_probs = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])
    cand = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    w = torch.tensor([0.25, 0.9])
    is_p = torch.tensor([True, False])
    got = co_pseudo_labels(peer_scores, peer_probs, own_probs, cand, w, is_p, T=0.5)
    # P row: q = [0.4, 0, 0.6]; t = 0.25*q + 0.75*own = [0.55, 0.15, 0.30]; squared, normalised
    t_p = np.array([0.55, 0.15, 0.30]) ** 2
    # U row: (peer + own)/2 = [0.2, 0.5, 0.3], ignoring w and the candidates
    t_u = np.array([0.2, 0.5, 0.3]) ** 2
    assert _close(got, np.stack([t_p / t_p.sum(), t_u / t_u.sum()]), 1e-5)


def test_co_pseudo_labels_w_one_gives_masked_peer():
    peer_scores = torch.tensor([[0.2, 0.5, 0.3]])
    cand = torch.tensor([[1.0, 0.0, 1.0]])
    got = co_pseudo_labels(peer_scores, torch.rand(1, 3), torch.rand(1, 3), cand,
                           torch.ones(1), torch.tensor([True]), T=1.0)
    assert _close(got, [[0.4, 0.0, 0.6]], 1e-6)


def test_co_pseudo_labels_u_in_candidates_masks_only_u_rows():
    peer_scores = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    peer_probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2]])
    own_probs = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])
    cand = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    w = torch.tensor([0.25, 0.9])
    is_p = torch.tensor([True, False])
    got = co_pseudo_labels(peer_scores, peer_probs, own_probs, cand, w, is_p, T=1.0,
                           u_in_candidates=True)
    # P row as without the switch (T=1): 0.25*[0.4, 0, 0.6] + 0.75*[0.6, 0.2, 0.2]
    # U row: mean [0.2, 0.5, 0.3] masked to {0, 2} -> [0.4, 0, 0.6]; the off-set class 1 is gone
    assert _close(got, [[0.55, 0.15, 0.30], [0.4, 0.0, 0.6]], 1e-6)


def test_candidate_agreement_compares_argmax_inside_the_set():
    cand = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    peer = torch.tensor([[0.05, 0.8, 0.15], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    own = torch.tensor([[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.9, 0.02, 0.08]])
    # row 0: peer's overall argmax (class 1) is off the set; inside it both pick 2 -> agree
    # row 1: peer picks 0, own picks 2 -> disagree; row 2: inside {1, 2} both pick 2 -> agree
    assert candidate_agreement(peer, own, cand).tolist() == [True, False, True]


# ----------------------------------------------------------------------------- mixup
@pytest.mark.parametrize("lam,expected", [(0.3, 0.7), (0.8, 0.8), (0.5, 0.5)])
def test_mixup_uses_max_lambda(lam, expected):
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    t = torch.eye(3)
    perm = torch.tensor([2, 0, 1])
    mx, mt = mixup(x, t, lam, perm)
    assert _close(mx, expected * x + (1 - expected) * x[perm], 1e-5)
    assert _close(mt, expected * t + (1 - expected) * t[perm], 1e-6)
    # Each row stays dominated by its own target.
    assert (mt.argmax(1) == torch.arange(3)).all() or expected == 0.5


# ----------------------------------------------------------------------------- prototypes
def _loop_prototypes(protos, z, labels, mask, gamma):
    o = protos.double().clone()
    for i in range(z.shape[0]):
        if mask[i]:
            c = int(labels[i])
            o[c] = gamma * o[c] + (1 - gamma) * z[i].double()
    norm = o.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return o / norm


@pytest.mark.parametrize("gamma", [0.5, 0.999])
def test_update_prototypes_matches_sequential_loop(gamma):
    g = torch.Generator().manual_seed(3)
    protos = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    protos[3] = 0.0  # a class never seen yet: stays zero
    z = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    labels = torch.tensor([1, 0, 1, 2, 1, 3])  # class 1 three times (one masked out)
    mask = torch.tensor([True, True, True, False, True, False])  # class 2 and 3 samples masked
    got = update_prototypes(protos, z, labels, mask, gamma)
    expected = _loop_prototypes(protos, z, labels, mask, gamma)
    assert _close(got, expected, 1e-5)
    assert _close(got[2], protos[2], 1e-6)  # masked-out sample leaves its class unchanged
    assert _close(got[3], torch.zeros(5))  # zero prototype, nothing added


def test_update_prototypes_from_zero_start_two_samples_same_class():
    protos = torch.zeros(2, 2)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    gamma = 0.5
    got = update_prototypes(protos, z, labels, torch.ones(2, dtype=torch.bool), gamma)
    # o = 0.5*(0.5*[1,0]) + 0.5*[0,1] = [0.25, 0.5] -> normalised [1, 2]/sqrt(5)
    assert _close(got[0], [1 / 5 ** 0.5, 2 / 5 ** 0.5], 1e-6)
    assert _close(got[1], [0.0, 0.0])
