"""Issue 21: pools as users keep them. A generated folder of a few hundred tiny image files
(nested sub-folders, names with spaces and non-ASCII letters, upper-case extensions, mixed sizes
and modes, one corrupt file, one 0-byte file, one non-image file): annotate and predict give one
row per image file, each id once and equal to its relative path, the bad files as error rows,
the non-image counted and skipped; a Parquet copy with string ids gives the same results; a run
on string ids resumes after kill -9; ids that are names are kept exactly everywhere."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coreg_ray.errors import CoregError
from tests.test_annotate_clip import tiny_clip_dirs  # noqa: F401  (the tiny CLIP models)

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "ünï bird"]
BAD = {"cat/broken.jpg", "dog/sub dir/empty.png"}


def _image(rng, k: int) -> Image.Image:
    w, h = int(rng.integers(6, 20)), int(rng.integers(6, 20))
    mode = ("RGB", "L", "RGBA", "I;16", "P")[k % 5]
    if mode == "I;16":
        return Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def make_folder(root: Path, n: int = 150, seed: int = 0) -> list[str]:
    """The generated pool: returns the relative paths of the image files (bad ones included)."""
    rng = np.random.default_rng(seed)
    subs = ["", "sub dir/", "a/b/", "été/"]
    exts = [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"),
            (".bmp", "BMP"), (".gif", "GIF"), (".tiff", "TIFF"), (".PNG", "PNG")]
    rels = []
    for k in range(n):
        cls = CLASSES[k % 3]
        ext, fmt = exts[k % len(exts)]
        rel = f"{cls}/{subs[k % 4]}img {k:03d} ñ{ext}"
        img = _image(rng, k)
        if fmt in ("JPEG", "BMP") and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        if fmt == "WEBP" and img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        if fmt == "GIF" and img.mode == "I;16":
            img = img.convert("L")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        kw = {}
        if fmt == "JPEG" and k % 4 == 1:  # EXIF orientation: rotate 90
            exif = Image.Exif()
            exif[0x0112] = 6
            kw["exif"] = exif.tobytes()
        img.save(root / rel, format=fmt, **kw)
        rels.append(rel)
    (root / "cat/broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "dog/sub dir/empty.png").write_bytes(b"")
    (root / "cat/notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden/x.png").write_bytes((root / rels[0]).read_bytes())
    return sorted(rels + sorted(BAD))


def parquet_copy(folder: Path, rels, dst: Path) -> Path:
    """The same files as a Parquet image table with string ids (their relative paths)."""
    labels = [CLASSES.index(r.split("/", 1)[0]) for r in rels]
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(rels, pa.string()),
                             "image": pa.array([(folder / r).read_bytes() for r in rels], pa.binary()),
                             "label": pa.array(labels, pa.int16())}), dst / "train.parquet")
    (dst / "classes.json").write_text(json.dumps(CLASSES))
    return dst


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pools")
    rels = make_folder(d / "photos")
    parquet_copy(d / "photos", rels, d / "copy")
    return {"folder": d / "photos", "parquet": d / "copy", "rels": rels, "dir": d}


# ---------------------------------------------------------------------------------- ids
def test_ids_are_ints_or_strings_and_floats_are_refused():
    from coreg_ray.data.ids import arrow_ids, as_ids, ids_digest

    assert as_ids(pa.array([3, 1], pa.int32())).dtype == np.int64
    s = as_ids(pa.chunked_array([pa.array(["a b", "é/x.png"], pa.large_string())]))
    assert s.dtype == object and s.tolist() == ["a b", "é/x.png"]
    assert arrow_ids(s).type == pa.string() and arrow_ids(np.arange(2)).type == pa.int64()
    # int64 digests are what they always were (plans and checkpoints made before stay valid)
    import hashlib
    ints = np.arange(5, dtype=np.int64)
    assert ids_digest(ints) == hashlib.sha1(ints.tobytes()).hexdigest()
    assert ids_digest(np.array(["ab", "c"], object)) != ids_digest(np.array(["a", "bc"], object))
    with pytest.raises(CoregError, match=r"^pool.parquet: id column of type double .*first value: 1.5"):
        as_ids(pa.array([1.5, 2.0]), "pool.parquet")
    with pytest.raises(CoregError, match="mix strings"):
        as_ids(np.array(["a", 3], object), "x")


def test_float_ids_in_a_table_are_one_line_and_nothing_written(tmp_path, capsys):
    from coreg_ray.cli import main

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    pq.write_table(pa.table({"id": pa.array([1.0, 2.5]), "image": [buf.getvalue()] * 2}),
                   tmp_path / "f.parquet")
    out = tmp_path / "out"
    for argv in (["annotate", "--images", str(tmp_path / "f.parquet"), "--annotator",
                  "clip:RN50/random", "--output", str(out / "a.parquet")],
                 ["synth", "--images", str(tmp_path / "f.parquet"), "--q", "0.1", "--eta", "0",
                  "--output", str(out / "s.parquet")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"coreg-ray: error: {tmp_path / 'f.parquet'}: id column of type double "
                       "(ids must be integers or strings; first value: 1.0)"), err
    assert not out.exists()


def test_string_ids_flow_through_tables_annotations_synth_and_fingerprints(tmp_path):
    from coreg_ray.annotate.simulated import PaperLikeAnnotator
    from coreg_ray.annotate.weak_templates import SimulatedVLM
    from coreg_ray.coreg.device_data import data_fingerprint
    from coreg_ray.data import (read_annotations, synthetic_annotations, write_annotations,
                                write_image_table)
    from coreg_ray.data.tables import load_image_table, table_from_arrays

    rng = np.random.default_rng(0)
    ids = np.array([f"shot {i:02d} é.jpg" for i in range(40)], object)
    t = table_from_arrays(rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8),
                          rng.integers(0, 4, 40), ["a", "b", "c", "d"], ids)
    write_image_table(t, tmp_path / "t.parquet")
    assert pq.read_schema(tmp_path / "t.parquet").field("id").type == pa.string()
    r = load_image_table(tmp_path / "t.parquet")
    assert r.ids.tolist() == ids.tolist()
    ann = synthetic_annotations(r.ids, r.labels, 4, 0.3, 0.1, seed=0)
    write_annotations(ann, tmp_path / "a.parquet")
    back = read_annotations(tmp_path / "a.parquet").align_to(r.ids[::-1].copy())
    assert back.ids.tolist() == ids[::-1].tolist()
    assert np.array_equal(back.candidates, ann.candidates[::-1])
    sim = PaperLikeAnnotator(0.7, 2.0, 0.5, templates=4, seed=0).fit(r.images, r.labels, 4)
    assert sim.annotate(r.images, r.labels, r.ids).ids.tolist() == ids.tolist()
    weak = SimulatedVLM(seed=0).fit(r.images, r.labels, 4)
    assert weak.annotate(r.images, r.ids).ids.tolist() == ids.tolist()
    fp = data_fingerprint(r, ann.candidates, 8)
    fp2 = data_fingerprint(r.subset(np.arange(40)[::-1].copy()), ann.candidates, 8)
    assert fp["ids"] != fp2["ids"]
    with pytest.raises(CoregError, match="ids are strings, the images' integers"):
        ann.align_to(np.arange(40))


# ---------------------------------------------------------------------------------- sources
def test_a_folder_is_found_recursively_with_relative_path_ids(pool, capsys):
    from coreg_ray.data.sources import open_pool

    p = open_pool(pool["folder"])
    assert p.kind == "files" and p.ids.tolist() == pool["rels"]
    assert p.ignored == 1 and "1 files that are not images ignored (e.g. cat/notes.txt)" in \
        capsys.readouterr().err
    # every image is under a top-level class folder: labels by folder, classes sorted
    assert p.classes == sorted(CLASSES)
    assert [sorted(CLASSES)[i] for i in p.labels] == [r.split("/")[0] for r in pool["rels"]]
    assert p.labels_for(["x", "y"]) is None
    # an image at the top makes it an unlabelled pool
    flat = pool["dir"] / "flat"
    shutil.copytree(pool["folder"] / "cat", flat)
    q = open_pool(flat)
    assert q.labels is None and "broken.jpg" in q.ids.tolist()


def test_train_decodes_a_folder_once_with_path_ids(pool, tmp_path):
    from coreg_ray.data.tables import load_image_table

    good = tmp_path / "good"
    shutil.copytree(pool["folder"], good)
    for b in BAD:
        (good / b).unlink()
    t = load_image_table(good, image_size=16)
    assert t.ids.tolist() == [r for r in pool["rels"] if r not in BAD]
    assert t.classes == sorted(CLASSES) and t.images.shape[1:] == (3, 16, 16)
    with pytest.raises(CoregError, match=r"broken.jpg: cannot be decoded .*move it out"):
        load_image_table(pool["folder"], image_size=16)


def test_bad_pools_are_one_line_and_nothing_written(tmp_path, capsys):
    from coreg_ray.cli import main

    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "readme.md").write_text("no images")
    out = tmp_path / "out"
    for cmd in (["annotate", "--annotator", "clip:RN50/random", "--output", str(out / "a.parquet")],
                ["predict", "--model", str(tmp_path / "m.pt"), "--output", str(out / "p.parquet")]):
        assert main(cmd + ["--images", str(tmp_path / "empty")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        if cmd[0] == "annotate":
            assert "no images found" in err and "(1 other files)" in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------- annotate
def _annotate(images, out, spec, **kw):
    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.annotate.templates import SMALL_TEMPLATES

    return run_annotation(images, [spec], out, engine="local", shard_size=64,
                          templates=SMALL_TEMPLATES[:3], classes=CLASSES, progress=False,
                          batch_size=32, **kw)


@pytest.mark.slow
def test_annotate_a_folder_equals_its_parquet_copy(pool, tiny_clip_dirs, tmp_path):
    from coreg_ray.data.annotations import read_annotations

    spec = f"clip:local-dir:{tiny_clip_dirs[0]}"
    rep = _annotate(pool["folder"], tmp_path / "f.parquet", spec, report=tmp_path / "rep")
    rep2 = _annotate(pool["parquet"], tmp_path / "p.parquet", spec)
    a, b = read_annotations(tmp_path / "f.parquet"), read_annotations(tmp_path / "p.parquet")
    good = [r for r in pool["rels"] if r not in BAD]
    assert a.ids.tolist() == good and b.ids.tolist() == good
    assert np.array_equal(a.candidates, b.candidates) and np.array_equal(a.votes, b.votes)
    assert np.allclose(a.probs, b.probs)
    assert sorted(r["id"] for r in rep["skipped_images"]) == sorted(BAD)
    md = (tmp_path / "rep.md").read_text()
    assert "| cat/broken.jpg | UnidentifiedImageError: cannot identify image file |" in md, md
    assert "| dog/sub dir/empty.png | empty file (0 bytes) |" in md
    assert rep["rows_in_input"] == len(pool["rels"]) == rep2["rows_in_input"]
    assert pq.read_schema(tmp_path / "f.parquet").field("id").type == pa.string()
    # the folder's labels (class sub-folders named like the classes) score the report
    assert rep["labels"] and rep["quality"]["partial_accuracy"] == rep2["quality"]["partial_accuracy"]


# ---------------------------------------------------------------------------------- predict
def _predict_table(path):
    t = pq.read_table(path)
    return {c: t.column(c).to_pylist() for c in t.column_names}


@pytest.mark.slow
def test_predict_a_folder_equals_its_parquet_copy(pool, tiny_student, tmp_path):
    from coreg_ray.predict import run_predict

    s1 = run_predict(tiny_student, pool["folder"], tmp_path / "f.parquet", engine="local",
                     shard_size=50, progress=False)
    s2 = run_predict(tiny_student, pool["parquet"], tmp_path / "p.parquet", engine="local",
                     shard_size=50, progress=False)
    f, p = _predict_table(tmp_path / "f.parquet"), _predict_table(tmp_path / "p.parquet")
    assert f["id"] == pool["rels"] and f == p
    bad = {i for i, e in zip(f["id"], f["error"]) if e}
    assert bad == BAD and s1["errors"] == 2 and set(s1["error_ids"]) == BAD
    assert s1["rows"] == s2["rows"] == len(pool["rels"])


@pytest.mark.slow
def test_ray_streams_a_folder_with_read_binary_files(pool, tiny_student, tmp_path, ray_runtime):
    from coreg_ray.predict import run_predict

    run_predict(tiny_student, pool["folder"], tmp_path / "r.parquet", engine="ray",
                shard_size=50, progress=False, num_actors=1)
    run_predict(tiny_student, pool["folder"], tmp_path / "l.parquet", engine="local",
                shard_size=50, progress=False)
    r, loc = _predict_table(tmp_path / "r.parquet"), _predict_table(tmp_path / "l.parquet")
    assert r["id"] == pool["rels"]
    assert r["label"] == loc["label"] and [bool(e) for e in r["error"]] == \
        [bool(e) for e in loc["error"]]


KILLER = """
import os, signal, sys
import coreg_ray.predict as p
real, n = p.write_predictions, [0]
def dying(*a, **k):
    real(*a, **k)
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after the second shard
p.write_predictions = dying
from coreg_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_string_ids_resume_after_kill_9_with_every_id_once(pool, tiny_student, tmp_path):
    out = tmp_path / "pred.parquet"
    argv = ["predict", "--model", str(tiny_student), "--images", str(pool["folder"]),
            "--output", str(out), "--engine", "local", "--shard-size", "30"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not out.exists() and len(list((tmp_path / "pred.parquet.parts").glob("shard-*"))) == 2
    from coreg_ray.cli import main
    assert main(argv) == 0
    t = _predict_table(out)
    assert t["id"] == pool["rels"] and len(set(t["id"])) == len(t["id"])
    summary = json.loads((tmp_path / "pred.parquet.summary.json").read_text())
    assert summary["shards_reused"] == 2 and summary["rows"] == len(pool["rels"])


def test_predict_takes_a_built_in_source(tiny_student, tmp_path, digits):
    """`predict --images digits:test` (refused before issue 21) labels the built-in rows with
    their own int ids; the accuracy is evaluate's."""
    from coreg_ray.coreg.classifier import Classifier
    from coreg_ray.predict import run_predict

    s = run_predict(tiny_student, "digits:test", tmp_path / "p.parquet", engine="local",
                    progress=False)
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.schema.field("id").type == pa.int64()
    assert t.column("id").to_pylist() == digits[1].ids.tolist()
    assert s["accuracy"] == Classifier.load(tiny_student, "cpu").evaluate(digits[1])["accuracy"]


@pytest.mark.slow
def test_the_worked_example_from_a_folder_to_predictions(pool, tiny_clip_dirs, tmp_path, capsys):
    """docs/your-pool.md's commands, through the CLI: annotate a folder, train on it (same path
    ids), predict a folder; every row names its file."""
    from coreg_ray.cli import main

    photos = tmp_path / "photos"
    shutil.copytree(pool["folder"], photos)
    for b in BAD:  # train needs every file readable (docs: move such files out)
        (photos / b).unlink()
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    assert main(["annotate", "--images", str(photos), "--annotator",
                 f"clip:local-dir:{tiny_clip_dirs[0]}", "--classes", str(tmp_path / "classes.txt"),
                 "--templates", str(_templates(tmp_path)), "--engine", "local",
                 "--output", str(tmp_path / "ann.parquet")]) == 0
    assert main(["train", "--images", str(photos), "--annotations", str(tmp_path / "ann.parquet"),
                 "--output", str(tmp_path / "run"), "--no-mlflow", "--image-size", "16",
                 "--set", "model.backbone=mlp", "--set", "train.epochs=2",
                 "--set", "train.warmup_epochs=1", "--set", "train.batch_size=32",
                 "--set", "train.warmup_batch_size=32", "--set", "coreg.queue_size=64",
                 "--set", "data.hflip=false"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "run" / "model.pt"), "--images",
                 str(pool["folder"]), "--engine", "local",
                 "--output", str(tmp_path / "pred.parquet")]) == 0
    t = _predict_table(tmp_path / "pred.parquet")
    assert t["id"] == pool["rels"] and set(t["class_name"]) - {""} <= set(sorted(CLASSES))
    summary = json.loads((tmp_path / "pred.parquet.summary.json").read_text())
    assert summary["errors"] == 2 and summary["accuracy_images"] == len(pool["rels"]) - 2


def _templates(tmp_path):
    f = tmp_path / "templates.txt"
    f.write_text("a photo of a {}.\na picture of a {}.\n")
    return f
