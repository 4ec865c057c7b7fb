"""The paper-statistics simulated annotator: it lands on its targets, its mistakes depend on the
image and fall on look-alike classes, and it is reproducible from its seed."""
from pathlib import Path

import numpy as np
import pytest

from coreg_ray.annotate.simulated import (GTSRB_GROUPS, PaperLikeAnnotator, draw_votes,
                                          lookalike_share, paper_targets, vote_statistics)
from coreg_ray.data import annotation_stats, load_image_table
from coreg_ray.errors import CoregError

GTSRB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gtsrb32"


def _check(ann, labels, targets, tol=(0.02, 0.15, 0.05)):
    st = annotation_stats(ann, labels)
    got = (st["partial_accuracy"], st["avg_candidates"], st["ensemble_accuracy"])
    for g, t, d in zip(got, targets, tol):
        assert abs(g - t) <= d, (got, targets)
    return st


def test_draw_votes_hand_case():
    # one image, truth 0; look-alike mass all on class 2; p_right = sigmoid(a) with s = 0
    r = np.array([[0.5, 0.0, 0.5]])
    u_right = np.array([[0.1, 0.9]])  # template 1 right (0.1 < 0.5), template 2 wrong
    u_wrong = np.array([[0.3, 0.3]])
    votes, probs = draw_votes(r, np.zeros(1), np.array([0]), 0.0, 1.0, 1.0, u_right, u_wrong)
    assert votes.tolist() == [[0, 2]]
    # 0.9 x histogram/2 + 0.1 x look-alike over the voted classes {0, 2} (0.5, 0.5 -> 0.5 each)
    assert np.allclose(probs, [[0.5, 0.0, 0.5]])
    st = vote_statistics(votes, probs, np.array([0]))
    assert st == {"partial_accuracy": 1.0, "avg_candidates": 2.0, "ensemble_accuracy": 1.0}


def test_draw_votes_extreme_ease_is_quiet_and_exact():
    # calibration can push a + s * ease far past exp's range: no overflow warning, and the
    # hardest image is never voted right, the easiest always
    r = np.array([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])
    u = np.full((2, 3), 1e-9)
    with np.errstate(over="raise"):
        votes, _ = draw_votes(r, np.array([-1.0, 1.0]), np.array([0, 0]), 0.0, 1e4, 1.0, u, u)
    assert votes.tolist() == [[2, 2, 2], [0, 0, 0]]


def test_explicit_targets_on_digits(digits):
    train, test = digits
    targets = (0.70, 2.0, 0.50)
    sim = PaperLikeAnnotator(*targets, templates=8, seed=0).fit(train.images, train.labels, 10)
    ann = sim.annotate(train.images, train.labels, train.ids)
    _check(ann, train.labels, targets)
    assert ann.meta["simulated"] and "simulated-paper-annotator" in ann.meta["annotator"]
    # the test split is annotated with the same calibration (its own images decide the numbers)
    test_ann = sim.annotate(test.images, test.labels, test.ids)
    _check(test_ann, test.labels, targets, tol=(0.08, 0.3, 0.1))


def test_mistakes_depend_on_the_image_not_only_the_class(digits):
    train, _ = digits
    sim = PaperLikeAnnotator(0.6, 2.0, 0.45, templates=8, seed=0).fit(train.images, train.labels, 10)
    ann = sim.annotate(train.images, train.labels, train.ids)
    cand, y = ann.candidates, train.labels
    for c in range(10):
        rows = cand[y == c]
        # within one true class: some images' sets hold the truth and some don't, and the wrong
        # candidates differ from image to image (no per-class flip)
        assert 0 < rows[:, c].mean() < 1
        wrong = rows[~rows[:, c]]
        assert len({tuple(np.flatnonzero(r)) for r in wrong}) >= 3
    # easy images (the look-alike model's confidence) keep the truth more often
    p = sim._fit_lookalike[np.arange(len(y)), y]
    truth_in = cand[np.arange(len(y)), y]
    assert truth_in[p > np.median(p)].mean() > truth_in[p <= np.median(p)].mean() + 0.2


def test_reproducible_from_the_seed(digits):
    train, _ = digits
    a = PaperLikeAnnotator(0.7, 2.0, 0.5, templates=6, seed=3).fit(train.images, train.labels, 10)
    b = PaperLikeAnnotator(0.7, 2.0, 0.5, templates=6, seed=3).fit(train.images, train.labels, 10)
    c = PaperLikeAnnotator(0.7, 2.0, 0.5, templates=6, seed=4).fit(train.images, train.labels, 10)
    va = a.annotate(train.images, train.labels, train.ids).votes
    assert np.array_equal(va, b.annotate(train.images, train.labels, train.ids).votes)
    assert not np.array_equal(va, c.annotate(train.images, train.labels, train.ids).votes)


def test_presets_and_bad_targets():
    assert paper_targets("clip-vitb32", "gtsrb") == (27, (0.4178, 2.84, 0.2487))
    assert paper_targets("llava-1.5", "gtsrb")[0] == 5
    with pytest.raises(CoregError, match="unknown annotator preset"):
        paper_targets("gpt-4v", "gtsrb")
    with pytest.raises(CoregError, match="has no dataset"):
        paper_targets("clip-vitb32", "imagenet")
    with pytest.raises(CoregError, match="cannot exceed"):
        PaperLikeAnnotator(0.4, 2.0, 0.5)
    with pytest.raises(CoregError, match="average set size"):
        PaperLikeAnnotator(0.4, 9.0, 0.3, templates=5)


@pytest.mark.slow
@pytest.mark.skipif(not GTSRB.exists(), reason="GTSRB table not next to the checkout")
@pytest.mark.parametrize("like", ["clip-vitb32", "llava-1.5"])
def test_gtsrb_presets_land_on_the_paper_and_confuse_look_alikes(like):
    train = load_image_table(str(GTSRB / "train.parquet"), None, 4000)
    sim = PaperLikeAnnotator.like(like, "gtsrb").fit(train.images, train.labels, 43)
    ann = sim.annotate(train.images, train.labels, train.ids)
    _check(ann, train.labels, sim.targets)
    share = lookalike_share(ann, train.labels, GTSRB_GROUPS)
    # wrong votes name a sign of the same family (another speed limit, another warning
    # triangle, ...) far more often than uniform wrong votes would
    assert share["same_group_share"] > 2 * share["uniform_share"]
