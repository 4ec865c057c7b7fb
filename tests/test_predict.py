"""`coreg-ray predict`: a trained student labels a Parquet pool shard by shard (local engine and
Ray Data), the same labels and accuracy as `Classifier` / `coreg-ray evaluate`, every id exactly
once after an interrupted run and a rerun, corrupt rows reported not dropped, bad inputs one line."""
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

from coreg_ray.cli import main
from coreg_ray.errors import CoregError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def student(tmp_path_factory, digits, tiny_student):
    """The tiny trained student (conftest) and a 300-image labelled pool."""
    from coreg_ray.data import write_image_table

    d = tmp_path_factory.mktemp("predict")
    shutil.copy(tiny_student, d / "model.pt")
    pool = digits[1].subset(np.arange(300))
    write_image_table(pool, d / "pool" / "train.parquet")
    return d, pool


def _read(path):
    return pq.read_table(path).to_pydict()


def test_local_predictions_equal_the_classifier_and_evaluate(student, tmp_path, capsys):
    from coreg_ray.coreg.classifier import Classifier
    from coreg_ray.predict import run_predict

    d, pool = student
    s = run_predict(d / "model.pt", d / "pool", tmp_path / "p.parquet", engine="local",
                    top_k=3, shard_size=64, batch_size=50, progress=False)
    out = _read(tmp_path / "p.parquet")
    clf = Classifier.load(d / "model.pt", "cpu")
    logits = clf.logits(pool.images)
    probs = logits.softmax(1)
    assert out["id"] == pool.ids.tolist()  # every id once, in pool order
    assert out["label"] == logits.argmax(1).tolist()
    assert out["class_name"] == [clf.classes[i] for i in out["label"]]
    assert np.allclose(out["confidence"], probs.max(1).values.numpy(), atol=1e-6)
    top = probs.topk(3, dim=1)
    assert np.array_equal(np.array(out["top_k_labels"]), top.indices.numpy())
    assert np.allclose(np.array(out["top_k_probs"]), top.values.numpy(), atol=1e-6)
    assert set(out["error"]) == {""} and s["errors"] == 0 and s["rows"] == 300
    assert s["shards_computed"] == 5 and sum(s["class_histogram"].values()) == 300
    # the summary's accuracy is `coreg-ray evaluate`'s on the same table
    assert main(["evaluate", "--model", str(d / "model.pt"), "--images", str(d / "pool")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert s["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-12)
    assert json.loads((tmp_path / "p.parquet.summary.json").read_text())["rows"] == 300


def test_an_interrupted_run_resumes_and_keeps_every_id_once(student, tmp_path, monkeypatch):
    import coreg_ray.predict as predict

    d, pool = student
    real = predict.StudentPredictor.__call__
    calls = {"n": 0}

    def dies_on_third_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill between shards
        return real(self, batch)

    monkeypatch.setattr(predict.StudentPredictor, "__call__", dies_on_third_batch)
    kw = dict(engine="local", shard_size=64, batch_size=64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict.run_predict(d / "model.pt", d / "pool", tmp_path / "p.parquet", **kw)
    assert sorted(p.name for p in (tmp_path / "p.parquet.parts").glob("shard-*")) == \
        ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (tmp_path / "p.parquet").exists()
    monkeypatch.setattr(predict.StudentPredictor, "__call__", real)
    s = predict.run_predict(d / "model.pt", d / "pool", tmp_path / "p.parquet", **kw)
    assert (s["shards_reused"], s["shards_computed"], s["images_computed"]) == (2, 3, 300 - 128)
    ids = _read(tmp_path / "p.parquet")["id"]
    assert ids == pool.ids.tolist()
    # other settings are refused while shards of the old ones exist; --restart starts over
    with pytest.raises(CoregError, match="other settings .*top_k"):
        predict.run_predict(d / "model.pt", d / "pool", tmp_path / "p.parquet", top_k=2, **kw)
    s = predict.run_predict(d / "model.pt", d / "pool", tmp_path / "p.parquet", top_k=2,
                            restart=True, **kw)
    assert s["shards_computed"] == 5


def test_a_corrupt_row_is_reported_not_dropped(student, tmp_path):
    from coreg_ray.predict import run_predict

    d, _ = student
    t = pq.read_table(d / "pool" / "train.parquet")
    images = t.column("image").to_pylist()
    images[7] = b"not an image"
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    (tmp_path / "pool").mkdir()
    pq.write_table(t, tmp_path / "pool" / "train.parquet")
    shutil.copy(d / "pool" / "classes.json", tmp_path / "pool" / "classes.json")
    s = run_predict(d / "model.pt", tmp_path / "pool", tmp_path / "p.parquet", engine="local",
                    limit=100, progress=False)
    out = _read(tmp_path / "p.parquet")
    bad_id = t.column("id")[7].as_py()
    assert len(out["id"]) == 100 and s["rows"] == 100 and s["errors"] == 1
    assert s["error_ids"] == [bad_id]
    i = out["id"].index(bad_id)
    assert out["label"][i] == -1 and out["class_name"][i] == ""
    assert out["error"][i] and sum(e != "" for e in out["error"]) == 1
    assert s["accuracy_images"] == 99


def test_bad_inputs_are_one_line(student, tmp_path, capsys):
    d, _ = student
    (tmp_path / "junk.pt").write_bytes(b"this is not a model")
    cases = [
        (["--model", str(tmp_path / "junk.pt")], "junk.pt"),
        (["--model", str(tmp_path / "none.pt")], "model not found"),
        (["--images", str(tmp_path / "nowhere")], "image table not found"),
        (["--top-k", "0"], "--top-k"),
        (["--output", str(tmp_path)], "--output"),
    ]
    for change, message in cases:
        args = {"--model": str(d / "model.pt"), "--images": str(d / "pool"),
                "--output": str(tmp_path / "p.parquet"), "--engine": "local"}
        args.update(zip(change[::2], change[1::2]))
        assert main(["predict", *[x for kv in args.items() for x in kv]]) == 2, change
        err = capsys.readouterr().err.strip()
        assert err.startswith("coreg-ray: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "p.parquet.parts").exists()


# ----------------------------------------------------------------------------- Ray Data
@pytest.mark.slow
@pytest.mark.ray
def test_ray_predict_equals_local_and_the_job_entrypoint_runs(student, ray_runtime, tmp_path):
    from coreg_ray.predict import run_predict

    d, pool = student
    local = run_predict(d / "model.pt", d / "pool", tmp_path / "local.parquet", engine="local",
                        progress=False)
    s = run_predict(d / "model.pt", d / "pool", tmp_path / "ray.parquet", num_actors=2,
                    batch_size=32, shard_size=100, progress=False)
    assert s["resources"]["num_actors"] == 2 and s["shards_computed"] == 3
    assert s["batches"] >= 300 // 32  # results stream back batch by batch, not in one block
    a, b = _read(tmp_path / "local.parquet"), _read(tmp_path / "ray.parquet")
    assert a["id"] == b["id"] == pool.ids.tolist() and a["label"] == b["label"]
    assert np.allclose(a["confidence"], b["confidence"], atol=1e-6)
    assert s["accuracy"] == local["accuracy"] and s["first_result_s"] <= s["seconds"]
    # the `ray job submit` entrypoint: the CLI command, run as a script (here without a job)
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="")
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "predict.py"), "--model",
                        str(d / "model.pt"), "--images", str(d / "pool"), "--output",
                        str(tmp_path / "job.parquet"), "--engine", "local", "--limit", "20"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["rows"] == 20
    assert _read(tmp_path / "job.parquet")["label"] == a["label"][:20]
