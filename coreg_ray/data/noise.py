"""Candidate-label generators with known ground truth (the cleanlab habit).

- `synthetic_candidates`: the ALIM / Co-Reg protocol (paper §V-D): each wrong class joins the set
  with probability q; then with probability eta the true label is swapped for one class drawn
  uniformly from the non-candidates.
- `SimulatedVLM` / `simulate_vlm_annotator` (the weak-template stand-in for a VLM annotator)
  live in `coreg_ray.annotate.weak_templates`; importing them from here still works.
- `few_shot_indices` / `apply_few_shot`: k trusted true labels per class.
"""
from __future__ import annotations

import numpy as np

from coreg_ray.data.annotations import AnnotationTable
from coreg_ray.errors import CoregError


def synthetic_candidates(labels: np.ndarray, num_classes: int, q: float, eta: float,
                         seed: int = 0) -> np.ndarray:
    if not (0.0 <= q <= 1.0 and 0.0 <= eta <= 1.0):
        raise CoregError(f"synthetic labels: q and eta must be in [0, 1], got q={q}, eta={eta}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    rows = np.arange(n)
    cand = rng.random((n, num_classes)) < q
    cand[rows, labels] = True
    swap = rng.random(n) < eta
    for i in np.flatnonzero(swap):
        free = np.flatnonzero(~cand[i])
        if len(free) == 0:  # every class is a candidate: nothing to swap in
            continue
        cand[i, labels[i]] = False
        cand[i, rng.choice(free)] = True
    return cand


def synthetic_annotations(ids, labels, num_classes, q, eta, seed=0) -> AnnotationTable:
    cand = synthetic_candidates(labels, num_classes, q, eta, seed)
    return AnnotationTable(ids, cand, None, None,  # ids kept as given (int64 or str)
                           {"annotator": f"synthetic:q={q},eta={eta},seed={seed}",
                            "num_classes": num_classes})


def true_label_annotations(ids, labels, num_classes, source="images") -> AnnotationTable:
    """The true labels as one-element candidate sets: what the true-labels ceiling trains on
    (the same loss, schedule and data as the other rows, with labels as good as they get)."""
    if labels is None:
        raise CoregError(f"{source}: the true-labels ceiling needs labelled images (a 'label' "
                         "column or class sub-folders)")
    labels = np.asarray(labels, np.int64)
    cand = np.zeros((len(labels), num_classes), bool)
    cand[np.arange(len(labels)), labels] = True
    return AnnotationTable(np.asarray(ids), cand, None, None,
                           {"annotator": "true labels", "num_classes": num_classes})


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """k indices per class (fewer where a class has fewer samples), seeded."""
    if shots <= 0:
        return np.zeros(0, np.int64)
    if labels is None:
        raise CoregError("few-shot needs true labels in the image table")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), min(shots, int((labels == c).sum())),
                        replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def apply_few_shot(candidates: np.ndarray, labels: np.ndarray, index: np.ndarray):
    """Trusted samples: candidate set = the true label. Returns (candidates, trusted mask)."""
    cand = candidates.copy()
    cand[index] = False
    cand[index, labels[index]] = True
    trusted = np.zeros(len(cand), bool)
    trusted[index] = True
    return cand, trusted


_MOVED = ("SimulatedVLM", "coarse_features", "simulate_vlm_annotator")


def __getattr__(name):  # lazy re-export of what moved to coreg_ray.annotate.weak_templates
    if name in _MOVED:
        from coreg_ray.annotate import weak_templates
        return getattr(weak_templates, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
