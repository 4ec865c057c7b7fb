"""Co-Reg's losses as pure functions of tensors (each unit-tested against a hand computation).

Conventions: `logits` [B, C]; `candidates` [B, C] in {0, 1}; `targets` [B, C] rows summing to 1;
`is_p` [B] bool, True for the partial set P (trusted candidates), False for the unlabeled set U.
Masked means divide by max(count, 1) so an empty P or U gives 0 without a host sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def partial_ce(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per-sample -log sum_{j in S} f_j(x): the probability mass put on the candidate set."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -torch.logsumexp(logp.masked_fill(candidates <= 0, float("-inf")), dim=1)


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample sum_j f_j log f_j (<= 0); adding it keeps predictions from collapsing onto
    the (possibly wrong) candidates too early."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1)


def warmup_loss(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Partial CE + negative entropy, averaged over samples whose set is not every class (those
    carry no information)."""
    informative = candidates.sum(1) < candidates.shape[1]
    return _masked_mean(partial_ce(logits, candidates) + negative_entropy(logits), informative)


def division_loss(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per-sample -log max_{j in S} p_j (paper Eq. 4): small when the net agrees with the set."""
    best = probs.float().masked_fill(candidates <= 0, 0.0).amax(1)
    return -torch.log(best.clamp_min(1e-12))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_j t_j log f_j."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)


def squared_error(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean_j (p_j - t_j)^2, the noise-tolerant loss used on U. (Eq. 9 writes a sum
    over classes; the authors' code averages, which makes lambda_u = 1 mean what it does there.)"""
    return ((probs.float() - targets) ** 2).mean(1)


def uniform_prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """DivideMix's regulariser sum_c pi_c log(pi_c / pbar_c), pbar = batch-mean softmax, pi
    uniform: zero when the batch predicts every class equally often on average."""
    pbar = F.softmax(logits.float(), dim=1).mean(0)
    prior = torch.full_like(pbar, 1.0 / pbar.numel())
    return (prior * torch.log(prior / pbar.clamp_min(1e-12))).sum()


def consistency_loss(logits: torch.Tensor, targets: torch.Tensor, is_p: torch.Tensor):
    """Paper Eq. 9: (CE on P, squared error on U), each averaged over its own rows."""
    l_p = _masked_mean(soft_cross_entropy(logits, targets), is_p)
    l_u = _masked_mean(squared_error(F.softmax(logits.float(), 1), targets), ~is_p)
    return l_p, l_u


def prototype_similarity(z: torch.Tensor, prototypes: torch.Tensor, temperature: float):
    """s = softmax(z . o^T / T') over classes."""
    return F.softmax(z.float() @ prototypes.float().t() / temperature, dim=1)


def prototype_alignment_loss(z, prototypes, targets, is_p, temperature: float, u_weight: float = 1.0):
    """Paper Eq. 10: KL(target || s) on P, squared error on U (weighted by u_weight), each
    averaged over its own rows."""
    s = prototype_similarity(z, prototypes, temperature)
    kl = (targets * (torch.log(targets.clamp_min(1e-12)) - torch.log(s.clamp_min(1e-12)))).sum(1)
    return _masked_mean(kl, is_p) + u_weight * _masked_mean(squared_error(s, targets), ~is_p)


def key_layout(anchor_labels: torch.Tensor, queue_labels: torch.Tensor):
    """The MoCo/PiCO key layout `[queries (B) ; own second views (B) ; queue (Q)]`: each key's
    label, which keys exist (queue slots labelled -1 are empty), and the [B, 2B+Q] masks of each
    anchor's own column (`self_`, never used) and its own second view (`own`)."""
    b, dev = anchor_labels.shape[0], anchor_labels.device
    key_labels = torch.cat([anchor_labels, anchor_labels, queue_labels])
    valid = torch.cat([torch.ones(2 * b, dtype=torch.bool, device=dev), queue_labels >= 0])
    eye = torch.eye(b, dtype=torch.bool, device=dev)
    zeros_q = torch.zeros(b, queue_labels.shape[0], dtype=torch.bool, device=dev)
    self_ = torch.cat([eye, torch.zeros_like(eye), zeros_q], 1)
    own = torch.cat([torch.zeros_like(eye), eye, zeros_q], 1)
    return key_labels, valid, self_, own


def contrastive_masks(anchor_labels, anchor_is_p, queue_labels, queue_is_p, noisy: bool = True):
    """Positive and kept-in-denominator masks [B, 2B+Q] for `noisy_contrastive_loss`.

    Keys are laid out `[queries (B) ; own second views (B) ; queue (Q)]` (as in MoCo/PiCO):
    column i is the anchor itself (never used), column B+i its own second view (always positive).
    Queue slots with label -1 are empty. Noisy rules (paper §IV-D): positives are same-label keys
    with anchor and key both in P, plus the own view; for a P anchor, same-label keys from U are
    dropped from the denominator; for a U anchor every same-label key except its own view is
    dropped. Different-label keys are negatives. Plain SupCon (noisy=False): every same-label key
    is a positive.
    """
    key_labels, valid, self_, own = key_layout(anchor_labels, queue_labels)
    key_is_p = torch.cat([anchor_is_p, anchor_is_p, queue_is_p])
    same = (anchor_labels[:, None] == key_labels[None, :]) & valid[None, :] & ~self_
    kept = valid[None, :] & ~self_
    if not noisy:
        return same | own, kept
    ap, kp = anchor_is_p[:, None], key_is_p[None, :]
    pos = own | (same & ap & kp)
    drop = (same & ap & ~kp & ~own) | (same & ~ap & ~own)
    return pos, kept & ~drop


def noisy_contrastive_loss(q, keys, pos, kept, temperature: float):
    """Supervised contrastive loss over MoCo keys (paper Eq. 12): for each anchor, the mean over
    its positives of -log( exp(q.k+/T'') / sum_{kept} exp(q.k/T'') ). `keys` [2B+Q, d] follows
    the layout of `contrastive_masks` (queries included, so gradients reach them as keys too)."""
    logits = q.float() @ keys.float().t() / temperature
    logits = logits - logits.detach().amax(1, keepdim=True)
    log_denom = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denom
    pos_f = pos.float()
    per_anchor = -(log_prob.masked_fill(~pos, 0.0) * pos_f).sum(1) / pos_f.sum(1).clamp_min(1.0)
    return per_anchor.mean()
