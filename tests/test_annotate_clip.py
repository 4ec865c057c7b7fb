"""CLIP annotation: candidate logic on hand-made logits, templates and class names, spec parsing,
image preparation, the annotator on tiny local models, and the Ray Data pipeline end to end
(random-weight ViT-S-32-alt at 32 px on 64 CIFAR-10 images: shards, resume, report)."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coreg_ray.annotate import logic
from coreg_ray.annotate.templates import (GTSRB_NAMES, IMAGENET_TEMPLATES, SMALL_TEMPLATES,
                                          build_prompts, gtsrb_classes, load_templates,
                                          resolve_classes, resolve_templates, svhn_classes,
                                          validate_classes, validate_templates)
from coreg_ray.errors import CoregError

CIFAR = Path(os.environ.get("COREG_CIFAR10_JPEG",
                            Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg"))
SMALL_SPEC = "clip:ViT-S-32-alt/random"  # the smallest open_clip 3.3 config; 32 px = 1 patch


# ============================================================================= logic
def test_template_probs_are_softmax_of_100_cosines():
    r = torch.tensor([[1.0, 0.0]])  # one image
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],  # template 0: 3 classes
                      [[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]]])  # template 1
    p = logic.template_probs(r, t)
    assert p.shape == (1, 2, 3)
    for k, sims in enumerate(([1.0, 0.0, 0.6], [0.0, 0.8, 1.0])):
        z = sum(math.exp(100 * s) for s in sims)
        want = [math.exp(100 * s) / z for s in sims]
        assert torch.allclose(p[0, k].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # un-normalised inputs are normalised when asked
    p2 = logic.template_probs(3 * r, 2 * t, normalized=False)
    assert torch.allclose(p, p2, atol=1e-6)
    with pytest.raises(CoregError):
        logic.template_probs(torch.ones(1, 3), t)


def _hand_probs():
    # B=2 images, K=3 templates, C=4 classes
    return torch.tensor([
        [[0.70, 0.10, 0.10, 0.10], [0.20, 0.50, 0.20, 0.10], [0.60, 0.30, 0.05, 0.05]],
        [[0.10, 0.10, 0.10, 0.70], [0.10, 0.10, 0.10, 0.70], [0.25, 0.25, 0.40, 0.10]],
    ])


def test_votes_union_and_mean():
    p = _hand_probs()
    votes = logic.template_votes(p)
    assert votes.tolist() == [[0, 1, 0], [3, 3, 2]]
    cand = logic.union_candidates(votes, 4)
    assert cand.tolist() == [[True, True, False, False], [False, False, True, True]]
    mean = logic.mean_probs(p)
    assert torch.allclose(mean[0], torch.tensor([0.5, 0.3, 0.35 / 3, 0.25 / 3]), atol=1e-6)
    assert torch.equal(logic.candidates_from(p, "union"), cand)
    out = logic.annotate_probs(p.numpy())  # NumPy in, NumPy out
    assert out["votes"].dtype == np.int64 and out["candidates"].dtype == bool
    assert out["probs"].shape == (2, 4) and np.allclose(out["probs"].sum(1), 1)


def test_union_ignores_missing_votes_and_checks_range():
    cand = logic.union_candidates(np.array([[2, -1, -1], [-1, 0, 0]]), 3)
    assert cand.tolist() == [[False, False, True], [True, False, False]]
    with pytest.raises(CoregError):
        logic.union_candidates(np.array([[3]]), 3)


def test_topk_threshold_ratio_never_empty():
    mean = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.27, 0.25, 0.24, 0.24]])
    assert logic.topk_candidates(mean, 2).tolist() == [[True, True, False, False],
                                                       [True, True, False, False]]
    assert logic.topk_candidates(mean, 9).all()  # k clipped to C
    th = logic.threshold_candidates(mean, 0.28)
    assert th.tolist() == [[True, True, False, False], [True, False, False, False]]  # argmax kept
    assert logic.threshold_candidates(mean, 1.0).sum(1).tolist() == [1, 1]
    ra = logic.ratio_candidates(mean, 0.5)
    assert ra.tolist() == [[True, True, False, False], [True, True, True, True]]
    p = _hand_probs()
    assert logic.candidates_from(p, "topk:1").sum(1).tolist() == [1, 1]
    assert logic.candidates_from(p, "threshold:0.99").sum(1).tolist() == [1, 1]
    assert logic.candidates_from(p, "ratio:1").sum(1).tolist() == [1, 1]


@pytest.mark.parametrize("mode", ["topk", "topk:0", "topk:x", "threshold:2", "ratio:0", "union:3",
                                  "vote"])
def test_bad_candidate_modes(mode):
    with pytest.raises(CoregError):
        logic.parse_candidate_mode(mode)


# ============================================================================= templates, classes
def test_template_lists():
    assert len(SMALL_TEMPLATES) == 27 and len(set(SMALL_TEMPLATES)) == 27
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert SMALL_TEMPLATES[0] == "a photo of a {}" and "a bad photo of the {}." in IMAGENET_TEMPLATES
    validate_templates(SMALL_TEMPLATES + IMAGENET_TEMPLATES)
    assert resolve_templates(None) == SMALL_TEMPLATES
    assert resolve_templates("imagenet") == IMAGENET_TEMPLATES
    with pytest.raises(CoregError, match="not a file"):
        resolve_templates("nope")


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\na photo of a {}.\n\n  a sketch of the {}  \n")
    assert load_templates(f) == ["a photo of a {}.", "a sketch of the {}"]
    assert resolve_templates(str(f)) == load_templates(f)
    f.write_text("a photo of a {}.\na photo of nothing\n")
    with pytest.raises(CoregError, match=r"t.txt:2.*no '\{\}' placeholder"):
        load_templates(f)
    f.write_text("# only a comment\n")
    with pytest.raises(CoregError, match="no templates"):
        load_templates(f)
    for bad in (["a {} and {}"], ["a {name}"], ["a {"], []):
        with pytest.raises(CoregError):
            validate_templates(bad)


def test_class_helpers(tmp_path):
    assert svhn_classes() == [f"number {i}" for i in range(10)]
    g = gtsrb_classes()
    assert len(g) == 43 == len(GTSRB_NAMES) and g[14] == "German Traffic Sign: Stop"
    (tmp_path / "names.txt").write_text("Stop\nGive way\n")
    assert resolve_classes(f"gtsrb:{tmp_path / 'names.txt'}") == [
        "German Traffic Sign: Stop", "German Traffic Sign: Give way"]
    assert resolve_classes("svhn") == svhn_classes()
    assert resolve_classes(None, ["cat", "dog"]) == ["cat", "dog"]
    assert resolve_classes("prefix:a type of pet, :", ["cat"]) == ["a type of pet, cat"]
    (tmp_path / "c.json").write_text('["a", "b"]')
    assert resolve_classes(str(tmp_path / "c.json")) == ["a", "b"]
    for bad in ([], ["a", "a"], ["a", " "]):
        with pytest.raises(CoregError):
            validate_classes(bad)
    with pytest.raises(CoregError, match="no class names"):
        resolve_classes(None, None)
    assert build_prompts(["a {}.", "the {}"], ["cat", "dog"]) == [["a cat.", "a dog."],
                                                                  ["the cat", "the dog"]]


# ============================================================================= specs, images
def test_parse_clip_spec(tmp_path):
    from coreg_ray.annotate.clip import parse_clip_spec

    s = parse_clip_spec("clip:ViT-B-32")
    assert (s.model, s.kind, s.source) == ("ViT-B-32", "tag", "openai")
    s = parse_clip_spec("clip:ViT-B-32/laion2b_s34b_b79k")
    assert (s.kind, s.source) == ("tag", "laion2b_s34b_b79k")
    s = parse_clip_spec("clip:RN50/random:7")
    assert (s.kind, s.seed) == ("random", 7)
    w = tmp_path / "w.bin"
    w.write_bytes(b"x")
    s = parse_clip_spec(f"clip:ViT-B-32/{w}")
    assert (s.kind, s.source) == ("file", str(w))
    (tmp_path / "open_clip_config.json").write_text("{}")
    assert parse_clip_spec(f"clip:local-dir:{tmp_path}").open_clip_name == f"local-dir:{tmp_path}"
    assert parse_clip_spec(f"clip:ViT-B-32/local-dir:{tmp_path}").kind == "local-dir"
    assert parse_clip_spec("clip:ViT-B-32/hf-hub:org/repo").open_clip_name == "hf-hub:org/repo"
    with pytest.raises(CoregError, match="did you mean ViT-B-32"):
        parse_clip_spec("clip:ViT-B-33/openai")
    with pytest.raises(CoregError, match="neither an open_clip tag"):
        parse_clip_spec("clip:ViT-B-32/nope")
    with pytest.raises(CoregError, match="weights file not found"):
        parse_clip_spec("clip:ViT-B-32/missing/w.bin")
    with pytest.raises(CoregError, match="clip:MODEL"):
        parse_clip_spec("ViT-B-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoregError, match="no open_clip_config.json"):
        parse_clip_spec(f"clip:local-dir:{tmp_path / 'empty'}")
    with pytest.raises(CoregError, match="folder not found"):
        parse_clip_spec(f"clip:local-dir:{tmp_path / 'missing'}")


def test_missing_weights_fail_fast(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    from coreg_ray.annotate import clip

    monkeypatch.delenv(clip.ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(clip, "_hf_cached", lambda repo, files: False)
    with pytest.raises(CoregError, match="not on this machine.*downloads are off.*local-dir"):
        clip.check_weights_available("clip:ViT-B-32/openai")
    t = time.time()  # the real loading path, offline: must not retry for ~45 s
    with pytest.raises(CoregError, match="not on this machine|cannot build"):
        clip.load_clip_model("clip:ViT-B-32/openai")
    assert time.time() - t < 20
    assert clip.check_weights_available("clip:ViT-B-32/random").kind == "random"


def test_prepare_image_modes():
    from PIL import Image

    from coreg_ray.annotate.imageio import decode_batch_bytes, prepare_image

    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    for mode in ("shortest", "longest", "squash"):
        assert prepare_image(img, 32, mode).shape == (32, 32, 3)
    same = Image.fromarray(np.full((32, 32, 3), 7, np.uint8))
    assert (prepare_image(same, 32) == 7).all()
    padded = prepare_image(img, 30, "longest")  # 60x40 -> 30x20 with 5-row bands of fill
    assert (padded[:5] == 0).all() and (padded[-5:] == 0).all()
    gray = Image.fromarray(np.zeros((8, 8), np.uint8))
    assert prepare_image(gray, 8).shape == (8, 8, 3)
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    prep = {"size": 16, "resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0}
    px, err = decode_batch_bytes([buf.getvalue(), b"not an image", None], [1, 2, 3], prep)
    assert px.shape == (3, 16, 16, 3) and err[0] == "" and err[1] and err[2]


def test_actor_resources_and_error_unwrapping():
    from coreg_ray.annotate.pipeline import _coreg_cause, _resources

    class FakeRay:
        def __init__(self, res):
            self.res = res

        def cluster_resources(self):
            return self.res

    # this machine: one single-threaded actor per core (Ray's accounting keeps 1 CPU for
    # decoding, torch's threads use every core)
    r = _resources(FakeRay({"CPU": 2.0}), None, None, None)
    assert (r["gpu"], r["num_actors"], r["actor_cpus"], r["threads"]) == (False, 2, 0.5, 1)
    assert r["decode_cpus"] != r["actor_cpus"]  # never fused
    assert r["decode_tasks"] == 1  # on CPU: decode tasks only on the cores left over
    assert _resources(FakeRay({"CPU": 16.0}), None, None, None)["decode_tasks"] == 15
    r = _resources(FakeRay({"CPU": 2.0}), 1, None, None)
    assert (r["actor_cpus"], r["threads"]) == (1.0, 2)  # one actor: both cores
    r = _resources(FakeRay({"CPU": 32.0}), None, None, None)
    assert (r["num_actors"], r["threads"]) == (8, 4)  # at most 8 actors
    assert _resources(FakeRay({"CPU": 8.0}), None, 2.0, None)["threads"] == 2  # as asked
    r = _resources(FakeRay({"CPU": 16.0, "GPU": 4.0}), None, None, None)
    assert (r["gpu"], r["num_actors"], r["actor_cpus"]) == (True, 4, 1.0)
    assert r["decode_tasks"] is None  # GPU actors: as many decode tasks as Ray allows
    with pytest.raises(CoregError, match="GPU"):
        _resources(FakeRay({"CPU": 8.0, "GPU": 1.0}), 2, None, True)
    with pytest.raises(CoregError, match="no GPU"):
        _resources(FakeRay({"CPU": 8.0}), None, None, True)
    # Ray reports a failed actor constructor as text only (ActorDiedError)
    err = RuntimeError("The actor died ...\n  File x\ncoreg_ray.errors.CoregError: annotator 'a': bad")
    assert str(_coreg_cause(err)) == "annotator 'a': bad"
    assert _coreg_cause(RuntimeError("other")) is None


# ============================================================================= tiny local models
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory):
    """Two tiny CLIP models saved as open_clip local-dir folders (config + weights)."""
    open_clip = pytest.importorskip("open_clip")
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"tinyclip{seed}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.model.CLIP(**TINY_CFG)
        torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
        dirs.append(d)
    return dirs


def _cifar_subset(dst: Path, n: int, bad_rows=()):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    if not (CIFAR / "test.parquet").exists():
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR}")
    tbl = pq.read_table(CIFAR / "test.parquet").slice(0, n)
    if bad_rows:
        imgs = tbl.column("image").to_pylist()
        for r in bad_rows:
            imgs[r] = b"\x89PNG broken"
        tbl = tbl.set_column(tbl.column_names.index("image"), "image", pa.array(imgs, pa.binary()))
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, dst / "images.parquet")
    shutil.copy(CIFAR / "classes.json", dst / "classes.json")
    return dst / "images.parquet"


@pytest.mark.slow
def test_trimmed_text_encoding_is_exact(tiny_clip_dirs):
    from coreg_ray.annotate.clip import _encode_text_trimmed, load_clip_model

    model, tok, prep = load_clip_model(f"clip:local-dir:{tiny_clip_dirs[0]}")
    assert prep["size"] == 32
    tokens = tok(build_prompts(SMALL_TEMPLATES[:5], ["cat", "sports car"])[0] + ["a b c d e f"])
    with torch.inference_mode():
        full, trimmed = model.encode_text(tokens), _encode_text_trimmed(model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)


@pytest.mark.slow
def test_annotator_batches_and_annotate_table(tiny_clip_dirs, tmp_path):
    from coreg_ray.annotate.clip import ClipAnnotator, annotate_table
    from coreg_ray.data.tables import load_image_table

    path = _cifar_subset(tmp_path, 24)
    table = load_image_table(path)
    spec = f"clip:local-dir:{tiny_clip_dirs[0]}"
    ann = annotate_table(table, spec, batch_size=10)
    assert ann.votes.shape == (24, 27) and ann.candidates.shape == (24, 10)
    assert np.array_equal(ann.candidates, logic.union_candidates(ann.votes, 10).numpy())
    assert np.allclose(ann.probs.sum(1), 1, atol=1e-5)
    assert ann.meta["annotator"] == spec and ann.meta["templates"] == SMALL_TEMPLATES
    # the Ray-facing call: bytes in, with one bad row; same results for the good rows
    a = ClipAnnotator(spec, table.classes, templates=SMALL_TEMPLATES[:3], candidate_mode="topk:2")
    import pyarrow.parquet as pq
    blobs = pq.read_table(path).column("image").to_pylist()[:4]
    blobs[2] = b"junk"
    out = a({"id": table.ids[:4], "image": np.asarray(blobs, dtype=object)})
    assert out["votes"].shape == (4, 3) and out["error"][2] and not out["error"][0]
    assert (out["votes"][2] == -1).all() and not out["candidates"][2].any()
    assert out["candidates"][[0, 1, 3]].sum(1).tolist() == [2, 2, 2]


@pytest.mark.slow
def test_local_engine_merge_and_bad_images(tiny_clip_dirs, tmp_path):
    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.data.annotations import read_annotations

    path = _cifar_subset(tmp_path / "data", 12, bad_rows=(4, 5, 6, 7))  # shard 1 all bad
    specs = [f"clip:local-dir:{d}" for d in tiny_clip_dirs]
    out = tmp_path / "ann.parquet"
    rep = run_annotation(path, specs, out, report=tmp_path / "rep", engine="local",
                         shard_size=4, templates=SMALL_TEMPLATES[:4], progress=False)
    ann = read_annotations(out)
    kept = [i for i in range(12) if i not in (4, 5, 6, 7)]
    assert ann.ids.tolist() == kept and ann.votes.shape == (8, 8)  # 2 annotators x 4 templates
    assert rep["skipped"] == 4 and [r["id"] for r in rep["skipped_images"]] == [4, 5, 6, 7]
    assert ann.meta["skipped"] == [4, 5, 6, 7] and ann.meta["merge"] == "union"
    singles = [read_annotations(tmp_path / "ann.parquet.parts" / f"annotator-{i}" /
                                "shard-00000.parquet") for i in range(2)]
    assert np.array_equal(ann.candidates[:4], singles[0].candidates | singles[1].candidates)
    assert np.array_equal(ann.candidates, logic.union_candidates(ann.votes, 10).numpy())
    assert len(rep["per_annotator"]) == 2 and "Per annotator" in (tmp_path / "rep.md").read_text()
    # min_votes: a class needs >= 5 of the 8 votes (else the union is kept)
    rep2 = run_annotation(path, specs, tmp_path / "ann2.parquet", engine="local", shard_size=4,
                          templates=SMALL_TEMPLATES[:4], merge="min_votes:5", progress=False)
    ann2 = read_annotations(tmp_path / "ann2.parquet")
    assert (ann2.candidates <= ann.candidates).all() and ann2.candidates.any(1).all()
    assert rep2["merge"] == "min_votes:5"
    with pytest.raises(CoregError, match="row id 4 cannot be decoded"):
        run_annotation(path, specs[:1], tmp_path / "ann3.parquet", engine="local", shard_size=4,
                       templates=SMALL_TEMPLATES[:2], on_bad_image="fail", progress=False)


@pytest.mark.slow
def test_cli_annotate_prints_the_quality_summary(tiny_clip_dirs, tmp_path, capsys):
    """`coreg-ray annotate` prints the table's statistics (they live in the report's `quality`;
    the command used to print only `skipped`)."""
    import json

    from coreg_ray.cli import main

    path = _cifar_subset(tmp_path / "data", 12, bad_rows=(3,))
    assert main(["annotate", "--images", str(path), "--annotator",
                 f"clip:local-dir:{tiny_clip_dirs[0]}", "--templates", "small", "--engine",
                 "local", "--output", str(tmp_path / "ann.parquet")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["images"] == 11 and shown["skipped"] == 1 and shown["avg_candidates"] >= 1
    assert 0 <= shown["partial_accuracy"] <= 1 and 0 <= shown["ensemble_accuracy"] <= 1
    assert shown["output"].endswith("ann.parquet") and shown["images_per_s"] > 0


# ============================================================================= Ray Data end to end
@pytest.fixture(scope="module")
def ray_run(ray_runtime, tmp_path_factory):
    """One pipeline run: 64 CIFAR images, 4 shards of 16, random ViT-S-32-alt at 32 px."""
    tmp = tmp_path_factory.mktemp("ray_annotate")
    path = _cifar_subset(tmp / "data", 64)
    out = tmp / "ann.parquet"
    from coreg_ray.annotate.pipeline import run_annotation

    run_kwargs = dict(images_path=path, annotators=[SMALL_SPEC], output=out,
                      report=tmp / "report.json", image_size=32, shard_size=16, batch_size=16,
                      progress=False)
    t = time.time()
    rep = run_annotation(**run_kwargs)
    return {"path": path, "out": out, "rep": rep, "kwargs": run_kwargs, "tmp": tmp,
            "seconds": time.time() - t}


@pytest.mark.slow
@pytest.mark.ray
def test_ray_pipeline_end_to_end(ray_run):
    import pyarrow.parquet as pq

    from coreg_ray.annotate.clip import annotate_table
    from coreg_ray.data.annotations import read_annotations

    ann = read_annotations(ray_run["out"])
    src = pq.read_table(ray_run["path"], columns=["id", "label"])
    ids = src.column("id").to_numpy()
    assert ann.ids.tolist() == ids.tolist()  # every id exactly once, in input order
    assert ray_run["rep"]["timing"]["batches"] >= 4  # 64 images in batches of 16, streamed
    assert ann.votes.shape == (64, 27) and ann.candidates.shape == (64, 10)
    assert ann.probs.shape == (64, 10) and np.allclose(ann.probs.sum(1), 1, atol=1e-4)
    assert np.array_equal(ann.candidates, logic.union_candidates(ann.votes, 10).numpy())
    assert ann.meta["annotator"] == SMALL_SPEC and ann.meta["classes"][0] == "airplane"
    parts = sorted(p.name for p in (ray_run["out"].parent / "ann.parquet.parts").iterdir())
    assert parts == ["plan.json"] + [f"shard-{k:05d}.parquet" for k in range(4)]
    # the Ray actors and the in-process path agree (same weights from the seed, same resize)
    local = annotate_table(ray_run["path"], SMALL_SPEC, image_size=32, batch_size=32)
    assert np.allclose(local.probs, ann.probs, atol=1e-3)
    assert (local.votes == ann.votes).mean() > 0.98
    # report: JSON + Markdown
    rep = json.loads((ray_run["tmp"] / "report.json").read_text())
    q = rep["quality"]
    labels = src.column("label").to_numpy()
    assert q["images"] == 64 and rep["skipped"] == 0
    assert q["avg_candidates"] == pytest.approx(ann.candidates.sum(1).mean())
    assert sum(q["set_size_histogram"].values()) == 64
    assert q["partial_accuracy"] == pytest.approx(ann.candidates[np.arange(64), labels].mean())
    assert q["ensemble_accuracy"] == pytest.approx((ann.probs.argmax(1) == labels).mean())
    assert len(q["template_accuracy"]) == 27 and q["template_accuracy"][0]["template"] == \
        SMALL_TEMPLATES[0]
    assert [r["class"] for r in q["per_class"]] == ann.meta["classes"]
    assert sum(r["images"] for r in q["per_class"]) == 64
    assert all(c["true"] != c["predicted"] for c in q["confusions"])
    md = (ray_run["tmp"] / "report.md").read_text()
    for heading in ("Avg. num", "partial accuracy", "Zero-shot accuracy per template",
                    "Per class", "Most common confusions", "Candidate-set size"):
        assert heading in md
    assert rep["timing"]["shards_computed"] == 4 and rep["resources"]["num_actors"] == 2  # one per core


@pytest.mark.slow
@pytest.mark.ray
def test_ray_pipeline_resumes_missing_shard_only(ray_run):
    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.data.annotations import read_annotations

    parts = ray_run["out"].parent / "ann.parquet.parts"
    before = read_annotations(ray_run["out"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*.parquet")}
    (parts / "shard-00002.parquet").unlink()
    rep = run_annotation(**ray_run["kwargs"])
    assert rep["timing"]["shards_computed"] == 1 and rep["timing"]["shards_reused"] == 3
    assert rep["timing"]["images_annotated"] == 16
    for name, m in mtimes.items():
        if name != "shard-00002.parquet":
            assert (parts / name).stat().st_mtime_ns == m
    after = read_annotations(ray_run["out"])
    assert np.array_equal(after.ids, before.ids) and np.allclose(after.probs, before.probs, atol=1e-5)
    # a finished run re-merges without computing anything (no Ray work at all)
    rep = run_annotation(**ray_run["kwargs"])
    assert rep["timing"]["shards_computed"] == 0 and rep["timing"]["shards_reused"] == 4
    # other settings on the same parts folder are refused
    with pytest.raises(CoregError, match="other settings.*candidate_mode"):
        run_annotation(**dict(ray_run["kwargs"], candidate_mode="topk:2"))


def test_weights_file_is_loaded_without_a_random_init_first(tmp_path, monkeypatch):
    """A weights file (or tag) is loaded into a model built without the random init it would
    overwrite (most of an actor's model build); every weight is the file's, the init functions
    are back afterwards, a file missing a weight still fails, and random weights are still
    initialised."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    from coreg_ray.annotate import clip

    monkeypatch.setitem(factory._MODEL_CONFIGS, "coreg-tiny", TINY_CFG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = open_clip.model.CLIP(**TINY_CFG)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    calls = []
    real = torch.nn.init.normal_

    def counted(t, *a, **k):
        calls.append(tuple(t.shape))
        return real(t, *a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", counted)
    model, _, _ = clip.load_clip_model(f"clip:coreg-tiny/{tmp_path / 'w.pt'}")
    assert calls == []  # nothing was randomly initialised
    assert torch.nn.init.normal_ is counted  # and the initialisers are back
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    sd = ref.state_dict()
    sd.pop("text_projection")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CoregError, match="cannot build the model"):
        clip.load_clip_model(f"clip:coreg-tiny/{tmp_path / 'partial.pt'}")
    assert torch.nn.init.normal_ is counted
    clip.load_clip_model("clip:coreg-tiny/random")
    assert calls  # random weights are still initialised
