"""Pure functions of PiCO, PiCO+ and ALIM (each unit-tested in tests/test_pico_losses.py).

Contrastive keys follow PiCO's layout `[queries (B) ; keys (B) ; queue (Q)]`: column i is the
anchor itself (never used), column B+i its own key (the strong view through the momentum
encoder). Queue slots with label -1 are empty and take no part (PiCO fills them with random unit
vectors and random float labels instead, i.e. extra negatives until the queue has filled once).
Functions that reuse Co-Reg's (`coreg.labels.update_prototypes`, `coreg.labels.sharpen`,
`coreg.losses.partial_ce`, `coreg.losses.soft_cross_entropy`) are imported where used.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.coreg.losses import key_layout


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the rows where `mask` is True; 0 for an empty mask (no host sync)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------- pseudo-targets (PiCO, ALIM)
def phi_schedule(epoch: int, epochs: int, start: float = 0.95, end: float = 0.8) -> float:
    """PiCO's moving-average coefficient phi, linear in the epoch from `start` to `end`."""
    return start + (end - start) * epoch / max(epochs, 1)


def alim_weights(candidates: torch.Tensor, lam: float) -> torch.Tensor:
    """ALIM's adjusted label set S + lambda * (1 - S); lambda = 0 gives PiCO's S."""
    return candidates + lam * (1.0 - candidates)


