"""The weak-template stand-in for a VLM annotator (`simulated:vlm`; moved here from
`coreg_ray.data.noise`, which still re-exports it).

`SimulatedVLM` / `simulate_vlm_annotator`: an offline STAND-IN for a VLM annotator. It is not a
VLM. K weak "template" classifiers (multinomial logistic regression), each fitted on a small,
different random slice of the labelled images and on a different random subset of the
features, vote on every image; the union of the K argmax votes is the candidate set and their
mean probabilities are `probs`. Like prompt templates of one VLM, the templates share most of
their knowledge and their mistakes depend on the image, so the noise is instance-dependent.
Features: `pixels` (coarse 8x8 pixels; enough for digits) or `patches` (a frozen, label-free
single-layer patch encoder, `coreg_ray.data.patches`: the analogue of a VLM's frozen image
encoder with linear read-outs; use it for natural images such as CIFAR).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.annotate.protocol import FittedAnnotator, nchw, table_rows
from coreg_ray.data.annotations import AnnotationTable
from coreg_ray.errors import CoregError


def coarse_features(images: torch.Tensor, side: int = 8) -> np.ndarray:
    """uint8 [N,3,H,W] -> standardised [N, 3*side*side] area-downsampled pixels."""
    x = images.float() / 255.0
    if x.shape[-1] != side:
        x = F.adaptive_avg_pool2d(x, side)
    f = x.flatten(1).numpy()
    return (f - f.mean(0)) / (f.std(0) + 1e-6)


class SimulatedVLM(FittedAnnotator):
    """See module doc: K weak template classifiers standing in for a VLM's prompt templates."""

    FEATURES = ("pixels", "patches")
    # logistic-regression inverse regularisation per feature kind: 192 standardised pixels vs
    # 1,024 patch codes, which need a stronger penalty with ~10 images per class (0.01 is the
    # value of the CIFAR probes in benchmarks/accuracy_cifar_cpu.md; not tuned further)
    C = {"pixels": 1.0, "patches": 0.01}

    def __init__(self, n_templates: int = 8, per_class: int = 10, feature_fraction: float = 0.5,
                 seed: int = 0, features: str = "pixels"):
        if features not in self.FEATURES:
            raise CoregError(f"simulated VLM: features must be one of {', '.join(self.FEATURES)}, "
                             f"got {features!r}")
        self.n_templates, self.per_class = n_templates, per_class
        self.feature_fraction, self.seed, self.features = feature_fraction, seed, features
        self.templates = []
        self._last = None  # (images tensor, its features): fit then annotate the same images

    @property
    def spec(self) -> str:
        return (f"simulated-vlm:templates={self.n_templates},per_class={self.per_class},"
                f"feature_fraction={self.feature_fraction},seed={self.seed},"
                f"features={self.features}")

    def _features(self, images: torch.Tensor, fit: bool = False) -> np.ndarray:
        if self.features == "pixels":
            return coarse_features(images)
        if fit:
            from coreg_ray.data.patches import PatchFeatures

            self.encoder = PatchFeatures(seed=self.seed)
            feats = self.encoder.fit_transform(images)
        elif self._last is not None and self._last[0] is images:
            feats = self._last[1]
        else:
            feats = self.encoder.transform(images)
        self._last = (images, feats)
        return feats

    def fit(self, images: torch.Tensor, labels: np.ndarray, num_classes: int) -> "SimulatedVLM":
        from sklearn.linear_model import LogisticRegression

        if labels is None:
            raise CoregError("simulate-annotator needs an image table with labels (it is a "
                             "stand-in fitted on a few labelled images per template)")
        labels = np.asarray(labels, np.int64)
        rng = np.random.default_rng(self.seed)
        feats = self._features(images, fit=True)
        d = feats.shape[1]
        self.num_classes = num_classes
        by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.templates = []
        for _ in range(self.n_templates):
            rows = np.concatenate([rng.choice(ix, min(self.per_class, len(ix)), replace=False)
                                   for ix in by_class if len(ix)])
            cols = rng.choice(d, max(1, int(round(self.feature_fraction * d))), replace=False)
            clf = LogisticRegression(max_iter=300, C=self.C[self.features]).fit(
                feats[rows][:, cols], labels[rows])
            self.templates.append((cols, clf))
        return self

    def annotate(self, images: torch.Tensor, ids=None) -> AnnotationTable:
        feats = self._features(images)
        n, k, c = len(feats), len(self.templates), self.num_classes
        votes = np.empty((n, k), np.int64)
        probs = np.zeros((n, c))
        for t, (cols, clf) in enumerate(self.templates):
            p = np.zeros((n, c))
            p[:, clf.classes_] = clf.predict_proba(feats[:, cols])
            votes[:, t] = p.argmax(1)
            probs += p / k
        cand = np.zeros((n, c), bool)
        cand[np.repeat(np.arange(n), k), votes.reshape(-1)] = True
        from coreg_ray.data.ids import as_ids
        ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, self.spec)
        return AnnotationTable(ids, cand, votes, probs.astype(np.float32),
                               {"annotator": self.spec, "simulated": True, "num_classes": c})

    def annotate_batch(self, pixels, *, ids=None, **_) -> dict:
        """The `Annotator` protocol: uint8 [B, H, W, 3] -> votes, candidates, probs."""
        self._fitted()
        return table_rows(self.annotate(nchw(pixels), ids))


def simulate_vlm_annotator(images: torch.Tensor, labels: np.ndarray, num_classes: int,
                           ids=None, n_templates: int = 8, per_class: int = 10,
                           feature_fraction: float = 0.5, seed: int = 0,
                           features: str = "pixels") -> AnnotationTable:
    """Fit a `SimulatedVLM` on (images, labels) and annotate the same images."""
    vlm = SimulatedVLM(n_templates, per_class, feature_fraction, seed, features).fit(
        images, labels, num_classes)
    return vlm.annotate(images, ids)
