"""Label operations of Co-Reg as pure functions: alignment, sharpening, the GMM split,
co-pseudo-labels, MixUp and the momentum prototypes."""
from __future__ import annotations

import numpy as np
import torch


def distribution_alignment(probs: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """p <- p / (mean prediction / uniform), renormalised: boosts classes the net under-predicts
    over the whole set, so the division loss does not punish rare-but-true classes."""
    c = probs.shape[1]
    p = probs / (mean_probs.clamp_min(1e-12) * c)
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """p_j^(1/T) / sum_k p_k^(1/T) (paper Eq. 8), computed in log space for stability."""
    logp = torch.log(p.clamp_min(1e-12)) / T
    return torch.softmax(logp, dim=1)


def minmax_normalize(x: torch.Tensor, comm=None) -> torch.Tensor:
    """(x - min) / (max - min); with `comm`, min and max over every rank's rows."""
    lo, hi = x.min(), x.max()
    if comm is not None:
        lo, hi = comm.all_reduce_min(lo), comm.all_reduce_max(hi)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def classwise_minmax(x: torch.Tensor, classes: torch.Tensor, num_classes: int,
                     comm=None) -> torch.Tensor:
    """Min-max normalise `x` separately within each class group (classes: [N] long). Used by
    the class-balanced split: classes the net is less sure of are not all pushed into U. With
    `comm`, each class's min and max are over every rank's rows."""
    lo = torch.full((num_classes,), float("inf"), device=x.device).scatter_reduce(0, classes, x, "amin")
    hi = torch.full((num_classes,), float("-inf"), device=x.device).scatter_reduce(0, classes, x, "amax")
    if comm is not None:
        lo, hi = comm.all_reduce_min(lo), comm.all_reduce_max(hi)
    return (x - lo[classes]) / (hi[classes] - lo[classes]).clamp_min(1e-12)


def gmm_clean_probability(losses: np.ndarray, max_iter: int = 10, tol: float = 1e-2,
                          reg_covar: float = 5e-4, seed: int = 0) -> np.ndarray:
    """Fit a 2-component 1-D GMM to per-sample losses; return each sample's posterior of the
    low-mean ("clean") component. Degenerate inputs (all equal) are all clean."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses, np.float64).reshape(-1, 1)
    if len(x) < 2 or x.std() < 1e-8:
        return np.ones(len(x))
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
                          random_state=seed)
    gmm.fit(x)
    clean = int(gmm.means_.argmin())
    return gmm.predict_proba(x)[:, clean]


def mask_to_candidates(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 5: keep the mass on the candidate set, renormalise. A row with no mass on its
    set falls back to uniform over the set."""
    p = probs * candidates
    s = p.sum(1, keepdim=True)
    uniform = candidates / candidates.sum(1, keepdim=True).clamp_min(1.0)
    return torch.where(s > 1e-12, p / s.clamp_min(1e-12), uniform)


def co_pseudo_labels(peer_scores: torch.Tensor, peer_probs: torch.Tensor, own_probs: torch.Tensor,
                     candidates: torch.Tensor, w: torch.Tensor, is_p: torch.Tensor,
                     T: float, u_in_candidates: bool = False) -> torch.Tensor:
    """Targets for the net being trained (paper Eqs. 5-8), row by row.

    peer_scores: the peer's distribution-aligned prediction from its divide pass (weak view).
    peer_probs / own_probs: mean softmax over two fresh weak views of the peer / own network.
    P rows: q = peer_scores masked to the candidates and renormalised; w*q + (1-w)*own.
    U rows: (peer + own) / 2, i.e. the mean of the 4 weak-view softmaxes.
    Both sharpened with temperature T. `u_in_candidates` (not in the paper) masks the U mean
    to the candidate set too, so U rows keep the annotator's information.
    """
    q = mask_to_candidates(peer_scores, candidates)
    w = w.view(-1, 1).to(q.dtype)
    t_p = w * q + (1.0 - w) * own_probs
    t_u = 0.5 * (peer_probs + own_probs)
    if u_in_candidates:
        t_u = mask_to_candidates(t_u, candidates)
    return sharpen(torch.where(is_p.view(-1, 1), t_p, t_u), T)


def candidate_agreement(peer_probs: torch.Tensor, own_probs: torch.Tensor,
                        candidates: torch.Tensor) -> torch.Tensor:
    """[B] bool: both nets pick the same class inside the candidate set. Used (not in the paper)
    to keep only the P rows whose pseudo-label the two nets agree on."""
    pick = lambda p: p.masked_fill(candidates <= 0, -1.0).argmax(1)
    return pick(peer_probs) == pick(own_probs)


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor):
    """lam' = max(lam, 1 - lam) keeps each row dominated by its own sample (so its P/U role
    stays meaningful); partners `perm` come from the whole batch (P and U)."""
    lam = max(lam, 1.0 - lam)
    return lam * x + (1.0 - lam) * x[perm], lam * targets + (1.0 - lam) * targets[perm]


def update_prototypes(prototypes: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """o_c <- gamma*o_c + (1-gamma)*z for each masked sample in batch order (paper Eq. 11),
    vectorised: a class seen n times in the batch decays by gamma^n and sample r of it (0-based)
    enters with weight (1-gamma)*gamma^(n-1-r). The result is L2-normalised per class."""
    c = prototypes.shape[0]
    onehot = torch.nn.functional.one_hot(labels, c).to(z.dtype) * mask.view(-1, 1).to(z.dtype)
    rank = onehot.cumsum(0) - onehot  # occurrences of the same class before this sample
    count = onehot.sum(0)  # [C]
    later = (count.view(1, -1) - 1.0 - rank) * onehot  # same-class samples after this one
    weight = (1.0 - gamma) * torch.pow(torch.full_like(later, gamma), later) * onehot  # [B, C]
    new = prototypes * torch.pow(torch.full_like(count, gamma), count).view(-1, 1) + weight.t() @ z
    return torch.nn.functional.normalize(new, dim=1)
