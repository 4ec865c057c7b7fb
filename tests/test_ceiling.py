"""The true-labels ceiling (issue 24 part 3): the method row `true_labels`, the setting kind
`true_labels: {}`, and how a table shows them."""
import numpy as np
import pytest

from coreg_ray.data import synthetic_annotations, true_label_annotations
from coreg_ray.errors import CoregError
from coreg_ray.experiment import Experiment, format_table
from coreg_ray.methods import run_method
from tests.conftest import tiny_config


def test_true_label_sets_are_the_labels_one_each():
    ann = true_label_annotations(np.array(["a", "b", "c"], object), np.array([2, 0, 2]), 3)
    assert ann.candidates.tolist() == [[False, False, True], [True, False, False],
                                       [False, False, True]]
    assert list(ann.ids) == ["a", "b", "c"]  # ids kept as given
    with pytest.raises(CoregError, match="needs labelled images"):
        true_label_annotations(np.arange(3), None, 3, "pool/")


def test_true_labels_ignores_the_setting_and_equals_warmup_only_on_the_labels(digits):
    """The ceiling is warm-up-only trained on the true labels, whatever the setting's sets:
    bit-identical to warmup_only given true-label sets, unlike warmup_only on noisy sets."""
    train, test = digits
    train = train.subset(np.arange(300))
    cfg = tiny_config(**{"model.backbone": "tiny_cnn", "train.epochs": 2,
                         "train.warmup_epochs": 1})
    noisy = synthetic_annotations(train.ids, train.labels, 10, q=0.6, eta=0.5, seed=3)
    ceiling = run_method("true_labels", cfg, train, noisy, test)
    exact = run_method("warmup_only", cfg, train,
                       true_label_annotations(train.ids, train.labels, 10), test)
    noisy_run = run_method("warmup_only", cfg, train, noisy, test)
    assert ceiling["test_accuracy"] == exact["test_accuracy"]
    assert [h.get("loss") for h in ceiling["history"]] == [h.get("loss") for h in exact["history"]]
    assert [h.get("loss") for h in ceiling["history"]] != [h.get("loss") for h in noisy_run["history"]]


def _exp(methods, settings, shots=(0,)):
    return {"name": "t", "data": {"images": "digits:train", "test_images": "digits:test"},
            "settings": settings, "methods": list(methods), "shots": list(shots),
            "seeds": [0], "config": {"model": {"backbone": "mlp"}}}


def test_the_ceiling_row_runs_once_per_shots_grid_with_its_config():
    exp = Experiment.load(_exp(["true_labels", "coreg"],
                               [{"name": "A", "synthetic": {"q": 0.3, "eta": 0.1}}], [0, 1, 4]))
    runs = exp.runs()
    ceil = [r for r in runs if r["method"] == "true_labels"]
    assert len(ceil) == 1 and ceil[0]["shots"] == 0
    assert len([r for r in runs if r["method"] == "coreg"]) == 3
    # a training run: its config is part of its fingerprint (zero_shot's is not)
    changed = Experiment.load(_exp(["true_labels"], [{"name": "A", "synthetic": {"q": 0.3, "eta": 0.1}}]),
                              overrides=["train.epochs=7"])
    assert changed.runs()[0]["fingerprint"] != ceil[0]["fingerprint"]


def test_the_true_labels_setting_kind_is_a_column_of_one_element_sets(digits):
    from coreg_ray.experiment.driver import build_annotations

    exp = Experiment.load(_exp(["warmup_only"], [{"name": "true labels", "true_labels": {}}]))
    s = exp.settings[0]
    assert s.kind == "true_labels" and "ceiling" in s.describe_annotator()
    train, test = digits
    ann, test_ann = build_annotations(s, train, test)
    assert (ann.candidates.sum(1) == 1).all()
    assert (ann.candidates.argmax(1) == train.labels).all()
    assert (test_ann.candidates.argmax(1) == test.labels).all()
    with pytest.raises(CoregError, match="unknown key"):
        Experiment.load(_exp(["warmup_only"], [{"name": "x", "true_labels": {"q": 1}}]))


def test_the_ceiling_is_shown_but_never_bold():
    rows = [{"method": "true_labels", "setting": "A", "seed": 0, "test_accuracy": 0.9},
            {"method": "coreg", "setting": "A", "seed": 0, "test_accuracy": 0.6},
            {"method": "cc", "setting": "A", "seed": 0, "test_accuracy": 0.5}]
    t = format_table(rows, ["true_labels", "coreg", "cc"], ["A"])
    assert t.rows[0] == "True labels (ceiling)"
    assert t.cells[("True labels (ceiling)", "A")]["text"] == "90.0"
    assert t.best == {("Co-Reg", "A")}
    assert "| True labels (ceiling) | 90.0 |" in t.markdown