def onehot_target(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """onehot(argmax_j scores_j * weights_j): PiCO's (weights = S) and ALIM-Onehot's target."""
    return F.one_hot((scores * weights).argmax(1), scores.shape[1]).to(scores.dtype)


def scaled_target(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """scores * weights renormalised per row: ALIM-Scale's soft target. A row with no mass
    falls back to weights / sum(weights)."""
    t = scores * weights
    s = t.sum(1, keepdim=True)
    fallback = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.where(s > 1e-12, t / s.clamp_min(1e-12), fallback)


def ema_target(confidence: torch.Tensor, target: torch.Tensor, phi: float) -> torch.Tensor:
    """s <- phi * s + (1 - phi) * target (PiCO Eq. 8)."""
    return phi * confidence + (1.0 - phi) * target


def uniform_over_candidates(candidates: torch.Tensor) -> torch.Tensor:
    """PiCO's initial pseudo-target: uniform over each row's candidate set."""
    return candidates / candidates.sum(1, keepdim=True).clamp_min(1.0)


def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor, temperature: float = 1.0):
    """softmax(z . prototypes^T / T) over classes. PiCO/PiCO+ use T = 1 (only the argmax
    matters there, and PiCO+ sharpens it further); ALIM's 'vMF' uses T = 0.07."""
    return F.softmax(z.float() @ prototypes.float().t() / temperature, dim=1)


# ----------------------------------------------------------------- contrastive
def pico_contrastive_masks(labels: torch.Tensor, queue_labels: torch.Tensor,
                           supervised: bool = True):
    """Positive and denominator masks [B, 2B+Q] of PiCO's contrastive loss.

    supervised (after `prot_start`): SupCon, positives = every valid key with the anchor's
    pseudo-label (its own key included), denominator = every valid key but the anchor itself.
    Otherwise (PiCO's warm-up): MoCo, positive = own key, denominator = own key + queue."""
    b = labels.shape[0]
    key_labels, valid, self_, own = key_layout(labels, queue_labels)
    if supervised:
        kept = valid[None, :] & ~self_
        pos = (labels[:, None] == key_labels[None, :]) & kept
        return pos, kept
    queue_cols = torch.zeros_like(valid)
    queue_cols[2 * b:] = True
    return own, own | (queue_cols & valid)[None, :]


def pico_plus_masks(labels, is_rel, queue_labels, queue_rel, knn_index=None):
    """PiCO+'s masks [B, 2B+Q] for its reliable/kNN contrastive term.

    A reliable anchor's positives: keys with its pseudo-label that are themselves reliable
    (row- and column-wise removal of unreliable samples). An unreliable anchor's positives:
    its own key only, or, once kNN starts (`knn_index` [B, k] column indices), its k nearest
    keys. Every anchor's own key is positive. Denominator: every valid key but the anchor."""
    key_labels, valid, self_, own = key_layout(labels, queue_labels)
    key_rel = torch.cat([is_rel, is_rel, queue_rel])
    kept = valid[None, :] & ~self_
    pos = (labels[:, None] == key_labels[None, :]) & kept & is_rel[:, None] & key_rel[None, :]
    if knn_index is not None:
        knn = torch.zeros_like(pos).scatter_(1, knn_index, True) & kept
        pos = torch.where(is_rel[:, None], pos, knn)
    return pos | own, kept


def knn_index(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of each query's k most cosine-similar keys (PiCO+), empty slots excluded.
    The anchor itself is among them (as in PiCO+); the masks drop it."""
    sim = (q.float() @ keys.float().t()).masked_fill(~valid[None, :], float("-inf"))
    return sim.topk(min(k, keys.shape[0]), dim=1).indices


def supcon_per_anchor(q: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, kept: torch.Tensor,
                      temperature: float = 0.07) -> torch.Tensor:
    """Per-anchor SupCon loss: mean over positives of -log(exp(q.k+/T) / sum_kept exp(q.k/T)).
    (PiCO's temperature / base_temperature factor is 1 at its defaults, 0.07 / 0.07.)"""
    logits = q.float() @ keys.float().t() / temperature
    logits = logits - logits.detach().amax(1, keepdim=True)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~kept, float("-inf")), 1, keepdim=True)
    pos_f = pos.float()
    return -(log_prob.masked_fill(~pos, 0.0) * pos_f).sum(1) / pos_f.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------- PiCO+ selection
def prototype_distance(z: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor):
    """PiCO+'s per-sample distance -z . mu_y to the prototype of label y (the classifier's
    candidate-restricted prediction): small = near its prototype = likely clean."""
    return -(z.float() * prototypes.float()[labels]).sum(1)


def select_reliable(dist: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the int(N * ratio) samples with the smallest distance (PiCO+'s reliable
    set; `pure_ratio`)."""
    n = dist.shape[0]
    chosen = torch.argsort(dist)[:int(n * ratio)]
    rel = torch.zeros(n, dtype=torch.bool, device=dist.device)
    rel[chosen] = True
    return rel


def mixup_batch(x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor):
    """MixUp with a batch permutation as partners, lam' = max(lam, 1 - lam) (PiCO+, ALIM)."""
    lam = max(lam, 1.0 - lam)
    return lam * x + (1.0 - lam) * x[perm], lam * targets + (1.0 - lam) * targets[perm]


# ----------------------------------------------------------------- ALIM's lambda
def candidate_margin(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """ALIM's per-sample max_{j in S} p_j / max_{j not in S} p_j (1e-9 guards an all-class set).
    A sample's onehot target leaves its set exactly when margin < lambda."""
    best_in = (scores * candidates).amax(1)
    best_out = (scores * (1.0 - candidates)).amax(1)
    return best_in / (best_out + 1e-9)


def alim_lambda(margin: torch.Tensor, noise_level: float, max_lambda: float = 1.0) -> float:
    """ALIM's adaptive lambda ('piror_auto case1'): the noise-level quantile of the margins,
    sorted(margin)[int(N * noise)], so that about a `noise_level` fraction of samples has
    margin below lambda, i.e. a non-candidate beats the candidates; capped at `max_lambda`
    (their `--max1`). Noise level 0 gives 0 (PiCO)."""
    if noise_level <= 0 or margin.numel() == 0:
        return 0.0
    m = torch.sort(margin.float().flatten()).values
    k = min(int(m.numel() * noise_level), m.numel() - 1)
    return float(min(m[k].item(), max_lambda))


def estimate_noise_level(losses, seed: int = 0) -> float:
    """Fraction of samples a 2-component GMM on per-sample partial losses
    (-log sum_{j in S} p_j) assigns to the high-loss component (clean posterior < 0.5).
    ALIM takes the noise level as given; here it is estimated from the data."""
    from coreg_ray.coreg.labels import gmm_clean_probability

    x = np.asarray(losses.detach().cpu() if torch.is_tensor(losses) else losses, np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return 0.0
    clean = gmm_clean_probability(x, max_iter=20, seed=seed)
    return float((clean < 0.5).mean())
