"""The two registries of issue 13 (item 4): methods (`coreg_ray.method_registry`) and annotators
(`coreg_ray.annotate.registry`)."""
import numpy as np
import pytest

from coreg_ray.annotate.protocol import Annotator
from coreg_ray.annotate.registry import (annotator_class, annotator_kind, annotator_prefixes,
                                         make_annotator)
from coreg_ray.errors import CoregError
from coreg_ray.method_registry import KINDS, register_method, registered
from coreg_ray.methods import COREG_VARIANTS, FEWSHOT, describe, method_info, method_names


def test_every_method_is_registered_once_with_a_label_and_a_description():
    names = method_names()
    assert len(names) == len(set(names))
    assert names == [i.name for i in registered()]  # method_names() is the registry's keys
    for name in names:
        info = method_info(name)
        assert info.name == name and info.kind in KINDS
        assert info.label.strip() and info.description.strip(), name
        assert describe(name) == info.description
    kinds = {k: [i.name for i in registered(k)] for k in KINDS}
    assert kinds["annotator"] == ["zero_shot"]
    assert {"coreg", "warmup_only", "dividemix"} <= set(kinds["coreg"])
    assert {"cc", "proden", "rc", "lws", "cr_dpll", "kd_unsup", "pico", "pico_plus",
            "alim_onehot", "alim_scale"} == set(kinds["baseline"])
    assert kinds["fewshot"] == ["coop", "lora"]


def test_the_old_tables_are_views_of_the_registry():
    from coreg_ray.baselines import METHODS, Method
    from coreg_ray.experiment.table import SHORT_LABELS, method_label

    assert list(COREG_VARIANTS) == [i.name for i in registered("coreg")]
    assert COREG_VARIANTS["warmup_only"][1] is None
    assert "coreg.lambda_u=25" in COREG_VARIANTS["dividemix"][1]
    assert FEWSHOT["coop"].startswith("CoOp")
    assert all(isinstance(cls, type) and issubclass(cls, Method) and cls.name == n
               for n, cls in METHODS.items())
    assert set(SHORT_LABELS) == set(method_names())
    assert method_label("pico_plus") == "PiCO+" and method_label("no_such_method") == "no_such_method"


def test_a_name_registers_once_and_the_kind_is_checked():
    with pytest.raises(ValueError, match="twice"):
        register_method("coreg", label="again", kind="coreg", description="again")
    with pytest.raises(ValueError, match="kind"):
        register_method("a_new_method", label="x", kind="nonsense", description="x")
    with pytest.raises(CoregError, match="unknown method 'nope'"):
        method_info("nope")


@pytest.mark.parametrize("spec, cls_name", [
    ("clip:ViT-B-32/random", "ClipAnnotator"),
    ("llava:llava-hf/llava-1.5-7b-hf", "LlavaAnnotator"),
    ("simulated:vlm", "SimulatedVLM"),
    ("simulated:paper,like=clip-vitb32/gtsrb", "PaperLikeAnnotator"),
])
def test_each_prefix_resolves_to_its_class_without_loading(spec, cls_name):
    assert annotator_class(spec).__name__ == cls_name  # imports the module, loads no model
    assert hasattr(annotator_class(spec), "annotate_batch")
    assert annotator_kind(spec).pipeline == (cls_name in ("ClipAnnotator", "LlavaAnnotator"))


def test_unknown_and_malformed_specs_are_one_line_errors():
    assert {"clip", "llava", "simulated"} <= set(annotator_prefixes())
    assert annotator_prefixes(pipeline=True) == ["clip", "llava"]
    with pytest.raises(CoregError, match="unknown kind"):
        make_annotator("blip:whatever")
    with pytest.raises(CoregError, match="KEY=VALUE"):
        make_annotator("simulated:vlm,colour=red")
    with pytest.raises(CoregError, match="missing"):
        make_annotator("simulated:paper,partial_acc=0.5")
    with pytest.raises(CoregError, match="simulated:vlm"):
        make_annotator("simulated:other")


def test_pipeline_runs_only_its_kinds():
    from coreg_ray.annotate.pipeline import _annotator_kind

    assert _annotator_kind("clip:ViT-B-32/openai") == "clip"
    assert _annotator_kind("llava:/models/x") == "llava"
    with pytest.raises(CoregError, match="this pipeline runs"):
        _annotator_kind("simulated:vlm")


def test_simulated_annotators_follow_the_protocol_and_rebuild_from_describe(digits):
    t = digits[0]
    vlm = make_annotator("simulated:vlm,templates=3,per_class=2,seed=1")
    assert isinstance(vlm, Annotator) and vlm.load() is vlm
    assert make_annotator(vlm.describe()).describe() == vlm.describe()
    vlm.fit(t.images, t.labels, t.num_classes)
    pixels = t.images[:16].permute(0, 2, 3, 1).numpy()  # uint8 [B, H, W, 3]
    rows = vlm.annotate_batch(pixels)
    table = vlm.annotate(t.images[:16])
    np.testing.assert_array_equal(rows["votes"], table.votes)
    np.testing.assert_array_equal(rows["candidates"], table.candidates)
    paper = make_annotator("simulated:paper,like=clip-vitb32/gtsrb,templates=5")
    assert make_annotator(paper.describe()).describe() == paper.describe()
    with pytest.raises(CoregError, match="fit it"):
        make_annotator("simulated:vlm").annotate_batch(pixels)


def test_clip_and_llava_implement_the_protocol():
    from coreg_ray.annotate.clip import ClipAnnotator
    from coreg_ray.annotate.llava import LlavaAnnotator

    for cls in (ClipAnnotator, LlavaAnnotator):
        assert all(callable(getattr(cls, m, None)) for m in ("load", "annotate_batch", "describe"))


def test_make_annotator_builds_a_random_weight_clip_that_annotates_a_batch():
    pytest.importorskip("open_clip")
    ann = make_annotator("clip:ViT-S-32-alt/random", classes=["cat", "dog"],
                         templates=["a photo of a {}."], device="cpu")
    assert isinstance(ann, Annotator) and ann.load() is ann
    assert ann.describe() == "clip:ViT-S-32-alt/random"
    pixels = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    rows, direct = ann.annotate_batch(pixels), ann.annotate_pixels(pixels)
    assert rows["votes"].shape == (3, 1) and rows["candidates"].shape == (3, 2)
    for key in ("votes", "candidates", "probs"):
        np.testing.assert_array_equal(rows[key], direct[key])
