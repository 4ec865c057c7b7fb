"""Candidate-set logic of CLIP annotation: pure functions of tensors (no model, no Ray).

Shapes: B images, K templates, C classes, D embedding dims.

- `template_probs(r, t)`: p[b,k,:] = softmax(scale * r_b . t_{k,c}) over classes (paper §III).
- `template_votes(p)`: the argmax class of every template -> int64 [B, K].
- `union_candidates(votes, C)`: the paper's candidate set: the union of the template votes.
- `mean_probs(p)`: the template ensemble (single-label baselines, KD).
- `topk_candidates(mean, k)`, `threshold_candidates(mean, p)`, `ratio_candidates(mean, r)`:
  alternative candidate rules on the ensemble; never empty (the ensemble argmax is always in).
- `candidates_from(p, mode)`: dispatch on a mode string: "union" | "topk:K" | "threshold:P" |
  "ratio:R" (class kept when its mean probability >= R * the top one, as the authors'
  `prob_ratio_thres` option).

Every function accepts torch tensors or NumPy arrays and returns torch tensors.
"""
from __future__ import annotations

import torch

from coreg_ray.errors import CoregError

DEFAULT_LOGIT_SCALE = 100.0


def _t(x, dtype=None) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if dtype is None else x.to(dtype)


def normalize(x, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    x = _t(x)
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def template_logits(image_emb, text_emb, scale: float = DEFAULT_LOGIT_SCALE,
                    normalized: bool = True) -> torch.Tensor:
    """image_emb [B, D], text_emb [K, C, D] -> scale * cosine similarity, float32 [B, K, C].
    With normalized=False both sides are L2-normalised first."""
    r, t = _t(image_emb).float(), _t(text_emb).float()
    if t.ndim != 3 or r.ndim != 2 or r.shape[1] != t.shape[2]:
        raise CoregError(f"embedding shapes do not match: images {tuple(r.shape)}, "
                         f"text {tuple(t.shape)} (want [B,D] and [K,C,D])")
    if not normalized:
        r, t = normalize(r), normalize(t)
    return scale * torch.einsum("bd,kcd->bkc", r, t)


def template_probs(image_emb, text_emb, scale: float = DEFAULT_LOGIT_SCALE,
                   normalized: bool = True) -> torch.Tensor:
    """Per-template class probabilities float32 [B, K, C]."""
    return template_logits(image_emb, text_emb, scale, normalized).softmax(-1)


def template_votes(probs) -> torch.Tensor:
    """int64 [B, K]: each template's argmax class (ties -> the lowest class index)."""
    return _t(probs).argmax(-1)


def union_candidates(votes, num_classes: int) -> torch.Tensor:
    """bool [B, C]: the classes voted for by at least one template; votes of -1 are ignored."""
    v = _t(votes, torch.int64)
    if v.numel() and (v.max() >= num_classes or v.min() < -1):
        raise CoregError(f"votes outside -1..{num_classes - 1}")
    out = torch.zeros(v.shape[0], num_classes + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(v < 0, num_classes, v), True)  # -1 -> a spare column
    return out[:, :num_classes]


def mean_probs(probs) -> torch.Tensor:
    """float32 [B, C]: the template ensemble (mean over templates)."""
    return _t(probs).float().mean(1)


def _with_argmax(mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask[torch.arange(len(mean)), mean.argmax(1)] = True
    return mask


def topk_candidates(mean, k: int) -> torch.Tensor:
    """bool [B, C]: the k most probable classes of the ensemble (k clipped to C)."""
    m = _t(mean).float()
    if k < 1:
        raise CoregError(f"topk: k must be >= 1, got {k}")
    k = min(int(k), m.shape[1])
    out = torch.zeros_like(m, dtype=torch.bool)
    out.scatter_(1, m.topk(k, dim=1).indices, True)
    return out


def threshold_candidates(mean, threshold: float) -> torch.Tensor:
    """bool [B, C]: classes with ensemble probability >= threshold; the argmax is always kept,
    so no set is empty."""
    m = _t(mean).float()
    if not 0.0 <= threshold <= 1.0:
        raise CoregError(f"threshold must be within 0..1, got {threshold}")
    return _with_argmax(m >= threshold, m)


def ratio_candidates(mean, ratio: float) -> torch.Tensor:
    """bool [B, C]: classes whose ensemble probability is >= ratio * the largest one."""
    m = _t(mean).float()
    if not 0.0 < ratio <= 1.0:
        raise CoregError(f"ratio must be within (0, 1], got {ratio}")
    return _with_argmax(m >= ratio * m.max(1, keepdim=True).values, m)


def parse_candidate_mode(mode: str | None) -> tuple[str, float | None]:
    """"union" | "topk:K" | "threshold:P" | "ratio:R" -> (name, value)."""
    mode = (mode or "union").strip()
    name, _, arg = mode.partition(":")
    name = name.lower()
    if name == "union":
        if arg:
            raise CoregError(f"candidate mode {mode!r}: 'union' takes no value")
        return "union", None
    if name not in ("topk", "threshold", "ratio"):
        raise CoregError(f"candidate mode {mode!r}: use union, topk:K, threshold:P or ratio:R")
    try:
        value = int(arg) if name == "topk" else float(arg)
    except ValueError:
        raise CoregError(f"candidate mode {mode!r}: {name} needs a "
                         f"{'whole number' if name == 'topk' else 'number'} after ':'") from None
    if name == "topk" and value < 1:
        raise CoregError(f"candidate mode {mode!r}: k must be >= 1")
    if name == "threshold" and not 0 <= value <= 1:
        raise CoregError(f"candidate mode {mode!r}: the threshold must be within 0..1")
    if name == "ratio" and not 0 < value <= 1:
        raise CoregError(f"candidate mode {mode!r}: the ratio must be within (0, 1]")
    return name, value


def candidates_from(probs, mode: str = "union") -> torch.Tensor:
    """Candidate sets bool [B, C] from per-template probabilities [B, K, C]."""
    p = _t(probs).float()
    name, value = parse_candidate_mode(mode)
    if name == "union":
        return union_candidates(template_votes(p), p.shape[-1])
    m = mean_probs(p)
    if name == "topk":
        return topk_candidates(m, int(value))
    if name == "threshold":
        return threshold_candidates(m, value)
    return ratio_candidates(m, value)


def annotate_probs(probs, mode: str = "union") -> dict:
    """Everything an annotator emits for a batch, as NumPy: votes int64 [B,K], candidates
    bool [B,C], probs (the template mean) float32 [B,C]."""
    p = _t(probs).float()
    return {"votes": template_votes(p).numpy(),
            "candidates": candidates_from(p, mode).numpy(),
            "probs": mean_probs(p).numpy()}
