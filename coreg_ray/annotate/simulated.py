"""A simulated annotator with the annotation statistics of the paper's VLMs (a STAND-IN, not a VLM).

`PaperLikeAnnotator` produces candidate sets whose partial accuracy (truth in the set), average
set size ("Avg. num") and vote-ensemble zero-shot accuracy match given targets: a preset of the
paper's Tables I-II (`PaperLikeAnnotator.like("clip-vitb32", "gtsrb")`) or explicit numbers.
Every result that uses it must say "simulated annotator".

How it uses the true labels (it is a simulation):
1. A look-alike model. A multinomial logistic regression on coarse image features (8x8 pixels,
   or the frozen patch encoder of `coreg_ray.data.patches`) is fitted on the true labels with
   2-fold cross-fitting, so each training image gets a held-out class distribution r(x). Its
   off-truth mass says which classes an image looks like (a "speed limit 30" sign looks like
   other red-ringed speed limits), its truth mass how easy the image is to recognise.
2. Templates. Each of K templates (27 for CLIP's small template list, 5 for LLaVA's prompts)
   votes for the truth with probability sigmoid(a + s * e(x)), where e(x) is the standardised
   held-out logit of the true class; otherwise it votes for a wrong class drawn from r(x)
   restricted to the wrong classes and sharpened with temperature tau. So mistakes depend on the
   image, fall on classes that look alike, and are shared by the templates of one image (as
   one VLM's templates share its encoder); nothing is a per-class flip matrix.
3. The union of the K votes is the candidate set; `probs` (the mean template probabilities) is
   0.9 x the vote histogram + 0.1 x r(x) over the voted classes, so the ensemble argmax is the
   plurality vote with look-alike tie-breaking.
4. Calibration. (a, s, tau) are found on the table being fitted (common random numbers,
   Nelder-Mead) so its three statistics land on the targets; the same (a, s, tau) annotate any
   other table (e.g. the test split), whose statistics then follow from its own images.
Reproducible from `seed`; seconds to a couple of minutes on 2 cores (pixels).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from coreg_ray.annotate.protocol import FittedAnnotator, nchw, table_rows
from coreg_ray.data.annotations import AnnotationTable
from coreg_ray.data.ids import as_ids
from coreg_ray.errors import CoregError

# The paper's annotation statistics (Tables I-II, "Partial Acc.", "Avg. num", "Zero-Shot (train)"),
# and the number of prompt templates of each annotator.
PAPER_ANNOTATORS = {
    "clip-vitb32": {"templates": 27, "stats": {
        "cifar10": (0.9521, 1.39, 0.8840), "cifar100": (0.7850, 2.36, 0.6183),
        "svhn": (0.3839, 2.41, 0.0934), "fmnist": (0.7765, 1.58, 0.6257),
        "eurosat": (0.6711, 3.26, 0.3226), "gtsrb": (0.4178, 2.84, 0.2487)}},
    "clip-vitb16": {"templates": 27, "stats": {
        "cifar10": (0.9556, 1.31, 0.8963), "cifar100": (0.8215, 2.05, 0.6528),
        "svhn": (0.5884, 2.23, 0.3619), "fmnist": (0.8803, 2.00, 0.6682),
        "eurosat": (0.6596, 2.91, 0.3572), "gtsrb": (0.4145, 2.67, 0.3241)}},
    "llava-1.5": {"templates": 5, "stats": {
        "cifar10": (0.9483, 1.12, 0.8964), "cifar100": (0.6023, 1.34, 0.4943),
        "svhn": (0.8274, 2.40, 0.5194), "fmnist": (0.5403, 1.80, 0.4693),
        "eurosat": (0.6326, 1.85, 0.4477), "gtsrb": (0.4645, 2.67, 0.3736)}},
}
MIX = 0.9  # weight of the vote histogram in `probs` (the rest: look-alike scores over the votes)


def preset_names() -> list[str]:
    return [f"{a}/{d}" for a, p in PAPER_ANNOTATORS.items() for d in p["stats"]]


def paper_targets(like: str, dataset: str) -> tuple[int, tuple[float, float, float]]:
    """(templates, (partial accuracy, average set size, zero-shot accuracy)) of a preset."""
    if like not in PAPER_ANNOTATORS:
        raise CoregError(f"unknown annotator preset '{like}' (known: {', '.join(PAPER_ANNOTATORS)})")
    stats = PAPER_ANNOTATORS[like]["stats"]
    if dataset not in stats:
        raise CoregError(f"annotator preset '{like}' has no dataset '{dataset}' (known: "
                         f"{', '.join(stats)})")
    return PAPER_ANNOTATORS[like]["templates"], stats[dataset]


def _stable_seed(*parts) -> list[int]:
    h = hashlib.sha256(repr(parts).encode()).digest()
    return [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]


def vote_statistics(votes: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict:
    """Partial accuracy, average set size and ensemble accuracy of [N, K] votes."""
    n, c = probs.shape
    cand = np.zeros((n, c), bool)
    cand[np.repeat(np.arange(n), votes.shape[1]), votes.reshape(-1)] = True
    return {"partial_accuracy": float(cand[np.arange(n), labels].mean()),
            "avg_candidates": float(cand.sum(1).mean()),
            "ensemble_accuracy": float((probs.argmax(1) == labels).mean())}


def draw_votes(lookalike: np.ndarray, ease: np.ndarray, labels: np.ndarray, a: float, s: float,
               tau: float, u_right: np.ndarray, u_wrong: np.ndarray):
    """The templates' votes and mean probabilities (see the module doc, steps 2-3).

    lookalike [N, C] held-out class distribution r(x); ease [N] standardised truth logit; the
    uniform draws u_right, u_wrong [N, K] fix the randomness (calibration reuses them)."""
    n, c = lookalike.shape
    rows = np.arange(n)
    # clipped: exp(710) overflows (a warning, and p = 0 either way)
    p_right = 1.0 / (1.0 + np.exp(-np.clip(a + s * ease, -700.0, 700.0)))  # [N]
    logr = np.log(np.clip(lookalike, 1e-12, None)) / tau
    logr[rows, labels] = -np.inf
    wrong = np.exp(logr - logr.max(1, keepdims=True))
    cdf = np.cumsum(wrong / wrong.sum(1, keepdims=True), 1)
    cdf[:, -1] = 1.0
    # inverse-CDF draw of a wrong class per template: count the classes whose cdf is below u
    wrong_votes = (cdf[:, None, :] < u_wrong[:, :, None]).sum(2)
    wrong_votes = np.minimum(wrong_votes, c - 1)
    votes = np.where(u_right < p_right[:, None], labels[:, None], wrong_votes)
    hist = np.zeros((n, c))
    np.add.at(hist, (np.repeat(rows, votes.shape[1]), votes.reshape(-1)), 1.0)
    voted = hist > 0
    tie = np.where(voted, lookalike, 0.0)
    probs = MIX * hist / votes.shape[1] + (1 - MIX) * tie / tie.sum(1, keepdims=True)
    return votes, probs


class PaperLikeAnnotator(FittedAnnotator):
    """See the module doc. `fit(images, labels, C)` then `annotate(images, labels, ids)`."""

    def __init__(self, partial_acc: float, avg_candidates: float, zero_shot: float,
                 templates: int = 27, features: str = "pixels", seed: int = 0, name: str = ""):
        for what, v in (("partial accuracy", partial_acc), ("zero-shot accuracy", zero_shot)):
            if not 0.0 < v < 1.0:
                raise CoregError(f"simulated annotator: {what} must be in (0, 1), got {v}")
        if zero_shot > partial_acc:
            raise CoregError(f"simulated annotator: zero-shot accuracy {zero_shot} cannot exceed "
                             f"the partial accuracy {partial_acc} (the ensemble votes inside the set)")
        if not isinstance(templates, int) or templates < 1:
            raise CoregError(f"simulated annotator: templates must be a positive integer, got {templates!r}")
        if not 1.0 <= avg_candidates <= templates:
            raise CoregError(f"simulated annotator: average set size must be in [1, templates="
                             f"{templates}], got {avg_candidates}")
        if features not in ("pixels", "patches"):
            raise CoregError(f"simulated annotator: features must be pixels or patches, got {features!r}")
        self.targets = (float(partial_acc), float(avg_candidates), float(zero_shot))
        self.templates, self.features, self.seed, self.name = templates, features, seed, name
        self.params = None  # (a, s, tau) after fit

    @classmethod
    def like(cls, preset: str, dataset: str, features: str = "pixels", seed: int = 0):
        k, targets = paper_targets(preset, dataset)
        return cls(*targets, templates=k, features=features, seed=seed, name=f"{preset}/{dataset}")

    @classmethod
    def from_options(cls, options: dict, preset: tuple[str, str] | None = None,
                     preset_words: str = "like=PRESET/DATASET"):
        """The annotator an experiment setting or a `simulated:paper` spec asks for: a `preset`
        (annotator, dataset), whose targets and template count are the defaults, or the three
        targets `partial_acc`, `avg_candidates`, `zero_shot` in `options`; `options` may also
        set `templates` (default 27 without a preset), `features` and `seed`. `preset_words`
        names the preset in the error for missing targets (as the caller's user writes it)."""
        o = options
        if preset is not None:
            k, (pa, avg, zs) = paper_targets(*preset)
            name = "/".join(preset)
        else:
            missing = [m for m in ("partial_acc", "avg_candidates", "zero_shot") if m not in o]
            if missing:
                raise CoregError(f"give a preset ({preset_words}) or all three targets partial_acc, "
                                 f"avg_candidates, zero_shot (missing: {', '.join(missing)})")
            k, pa, avg, zs, name = 27, None, None, None, ""
        return cls(float(o.get("partial_acc", pa)), float(o.get("avg_candidates", avg)),
                   float(o.get("zero_shot", zs)), int(o.get("templates", k)),
                   o.get("features", "pixels"), int(o.get("seed", 0)), name)

    @property
    def spec(self) -> str:
        p, a, z = self.targets
        what = f"like={self.name}," if self.name else ""
        return (f"simulated-paper-annotator:{what}partial_acc={p},avg_candidates={a},zero_shot={z},"
                f"templates={self.templates},features={self.features},seed={self.seed}")

    # ---------------------------------------------------------------------- look-alike model
    def _features(self, images: torch.Tensor, fit: bool) -> np.ndarray:
        if self.features == "pixels":
            x = images.float() / 255.0
            x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
            f = x.flatten(1).numpy()
            if fit:
                self._mu, self._sd = f.mean(0), f.std(0) + 1e-6
            return (f - self._mu) / self._sd
        from coreg_ray.data.patches import PatchFeatures
        if fit:
            self.encoder = PatchFeatures(seed=self.seed)
            return self.encoder.fit_transform(images)
        return self.encoder.transform(images)

    def _lookalike_fit(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(_stable_seed(self.seed, "folds"))
        fold = rng.permutation(len(labels)) % 2
        out = np.zeros((len(labels), self.num_classes))
        self.models = []
        for k in range(2):
            fit_rows = fold != k
            with warnings.catch_warnings():  # a look-alike model: 200 iterations are plenty
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(max_iter=200, C=0.1).fit(feats[fit_rows], labels[fit_rows])
            self.models.append(clf)
            out[np.ix_(~fit_rows, clf.classes_)] = clf.predict_proba(feats[~fit_rows])
        return out

    def _lookalike(self, feats: np.ndarray) -> np.ndarray:
        out = np.zeros((len(feats), self.num_classes))
        for clf in self.models:
            out[:, clf.classes_] += clf.predict_proba(feats) / len(self.models)
        return out

    def _ease(self, lookalike: np.ndarray, labels: np.ndarray) -> np.ndarray:
        p = np.clip(lookalike[np.arange(len(labels)), labels], 1e-6, 1 - 1e-6)
        logit = np.log(p) - np.log1p(-p)
        if not hasattr(self, "_ease_stats"):
            self._ease_stats = (float(logit.mean()), float(logit.std() + 1e-6))
        m, sd = self._ease_stats
        return np.clip((logit - m) / sd, -4.0, 4.0)

    # ---------------------------------------------------------------------- fit = calibrate
    def fit(self, images: torch.Tensor, labels: np.ndarray, num_classes: int,
            calibration_rows: int = 6000) -> "PaperLikeAnnotator":
        from scipy.optimize import minimize

        if labels is None:
            raise CoregError("the simulated annotator needs an image table with labels (it "
                             "simulates a VLM's mistakes around the true labels)")
        labels = np.asarray(labels, np.int64)
        self.num_classes = num_classes
        feats = self._features(images, fit=True)
        self._fit_images = images
        self._fit_lookalike = self._lookalike_fit(feats, labels)
        ease = self._ease(self._fit_lookalike, labels)
        rng = np.random.default_rng(_stable_seed(self.seed, "calibrate"))
        rows = rng.permutation(len(labels))[:calibration_rows]
        r, e, y = self._fit_lookalike[rows], ease[rows], labels[rows]
        u1, u2 = rng.random((len(rows), self.templates)), rng.random((len(rows), self.templates))
        tp, ta, tz = self.targets

        def stats(theta):
            a, log_s, log_tau = theta
            votes, probs = draw_votes(r, e, y, a, np.exp(log_s), np.exp(log_tau), u1, u2)
            return vote_statistics(votes, probs, y)

        def objective(theta):
            st = stats(theta)
            return (((st["partial_accuracy"] - tp) / 0.01) ** 2
                    + ((st["avg_candidates"] - ta) / 0.05) ** 2
                    + ((st["ensemble_accuracy"] - tz) / 0.02) ** 2)

        best = None
        for start in ([0.0, 0.0, 0.0], [-2.0, 1.0, -1.0], [2.0, 0.5, -2.0], [-1.0, 1.5, 0.5]):
            res = minimize(objective, start, method="Nelder-Mead",
                           options={"xatol": 1e-3, "fatol": 1e-3, "maxiter": 400})
            if best is None or res.fun < best.fun:
                best = res
            if best.fun < 0.5:
                break
        a, log_s, log_tau = best.x
        self.params = (float(a), float(np.exp(log_s)), float(np.exp(log_tau)))
        self.calibration = {"rows": len(rows), "objective": float(best.fun), **stats(best.x)}
        return self

    def annotate(self, images: torch.Tensor, labels: np.ndarray, ids=None) -> AnnotationTable:
        if self.params is None:
            raise CoregError("simulated annotator: fit it before annotating")
        if labels is None:
            raise CoregError("the simulated annotator needs the images' labels (it simulates a "
                             "VLM's mistakes around the truth)")
        labels = np.asarray(labels, np.int64)
        if images is self._fit_images:
            lookalike = self._fit_lookalike  # held-out (cross-fitted) for the fitted images
        else:
            lookalike = self._lookalike(self._features(images, fit=False))
        n = len(labels)
        ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, self.spec)
        rng = np.random.default_rng(_stable_seed(self.seed, "votes", n, ids[:64].tolist()))
        u1, u2 = rng.random((n, self.templates)), rng.random((n, self.templates))
        a, s, tau = self.params
        votes, probs = draw_votes(lookalike, self._ease(lookalike, labels), labels, a, s, tau, u1, u2)
        cand = np.zeros((n, self.num_classes), bool)
        cand[np.repeat(np.arange(n), self.templates), votes.reshape(-1)] = True
        meta = {"annotator": self.spec, "simulated": True, "num_classes": self.num_classes,
                "calibrated": {"a": a, "s": s, "tau": tau}}
        return AnnotationTable(ids, cand, votes, probs.astype(np.float32), meta)

    def annotate_batch(self, pixels, *, labels=None, ids=None, **_) -> dict:
        """The `Annotator` protocol: uint8 [B, H, W, 3] and their true `labels` -> votes,
        candidates, probs."""
        self._fitted()
        return table_rows(self.annotate(nchw(pixels), labels, ids))


def lookalike_share(ann: AnnotationTable, labels: np.ndarray, groups: dict[str, list[int]]) -> dict:
    """How many wrong votes fall in the true class's own group (e.g. GTSRB's speed limits), vs
    the share uniform wrong votes would give: evidence that mistakes go to look-alike classes."""
    labels = np.asarray(labels)
    c = ann.num_classes
    group_of = np.full(c, -1)
    for g, members in enumerate(groups.values()):
        group_of[members] = g
    v = ann.votes
    y = np.repeat(labels[:, None], v.shape[1], 1)
    wrong = (v != y) & (v >= 0)
    same = group_of[v] == group_of[y]
    sizes = np.bincount(group_of[group_of >= 0], minlength=len(groups))
    # uniform over the C-1 wrong classes: (|group(y)| - 1) / (C - 1)
    uniform = np.where(group_of[labels] >= 0, (sizes[group_of[labels]] - 1) / (c - 1), 0.0)
    return {"wrong_votes": int(wrong.sum()),
            "same_group_share": float(same[wrong].mean()) if wrong.any() else float("nan"),
            "uniform_share": float(np.repeat(uniform[:, None], v.shape[1], 1)[wrong].mean())
            if wrong.any() else float("nan")}


# GTSRB's sign families by class index (classes.json order): the look-alike groups.
GTSRB_GROUPS = {
    "speed limits": [0, 1, 2, 3, 4, 5, 7, 8],
    "other red-ring prohibitions": [9, 10, 15, 16, 17],
    "red-triangle warnings": [11, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
    "blue mandatory": [33, 34, 35, 36, 37, 38, 39, 40],
    "grey end-of signs": [6, 32, 41, 42],
    "unique shapes": [12], "yield": [13], "stop": [14],
}

