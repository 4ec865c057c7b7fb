"""The trained student as an MLflow model (`coreg_ray.mlflow_model`): every tracked `train` run
logs it at `runs:/<id>/model`, a fresh process loads it with `mlflow.pyfunc.load_model` and
predicts the labels the in-process `Classifier` gives; `--register` adds a registry version;
`mlflow models serve` answers over REST (slow); experiments log each trained run's model (slow,
Ray)."""
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from coreg_ray.cli import main  # noqa: E402
from coreg_ray.coreg.classifier import Classifier  # noqa: E402
from coreg_ray.data import load_image_table  # noqa: E402
from coreg_ray.errors import CoregError  # noqa: E402
from coreg_ray.mlflow_model import encode_png, predict_frame  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TRAIN = ["--set", "model.backbone=mlp", "--set", "data.hflip=false", "--set", "train.epochs=8",
         "--set", "train.warmup_epochs=2", "--set", "train.batch_size=64",
         "--set", "train.warmup_batch_size=128", "--set", "coreg.queue_size=256"]

# A fresh interpreter: the model by run id and by registry version, labels of every test image.
FRESH = """
import json, sys
import mlflow, pandas as pd, pyarrow.parquet as pq
blobs = pq.read_table(sys.argv[1]).column("image").to_pylist()
frame = pd.DataFrame({"image": blobs})
out = {}
for uri in sys.argv[2:]:
    pred = mlflow.pyfunc.load_model(uri).predict(frame, params={"top_k": 2})
    out[uri] = {"label": pred["label"].tolist(), "class_name": pred["class_name"].tolist(),
                "top_k_labels": pred["top_k_labels"].apply(list).tolist(),
                "confidence": pred["confidence"].tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _mlflow_template):
    """`coreg-ray train --register digits-student` on 400 digits written as a PNG Parquet table
    (tracked to this module's own SQLite store, artifacts beside it); the test split as a PNG
    Parquet table too."""
    from coreg_ray.data import synthetic_annotations, write_annotations, write_image_table

    tmp = tmp_path_factory.mktemp("mlflow-model")
    shutil.copyfile(_mlflow_template, tmp / "mlruns.db")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    train = load_image_table("digits:train", limit=400)
    write_image_table(train, tmp / "train" / "train.parquet")
    write_image_table(load_image_table("digits:test"), tmp / "test" / "test.parquet")
    write_annotations(synthetic_annotations(train.ids, train.labels, 10, 0.2, 0.0, 0),
                      tmp / "ann.parquet")
    with contextlib.chdir(tmp):  # the experiment's artifact folder: ./mlruns here
        assert main(["train", "--images", "train/train.parquet", "--annotations", "ann.parquet",
                     "--test-images", "test/test.parquet", "--output", "run",
                     "--set", f"tracking.tracking_uri={uri}", "--register", "digits-student",
                     *TRAIN]) == 0
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("coreg-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return {"tmp": tmp, "uri": uri, "run_id": runs[0].info.run_id, "client": client,
            "test": tmp / "test" / "test.parquet", "model": tmp / "run" / "model.pt"}


def _classifier_labels(model, table) -> list[int]:
    return Classifier.load(model, "cpu").predict(load_image_table(table).images).tolist()


def test_a_fresh_process_loads_the_run_model_and_predicts_the_classifier_labels(trained):
    run_uri = f"runs:/{trained['run_id']}/model"
    files = {f.path for f in trained["client"].list_artifacts(trained["run_id"], "model")}
    assert {"model/MLmodel", "model/artifacts", "model/input_example.json",
            "model/serving_input_example.json", "model/requirements.txt"} <= files
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "OMP_NUM_THREADS": "1"}
    fresh = trained["tmp"] / "fresh"
    fresh.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FRESH, str(trained["test"]), run_uri,
                           "models:/digits-student/1"], cwd=fresh, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = _classifier_labels(trained["model"], trained["test"])
    got = out[run_uri]
    agree = float(np.mean(np.asarray(got["label"]) == np.asarray(expected)))
    print(f"\nfresh process: {len(expected)} test images, agreement with Classifier "
          f"{agree:.4f}, {len(set(expected))} classes predicted ({time.perf_counter() - t0:.1f} s)")
    assert len(expected) == 359 and got["label"] == expected
    assert len(set(expected)) >= 5  # a model that tells digits apart, not one constant label
    assert got["class_name"] == [str(c) for c in expected]  # digits: class names "0".."9"
    assert all(len(t) == 2 and t[0] == lab for t, lab in zip(got["top_k_labels"], expected))
    assert all(0 < c <= 1 for c in got["confidence"])
    assert out["models:/digits-student/1"] == got  # the registered version is the same model


def test_register_creates_a_version_of_the_run_model(trained):
    client = mlflow.MlflowClient(trained["uri"], registry_uri=trained["uri"])
    versions = client.search_model_versions("name = 'digits-student'")
    assert [int(v.version) for v in versions] == [1]
    v = versions[0]
    assert v.run_id == trained["run_id"] and v.source.endswith(f"{trained['run_id']}/artifacts/model")
    metrics = json.loads((trained["tmp"] / "run" / "metrics.json").read_text())
    assert float(v.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    assert v.tags["coreg.output"] == str((trained["tmp"] / "run").resolve())


def test_predict_takes_base64_and_dicts_caps_top_k_and_keeps_bad_rows_with_an_error(trained):
    clf = Classifier.load(trained["model"], "cpu")
    blobs = pq.read_table(trained["test"]).column("image").to_pylist()[:4]
    ref = predict_frame(clf, pd.DataFrame({"image": blobs}), top_k=3)
    assert list(ref.columns) == ["label", "class_name", "confidence", "top_k_labels",
                                 "top_k_probs", "error"]  # those of `coreg-ray predict`
    assert ref["label"].tolist() == _classifier_labels(trained["model"], trained["test"])[:4]
    assert set(ref["error"]) == {""}
    b64 = predict_frame(clf, pd.DataFrame({"image": [base64.b64encode(b).decode() for b in blobs]}))
    hf = predict_frame(clf, pd.DataFrame({"image": [{"bytes": b} for b in blobs]}), top_k=20)
    assert b64["label"].tolist() == hf["label"].tolist() == ref["label"].tolist()
    assert all(len(t) == 10 for t in hf["top_k_labels"])  # top_k capped at the 10 classes
    # a corrupt image (or none) is its own row's error, not the request's
    mixed = predict_frame(clf, pd.DataFrame({"image": [blobs[0], b"not an image", None, blobs[1]]}))
    assert mixed["label"].tolist() == [ref["label"][0], -1, -1, ref["label"][1]]
    assert mixed["error"][0] == mixed["error"][3] == ""
    assert mixed["error"][1].startswith("UnidentifiedImageError") and "no image bytes" in mixed["error"][2]
    assert mixed["top_k_labels"][1] == [] and mixed["class_name"][1] == ""
    with pytest.raises(CoregError, match="needs a column 'image'"):
        predict_frame(clf, pd.DataFrame({"pixels": [blobs[0]]}))
    with pytest.raises(CoregError, match="top_k: 0 is out of range"):
        predict_frame(clf, pd.DataFrame({"image": blobs}), top_k=0)


def test_a_file_that_is_not_a_coreg_model_is_one_line_naming_it(tmp_path):
    import torch

    from coreg_ray.distributed.tracking import NoTracker
    from coreg_ray.mlflow_model import save_student

    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CoregError, match=f"{bad}: not a coreg-ray model"):
        save_student(bad, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert NoTracker().log_model(bad, register="x") is None  # tracking off: nothing logged


@pytest.mark.parametrize("extra, message", [
    (["--no-mlflow", "--register", "students"], "--register puts the run's model in MLflow's "
                                                "Model Registry: it needs MLflow tracking"),
    (["--register", "a/b"], "--register: 'a/b' is not a valid registered model name"),
    (["--register", " "], "--register: give the registered model's name"),
])
def test_register_errors_are_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    rc = main(["train", "--images", "digits:train", "--annotations", str(tmp_path / "none.parquet"),
               "--output", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("coreg-ray: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_experiment_register_without_tracking_is_one_line(tmp_path, capsys):
    rc = main(["experiment", "--config", str(Path(__file__).parent.parent / "configs" /
                                             "exp-digits-smoke.yaml"),
               "--output", str(tmp_path / "e"), "--no-mlflow", "--register", "students"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "it needs MLflow tracking" in err and "\n" not in err
    assert not (tmp_path / "e").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_base64_images_over_rest(trained):
    """`mlflow models serve --env-manager local` (its uvicorn from this environment's bin): the
    binary column travels as base64 in `dataframe_split`; the labels are the Classifier's."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "OMP_NUM_THREADS": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(trained["tmp"] / "serve.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m",
                             f"runs:/{trained['run_id']}/model", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while True:
            assert proc.poll() is None, (trained["tmp"] / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not start in 150 s"
                time.sleep(1)
        blobs = pq.read_table(trained["test"]).column("image").to_pylist()[:20]
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in blobs]},
                "params": {"top_k": 2}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        preds = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        assert [p["label"] for p in preds] == _classifier_labels(trained["model"],
                                                                 trained["test"])[:20]
        assert all(len(p["top_k_labels"]) == 2 and p["error"] == "" for p in preds)
    finally:
        os.killpg(proc.pid, 15)  # the server and its uvicorn worker (its own session)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
@pytest.mark.ray
def test_experiment_logs_each_trained_run_model_and_registers_the_best(ray_runtime, tmp_path,
                                                                       monkeypatch, mlflow_store):
    from coreg_ray.experiment import run_experiment

    monkeypatch.chdir(tmp_path)
    exp = {"name": "digits-models", "data": {"images": "digits:train", "test_images": "digits:test",
                                             "limit": 300, "test_limit": 100},
           "settings": [{"name": "q=0.3", "synthetic": {"q": 0.3, "eta": 0.0, "seed": 0}}],
           "methods": ["cc", "coreg"], "seeds": [0, 1],
           "config": {"model": {"backbone": "mlp"}, "data": {"hflip": False},
                      "train": {"epochs": 1, "warmup_epochs": 1, "batch_size": 64,
                                "warmup_batch_size": 128},
                      "coreg": {"feature_delay": 0, "queue_size": 256},
                      "tracking": {"tracking_uri": mlflow_store}},
           "resources": {"num_cpus": 1, "num_gpus": 0}}
    run_experiment(exp, tmp_path / "e", parallel=2, register="exp-student", log=lambda *a: None)
    recs = [json.loads(x) for x in (tmp_path / "e" / "results.jsonl").read_text().splitlines()]
    assert {r["status"] for r in recs} == {"ok"} and len(recs) == 4
    client = mlflow.MlflowClient(mlflow_store, registry_uri=mlflow_store)
    for r in recs:
        if r["method"] == "cc":  # a baseline writes no model.pt: nothing to log
            assert "model" not in r and "mlflow_model_uri" not in r
            continue
        assert Path(r["model"]).is_file() and r["model"].startswith(str(tmp_path / "e" / "models"))
        assert r["mlflow_model_uri"] == f"runs:/{r['mlflow_run_id']}/model"
        test = load_image_table("digits:test", limit=100)
        local = client.download_artifacts(r["mlflow_run_id"], "model", str(tmp_path))
        pred = mlflow.pyfunc.load_model(local).predict(
            pd.DataFrame({"image": encode_png(test.images, 100)}))
        assert pred["label"].tolist() == Classifier.load(r["model"], "cpu").predict(
            test.images).tolist()
    versions = client.search_model_versions("name = 'exp-student'")
    assert sorted(v.tags["seed"] for v in versions) == ["0", "1"]
    assert {v.tags["method"] for v in versions} == {"coreg"}
    best = client.get_model_version_by_alias("exp-student", "best")
    accs = {r["registered_version"]: r["test_accuracy"] for r in recs if r["method"] == "coreg"}
    assert accs[int(best.version)] == max(accs.values())


@pytest.mark.slow
@pytest.mark.ray
def test_distributed_train_logs_and_registers_its_model(ray_runtime, digits_synthetic, tmp_path,
                                                        monkeypatch, mlflow_store):
    from coreg_ray.distributed.train import train_distributed

    monkeypatch.chdir(tmp_path)
    train, ann, test = digits_synthetic
    sub = np.arange(300)
    cfg = tiny_config(**{"train.epochs": 2, "train.warmup_epochs": 1, "tracking.mlflow": True,
                         "tracking.tracking_uri": mlflow_store})
    m = train_distributed(train.subset(sub), ann.subset(sub), tmp_path / "d", cfg, test_images=test,
                          workers=1, register="ray-student", log=lambda *a: None)
    assert m["mlflow_model_uri"] == f"runs:/{m['mlflow_run_id']}/model"
    assert m["registered_model"] == "ray-student" and m["registered_version"] == 1
    client = mlflow.MlflowClient(mlflow_store)
    local = client.download_artifacts(m["mlflow_run_id"], "model", str(tmp_path))
    pred = mlflow.pyfunc.load_model(local).predict(
        pd.DataFrame({"image": encode_png(test.images, len(test))}))
    assert pred["label"].tolist() == Classifier.load(tmp_path / "d" / "model.pt", "cpu").predict(
        test.images).tolist()
