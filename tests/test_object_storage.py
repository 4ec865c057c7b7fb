"""Issue 21: pools and outputs on object storage, tested against a REAL S3-compatible server
(moto's server mode, from the `test` extra) started on 127.0.0.1 by the fixture and stopped
after; the endpoint is given the usual way (AWS_ENDPOINT_URL). Annotate a bucket folder, resume
a killed run whose shards live in the bucket, predict into the bucket, train from a Parquet
table in the bucket; missing credentials and an unreachable endpoint are one line within
seconds; credentials never appear in what is printed or written."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from coreg_ray.errors import CoregError
from tests.test_annotate_clip import tiny_clip_dirs  # noqa: F401  (the tiny CLIP models)
from tests.test_pools import BAD, KILLER, make_folder

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-never-printed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto_server on a free port of 127.0.0.1 for this module; stopped at the end."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials + endpoint in the environment, a fresh bucket; returns (bucket URI, fs)."""
    import pyarrow.fs as pafs

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(access_key="testing", secret_key=SECRET,
                           endpoint_override=s3_server.split("://")[1], scheme="http",
                           region="us-east-1", allow_bucket_creation=True)
    bucket = f"b{time.time_ns() % 10**12}"
    fs.create_dir(bucket)
    return f"s3://{bucket}", fs, env


def _upload(fs, local: Path, dest: str):
    for f in sorted(local.rglob("*")):
        if f.is_file():
            with fs.open_output_stream(f"{dest}/{f.relative_to(local).as_posix()}") as out:
                out.write(f.read_bytes())


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3pool") / "photos"
    rels = make_folder(d, n=40)
    return d, rels


@pytest.mark.slow
def test_annotate_a_bucket_folder_into_the_bucket(s3, small_folder, tiny_clip_dirs, tmp_path):
    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.annotate.templates import SMALL_TEMPLATES
    from coreg_ray.data.annotations import read_annotations

    uri, fs, _ = s3
    folder, rels = small_folder
    _upload(fs, folder, uri[5:] + "/photos")
    kw = dict(engine="local", shard_size=16, templates=SMALL_TEMPLATES[:2], progress=False,
              classes=["cat", "dog", "ünï bird"])
    spec = f"clip:local-dir:{tiny_clip_dirs[0]}"
    rep = run_annotation(f"{uri}/photos", [spec], f"{uri}/out/ann.parquet", **kw)
    run_annotation(folder, [spec], tmp_path / "ann.parquet", **kw)
    a = read_annotations(f"{uri}/out/ann.parquet")
    b = read_annotations(tmp_path / "ann.parquet")
    assert a.ids.tolist() == [r for r in rels if r not in BAD] == b.ids.tolist()
    assert np.array_equal(a.candidates, b.candidates) and np.array_equal(a.votes, b.votes)
    assert {r["id"] for r in rep["skipped_images"]} == BAD
    shards = [p for p in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(
        uri[5:] + "/out/ann.parquet.parts")) if p.path.endswith(".parquet")]
    assert len(shards) == 3  # 42 rows / 16
    assert SECRET not in json.dumps(rep)


@pytest.mark.slow
def test_predict_into_the_bucket_resumes_a_killed_run(s3, small_folder, tiny_student, tmp_path):
    uri, fs, env = s3
    folder, rels = small_folder
    _upload(fs, folder, uri[5:] + "/photos")
    out = f"{uri}/preds/p.parquet"
    argv = ["predict", "--model", str(tiny_student), "--images", f"{uri}/photos", "--output",
            out, "--engine", "local", "--shard-size", "10"]
    penv = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    r = subprocess.run([sys.executable, "-c", KILLER, *argv], env=penv, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    import pyarrow.fs as pafs
    parts = fs.get_file_info(pafs.FileSelector(uri[5:] + "/preds/p.parquet.parts"))
    assert sum(p.path.endswith(".parquet") for p in parts) == 2  # in the bucket, each whole
    r = subprocess.run([sys.executable, "-m", "coreg_ray.cli", *argv], env=penv,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert SECRET not in r.stdout + r.stderr
    t = pq.read_table(uri[5:] + "/preds/p.parquet", filesystem=fs)
    ids = t.column("id").to_pylist()
    assert ids == rels and len(set(ids)) == len(ids)
    assert {i for i, e in zip(ids, t.column("error").to_pylist()) if e} == BAD
    with fs.open_input_stream(uri[5:] + "/preds/p.parquet.summary.json") as f:
        summary = json.loads(f.read())
    assert summary["shards_reused"] == 2 and summary["rows"] == len(rels)


@pytest.mark.slow
def test_ray_predict_from_the_bucket(s3, small_folder, tiny_student, tmp_path, ray_runtime):
    from coreg_ray.predict import run_predict

    uri, fs, _ = s3
    folder, rels = small_folder
    _upload(fs, folder, uri[5:] + "/photos")
    s = run_predict(tiny_student, f"{uri}/photos", tmp_path / "r.parquet", engine="ray",
                    num_actors=1, shard_size=20, progress=False)
    assert pq.read_table(tmp_path / "r.parquet").column("id").to_pylist() == rels
    assert s["errors"] == 2


@pytest.mark.slow
def test_train_from_a_parquet_table_in_the_bucket(s3, tmp_path, digits):
    from coreg_ray.cli import main
    from coreg_ray.data import synthetic_annotations, write_annotations, write_image_table

    uri, fs, _ = s3
    train = digits[0].subset(np.arange(200))
    write_image_table(train, tmp_path / "t" / "train.parquet")
    write_annotations(synthetic_annotations(train.ids, train.labels, 10, 0.2, 0.0, seed=0),
                      f"{uri}/ann.parquet")
    _upload(fs, tmp_path / "t", uri[5:] + "/digits")
    rc = main(["train", "--images", f"{uri}/digits", "--annotations", f"{uri}/ann.parquet",
               "--output", str(tmp_path / "run"), "--no-mlflow",
               "--set", "model.backbone=mlp", "--set", "train.epochs=2",
               "--set", "train.warmup_epochs=1", "--set", "train.batch_size=64",
               "--set", "coreg.queue_size=128", "--set", "data.hflip=false"])
    assert rc == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["epochs"] == 2 and (tmp_path / "run" / "model.pt").exists()


def test_unreachable_endpoint_and_missing_credentials_fail_in_seconds(monkeypatch, tmp_path,
                                                                      capsys):
    from coreg_ray.cli import main

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "out"
    argv = ["annotate", "--annotator", "clip:RN50/random", "--output", str(out / "a.parquet")]
    t0 = time.time()
    assert main(argv + ["--images", "s3://bucket/photos"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("coreg-ray: error: s3://bucket/photos: no credentials: set AWS_ACCESS_KEY_ID "
                   "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or add ?anonymous=true for a "
                   "public bucket; the endpoint is AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody there
    # credentials in the URI itself: never printed
    assert main(argv + ["--images", f"s3://AKIAX:{SECRET}@bucket/photos"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and SECRET not in err and "s3://***@bucket/photos" in err, err
    assert "endpoint unreachable" in err, err
    assert time.time() - t0 < 30
    assert not out.exists()
