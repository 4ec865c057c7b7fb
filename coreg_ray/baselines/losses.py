"""Losses and label updates of the baselines as pure functions of tensors.

Conventions as in `coreg_ray.coreg.losses`: `logits` [B, C], `candidates` [B, C] in {0, 1},
confidences/targets [B, C] rows summing to 1. Every function here has a unit test in
`tests/test_baseline_losses.py` that checks it against a hand computation on a tiny tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coreg_ray.coreg.losses import partial_ce


def cc_loss(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """CC (Feng et al., NeurIPS 2020, "Provably consistent partial-label learning"): the mean
    over the batch of -log sum_{j in S} p_j."""
    return partial_ce(logits, candidates).mean()


# ------------------------------------------------------------------ confidence-weighted CE
def uniform_confidence(candidates: torch.Tensor) -> torch.Tensor:
    """Initial confidences of PRODEN, RC and CR-DPLL: uniform over each candidate set, zero
    outside it. Every row must have at least one candidate."""
    cand = (candidates > 0).float()
    return cand / cand.sum(1, keepdim=True)


def weighted_ce_loss(logits: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """The loss of PRODEN (Lv et al., ICML 2020) and RC (Feng et al., NeurIPS 2020): the mean
    over the batch of -sum_j w_j log p_j, with the confidences `w` treated as constants."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(confidence.detach() * logp).sum(1).mean()


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` over the True entries of each row of `mask`, zero elsewhere; a row
    with no True entry gives all zeros (not NaN)."""
    masked = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(masked, dim=1)
    return torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))


@torch.no_grad()
def candidate_confidence(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The PRODEN / RC confidence update: the model's softmax restricted to the candidate set
    and renormalised, w_j = p_j [j in S] / sum_{k in S} p_k (computed as a softmax over the
    candidates' logits, so it never divides by an underflowed mass). Detached."""
    return _masked_softmax(logits.float(), candidates > 0)


# ------------------------------------------------------------------------------------ LWS
def lws_init(candidates: torch.Tensor) -> torch.Tensor:
    """LWS's initial weights (authors' code): 1/C for every class, candidate or not."""
    return torch.full_like(candidates, 1.0 / candidates.shape[1], dtype=torch.float32)


def sigmoid_loss(z: torch.Tensor) -> torch.Tensor:
    """The sigmoid loss phi(z) = 1 / (1 + exp(z)) = sigmoid(-z) (in (0, 1), bounded)."""
    return torch.sigmoid(-z)


def lws_loss(logits: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """LWS-sigmoid (Wen et al., ICML 2021, "Leveraged weighted loss for partial label
    learning"): the mean over the batch of
        sum_{j in S} w_j phi(z_j) + beta * sum_{j not in S} w_j phi(-z_j),
    with `z` the raw logits, phi the sigmoid loss and the weights `w` treated as constants."""
    z = logits.float()
    cand = (candidates > 0).float()
    w = weights.detach()
    pos = (w * cand * sigmoid_loss(z)).sum(1)
    neg = (w * (1 - cand) * sigmoid_loss(-z)).sum(1)
    return (pos + beta * neg).mean()


@torch.no_grad()
def lws_weights(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The LWS weight update: the softmax renormalised over the candidates on the candidates,
    plus the softmax renormalised over the non-candidates on the non-candidates (so each part
    sums to 1; the non-candidate part is zero when every class is a candidate). Detached."""
    cand = candidates > 0
    z = logits.float()
    return _masked_softmax(z, cand) + _masked_softmax(z, ~cand)


# -------------------------------------------------------------------------------- CR-DPLL
def complementary_loss(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """CR-DPLL's supervised term (Wu, Wang & Zhang, ICML 2022; authors' code): the mean over
    the batch of -sum_{j not in S} log(1 - p_j), each non-candidate pushed to zero on its own
    (1 - p clamped at 1e-7 as the authors' `log(1.0000001 - p)` does)."""
    p = F.softmax(logits.float(), dim=1)
    non = (candidates <= 0).float()
    return -(non * torch.log((1.0 - p).clamp_min(1e-7))).sum(1).mean()


def kl_to_confidence(logits: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """KL(q || p) summed over classes, averaged over the batch (PyTorch's KLDivLoss with
    reduction='batchmean', the authors' consistency term); 0 log 0 = 0, q constant."""
    q = confidence.detach()
    logp = F.log_softmax(logits.float(), dim=1)
    return (torch.xlogy(q, q) - q * logp).sum(1).mean()


@torch.no_grad()
def cr_confidence(view_logits, candidates: torch.Tensor) -> torch.Tensor:
    """CR-DPLL's confidence update: the normalised geometric mean over the K views of the
    softmax, restricted to the candidate set, q_j ∝ [j in S] prod_v p_vj^(1/K) (computed in log
    space: a softmax over the candidates of the views' mean log-probability). Detached."""
    mean_logp = torch.stack([F.log_softmax(z.float(), dim=1) for z in view_logits]).mean(0)
    return _masked_softmax(mean_logp, candidates > 0)


def linear_ramp(epoch: int, ramp_epochs: int, value: float) -> float:
    """min(epoch / ramp_epochs, 1) * value (epoch counted from 0); `value` at once when
    ramp_epochs <= 0. CR-DPLL's lambda(t) = min(t / 100 * lam, lam)."""
    if ramp_epochs <= 0:
        return float(value)
    return float(min(epoch / ramp_epochs, 1.0) * value)


# ------------------------------------------------------------------------------------- KD
def kd_loss(logits: torch.Tensor, soft_targets: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Distillation from the annotator's probabilities without labels (Hinton et al., 2015):
    the mean over the batch of -T^2 sum_j t'_j log softmax(z / T)_j, where t' = t^(1/T)
    renormalised (the annotator's distribution at temperature T, i.e. softmax(log t / T)).
    T = 1 is the plain soft cross-entropy to t."""
    t = soft_targets.float().clamp_min(0)
    if temperature != 1.0:
        t = t.pow(1.0 / temperature)
    t = t / t.sum(1, keepdim=True).clamp_min(1e-12)
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    return -(temperature ** 2) * (t * logp).sum(1).mean()
