"""`run_method`: Co-Reg variants, DivideMix, warm-up-only and zero-shot behind one entry point."""
import math

import numpy as np
import pytest
import torch

from coreg_ray.coreg.losses import uniform_prior_penalty
from coreg_ray.data import simulate_vlm_annotator, synthetic_annotations
from coreg_ray.data.annotations import annotation_stats, ensemble_prediction
from coreg_ray.errors import CoregError
from coreg_ray.methods import describe, method_names, onehot_ensemble, run_method
from tests.conftest import tiny_config


def test_uniform_prior_penalty_by_hand():
    # p = [[.5, .5], [.25, .75]] -> mean [.375, .625];
    # .5*ln(.5/.375) + .5*ln(.5/.625) = .5*(0.2876821 - 0.2231436) = 0.0322693
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    assert uniform_prior_penalty(logits).item() == pytest.approx(0.0322693, abs=1e-6)
    assert uniform_prior_penalty(torch.tensor([[2.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_onehot_ensemble_is_the_argmax_of_mean_probs(digits):
    train, _ = digits
    ann = simulate_vlm_annotator(train.images[:200], train.labels[:200], 10, train.ids[:200],
                                 n_templates=3, per_class=2)
    one = onehot_ensemble(ann)
    assert (one.candidates.sum(1) == 1).all()
    assert (one.candidates.argmax(1) == ensemble_prediction(ann)).all()


def test_zero_shot_reports_the_annotator_on_the_test_split(digits):
    train, test = digits
    from coreg_ray.data.noise import SimulatedVLM

    vlm = SimulatedVLM(3, 2, seed=0).fit(train.images, train.labels, 10)
    test_ann = vlm.annotate(test.images, test.ids)
    out = run_method("zero_shot", tiny_config(), train, vlm.annotate(train.images, train.ids),
                     test, test_annotations=test_ann)
    assert out["test_accuracy"] == annotation_stats(test_ann, test.labels)["ensemble_accuracy"]
    assert len(out["template_accuracy"]) == 3
    with pytest.raises(CoregError, match="test images' annotation table"):
        run_method("zero_shot", tiny_config(), train, test_ann, test)
    from coreg_ray.errors import NotApplicable
    synthetic = synthetic_annotations(test.ids, test.labels, 10, q=0.3, eta=0.1)
    with pytest.raises(NotApplicable, match="candidate sets only"):
        run_method("zero_shot", tiny_config(), train, test_ann, test, test_annotations=synthetic)


@pytest.mark.parametrize("name", ["dividemix", "warmup_only", "coreg_no_copl", "coreg_no_u",
                                  "coreg_supcon", "coreg_no_proto"])
def test_coreg_variants_learn(digits, name):
    train, test = digits
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    # DivideMix keeps its own T = 0.5; the Co-Reg variants learn faster on this tiny problem
    # with sharper targets
    sharpen = 0.5 if name == "dividemix" else 0.1
    cfg = tiny_config(**{"train.epochs": 9, "train.warmup_epochs": 4, "coreg.sharpen_T": sharpen})
    out = run_method(name, cfg, train, ann, test)
    # Well above chance (0.1). Not higher: on this tiny problem (1,437 digits, 5 Co-Reg epochs,
    # T 0.1) every Co-Reg variant falls from its warm-up peak (~0.77) after the warm-up, even
    # with true labels as P targets (benchmarks/accuracy_gtsrb_cpu.md, "Diagnosis"), and ends
    # at 0.3-0.5 depending on the variant.
    assert out["test_accuracy"] > 0.25, out["test_accuracy"]
    phases = {h["phase"] for h in out["history"]}
    assert phases == ({"warmup"} if name == "warmup_only" else {"warmup", "coreg"})
    assert cfg.train.warmup_epochs == 4  # the caller's config is not mutated
    last = out["history"][-1]
    if name == "dividemix":
        assert last["loss_prot"] == 0 and last["loss_cont"] == 0
    if name == "coreg_no_u":
        assert last["loss_u"] == 0


def test_onehot_of_synthetic_sets_is_a_random_candidate(digits):
    train, _ = digits
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.5, eta=0.0, seed=0)
    one = onehot_ensemble(ann, seed=0)
    picked = one.candidates.argmax(1)
    assert ann.candidates[np.arange(len(picked)), picked].all()
    # not always the lowest-index candidate: with ~5.5 candidates the truth is picked ~1/5.5
    first = ann.candidates.argmax(1)
    assert (picked != first).mean() > 0.5
    assert 0.1 < (picked == train.labels).mean() < 0.35


def test_unknown_method_names_the_known_ones(digits):
    train, test = digits
    with pytest.raises(CoregError, match="unknown method 'picoo'.*coreg"):
        run_method("picoo", tiny_config(), train, None, test)
    assert "cc" in method_names() and describe("cc").startswith("CC")


def test_variant_params_override_the_preset(digits, monkeypatch):
    """The dividemix preset sets lambda_u 25; a run's params (dotted keys) apply after it."""
    import coreg_ray.coreg.trainer as trainer_mod

    seen = {}

    class Capture:
        def __init__(self, cfg, **kw):
            seen["cfg"] = cfg
            self.history = []

        def fit(self, *a, **kw):
            return {"test_accuracy": None, "seconds": 0.0}

    monkeypatch.setattr(trainer_mod, "CoReg", Capture)
    train, test = digits
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    run_method("dividemix", tiny_config(), train, ann, test)
    assert seen["cfg"].coreg.lambda_u == 25 and seen["cfg"].coreg.prototypes is False
    run_method("dividemix", tiny_config(), train, ann, test, params={"coreg.lambda_u": 10})
    assert seen["cfg"].coreg.lambda_u == 10 and seen["cfg"].coreg.prototypes is False
    with pytest.raises(CoregError, match="dotted config keys"):
        run_method("dividemix", tiny_config(), train, ann, test, params={"lambda_u": 10})
