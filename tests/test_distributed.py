"""Ray Train / Ray Tune / `ray job submit` end to end on CPU (digits, MLP).

One Ray runtime for the in-process tests (conftest's session fixture `ray_runtime`, 2 CPUs);
the job-submission test starts its own head with `ray start --head --block` in a new session
and stops only that head (its process group) afterwards: `ray stop` would stop every Ray on the
machine. MLflow stores: conftest's `mlflow_store`.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from tests.conftest import tiny_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket is held open until all are chosen (one at a time,
    the OS can hand out the same port twice, and `ray start` refuses a port given to two of
    its components)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _runs(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["coreg-ray"])


# ------------------------------------------------------------------ a real head + ray job submit
def _session_processes(sid: int, wait_s: float) -> list[str]:
    """The processes still in session `sid` after waiting up to `wait_s` for it to empty."""
    deadline = time.time() + wait_s
    while True:
        left = subprocess.run(["pgrep", "-a", "-s", str(sid)], capture_output=True,
                              text=True).stdout.strip().splitlines()
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


# First in the file, so it runs before the session fixture starts a second Ray here.
def test_ray_job_submit_to_a_local_head(tmp_path, mlflow_store):
    from coreg_ray.cli import main

    assert main(["synth", "--images", "digits:train", "--limit", "300", "--q", "0.2",
                 "--eta", "0.1", "--output", str(tmp_path / "ann.parquet")]) == 0
    names = ("port", "dashboard-port", "ray-client-server-port", "object-manager-port",
             "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    ports = dict(zip(names, _free_ports(len(names))))
    temp = Path("/tmp") / f"coreg-ci-ray-{os.getpid()}"  # short: Ray's socket paths are limited
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               RAY_AUTH_MODE="disabled",  # token auth is on by default in 2.60 (stack-notes)
               RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM: no 30 s node drain
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
           f"--temp-dir={temp}", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    t0 = time.perf_counter()
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
                assert time.time() < deadline, "ray head did not come up in 120 s"
                time.sleep(0.5)
        t_head = time.perf_counter() - t0
        uri = mlflow_store
        out = tmp_path / "run"
        job = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address,
             "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}),
             "--", "python", "jobs/train.py", "--images", "digits:train", "--limit", "300",
             "--annotations", str(tmp_path / "ann.parquet"), "--test-images", "digits:test",
             "--output", str(out), "--workers", "2", "--run-name", "ci-job",
             "--set", "model.backbone=mlp", "--set", "data.hflip=false",
             "--set", "train.epochs=2", "--set", "train.warmup_epochs=1",
             "--set", "train.batch_size=64", "--set", "coreg.queue_size=256"],
            env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
        assert "succeeded" in job.stdout + job.stderr
        print(f"\nhead up in {t_head:.1f} s; job submitted and finished in "
              f"{time.perf_counter() - t0 - t_head:.1f} s")
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only this head: its own process group
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # `ray start --block` returns before its children (raylet, agents, workers) have all
        # exited; on a loaded machine they take seconds more. Give them 60 s, then kill any
        # survivor so that none leaks, and fail.
        survivors = _session_processes(head.pid, wait_s=60)
        if survivors:
            subprocess.run(["pkill", "-KILL", "-s", str(head.pid)])
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not survivors, f"processes of the test head survived 60 s after it: {survivors}"
    m = json.loads((out / "metrics.json").read_text())
    assert m["workers"] == 2 and [h["epoch"] for h in m["history"]] == [0, 1]
    assert 0.0 < m["test_accuracy"] <= 1.0 and (out / "model.pt").exists()
    runs = _runs(uri)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "ci-job"
    assert run["metrics.test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert run["params.train.epochs"] == "2"


# ------------------------------------------------------------------ in-process Ray
def test_two_workers_match_one_process(ray_runtime, digits_synthetic, tmp_path):
    """Same data, config and seed: 2 DDP workers (global batch split in two) vs one process."""
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.distributed.train import train_distributed

    train, ann, test = digits_synthetic
    over = {"train.epochs": 6, "train.warmup_epochs": 4, "coreg.feature_delay": 0,
            "coreg.sharpen_T": 0.1}
    single = CoReg(tiny_config(**over), progress=False)
    acc1 = single.fit(train, ann, test)["test_accuracy"]
    m = train_distributed(train, ann, tmp_path / "two", tiny_config(**over), test_images=test,
                          workers=2, mlflow=False, log=lambda *a: None)
    acc2 = m["test_accuracy"]
    print(f"\n1 process: {acc1:.4f}  2 workers: {acc2:.4f}")
    assert acc1 > 0.5 and acc2 > 0.5
    # Same algorithm, other random draws (each rank its own views and shuffles of its half):
    # on this tiny run the seed noise alone is large. Measured 2026-12-06 with BatchNorm over
    # both workers and the alignment in one process's order (seeds 0/1/2): 1 process 0.719 /
    # 0.599 / 0.683, 2 workers 0.593 / 0.685 / 0.719: per seed up to 0.126 apart, means 0.1
    # point apart. That the two paths compute the same thing is tests/test_sharded_equivalence.py.
    assert abs(acc1 - acc2) < 0.15
    # every phase ran distributed: divide/GMM, prototypes and the MoCo queue
    last = m["history"][-1]
    assert last["phase"] == "coreg" and 0 < last["p_fraction"] < 1
    assert last["loss_prot"] > 0 and last["loss_cont"] > 0
    # the DDP replicas stayed identical and the exported model predicts like the trainer
    from coreg_ray.coreg.trainer import Classifier

    clf = Classifier.load(tmp_path / "two" / "model.pt", "cpu")
    assert clf.evaluate(test)["accuracy"] == pytest.approx(acc2, abs=1e-6)
    # the run's folder holds what `train` without workers writes, curves.png included
    from coreg_ray.runs import OUTPUT_FILES

    for f in OUTPUT_FILES:
        assert (tmp_path / "two" / f).is_file(), f
    assert (tmp_path / "two" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_killed_mid_run_restarts_and_relaunch_resumes(ray_runtime, digits_synthetic,
                                                             tmp_path, monkeypatch, mlflow_store):
    from coreg_ray.distributed.train import FailOnce, train_distributed

    monkeypatch.chdir(tmp_path)
    train, ann, test = digits_synthetic
    sub = np.arange(500)
    train, ann = train.subset(sub), ann.subset(sub)
    uri = mlflow_store
    cfg = lambda: tiny_config(**{"train.epochs": 4, "train.warmup_epochs": 2,  # noqa: E731
                                 "tracking.mlflow": True, "tracking.tracking_uri": uri})
    # rank 1 dies (os._exit) 4 s after reporting epoch 2; FailureConfig restarts the worker
    # group from the last checkpoint Ray Train registered
    m = train_distributed(train, ann, tmp_path / "ft", cfg(), test_images=test, workers=2,
                          max_failures=1, log=lambda *a: None,
                          callbacks=[FailOnce(1, tmp_path / "killed", rank=1, delay_s=4)])
    assert (tmp_path / "killed").exists()
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3]  # every epoch, once
    assert len(m["restored_from_epochs"]) == 1 and m["restored_from_epochs"][0] in (0, 1)
    print(f"\nfault run: restored after epoch index {m['restored_from_epochs']}, "
          f"test acc {m['test_accuracy']:.4f}")
    # launching the (finished) run again with the same name resumes it: nothing is retrained
    again = train_distributed(train, ann, tmp_path / "ft", cfg(), test_images=test, workers=2,
                              log=lambda *a: None)
    assert again["history"] == m["history"]
    runs = _runs(uri)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # the relaunch reused its run
    assert runs.iloc[0]["metrics.test_accuracy"] == pytest.approx(m["test_accuracy"])


def test_asha_sweep_logs_trials_as_mlflow_children(ray_runtime, tmp_path, monkeypatch,
                                                   mlflow_store):
    import yaml

    from coreg_ray.cli import main

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store
    sweep = {
        "data": {"images": "digits:train", "test_images": "digits:test", "holdout": 0.1,
                 "annotations": {"synthetic": {"q": 0.3, "eta": 0.1, "seed": 0}}},
        "base": {"model": {"backbone": "mlp"}, "data": {"hflip": False},
                 "train": {"epochs": 4, "warmup_epochs": 2, "batch_size": 64,
                           "warmup_batch_size": 128},
                 "coreg": {"feature_delay": 0, "queue_size": 256},
                 "tracking": {"tracking_uri": uri}},
        "search": {"train.warmup_epochs": {"choice": [1, 2]},
                   "train.lr": {"loguniform": [0.003, 0.05]},
                   "coreg.beta1": {"loguniform": [0.01, 1.0]},
                   "coreg.beta2": {"loguniform": [0.01, 1.0]},
                   "coreg.sharpen_T": {"choice": [0.1, 0.5]},
                   "coreg.proto_temp": {"uniform": [0.1, 0.5]},
                   "coreg.cont_temp": {"loguniform": [0.03, 0.3]}},
        "num_samples": 4, "metric": "val_candidate_agreement", "mode": "max",
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1}, "output": str(tmp_path / "sweep"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    t0 = time.perf_counter()
    assert main(["tune", "--config", str(tmp_path / "sweep.yaml")]) == 0
    wall = time.perf_counter() - t0
    s = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(s["trials"]) == 4 and s["trials_failed"] == 0
    assert s["trials_completed"] >= 1
    assert (tmp_path / "sweep" / "best" / "model.pt").exists()
    assert "train:\n  epochs: 4" in (tmp_path / "sweep" / "best" / "config.yaml").read_text()
    for t in s["trials"]:
        assert 0 <= t["val_candidate_agreement"] <= 1 and 0 <= t["test_accuracy"] <= 1
    print(f"\nsweep: {wall:.0f} s, {s['trials_completed']} completed, "
          f"{s['trials_stopped_early']} stopped early, ranking {s['ranking']}")
    runs = _runs(uri)
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parent) == 1 and len(children) == 4
    assert set(children["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    assert set(children["status"]) == {"FINISHED"} and parent.iloc[0]["status"] == "FINISHED"
    assert children["metrics.val_candidate_agreement"].notna().all()
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    best = children[children["tags.best_trial"] == "true"]
    assert len(best) == 1
    # the best trial's student is an MLflow model on its run (runs:/<id>/model), which
    # predicts what the best model.pt predicts
    assert s["mlflow_model_uri"] == f"runs:/{best.iloc[0]['run_id']}/model"
    assert "model" in [a.path for a in client.list_artifacts(best.iloc[0]["run_id"])]
    hist = client.get_metric_history(best.iloc[0]["run_id"], "val_candidate_agreement")
    assert [h.step for h in hist] == [0, 1, 2, 3]
    import pandas as pd

    from coreg_ray.coreg.classifier import Classifier
    from coreg_ray.data import load_image_table
    from coreg_ray.mlflow_model import encode_png

    test = load_image_table("digits:test").subset(np.arange(20))
    got = mlflow.pyfunc.load_model(s["mlflow_model_uri"]).predict(
        pd.DataFrame({"image": encode_png(test.images, len(test))}))
    want = Classifier.load(tmp_path / "sweep" / "best" / "model.pt", "cpu").predict(test.images)
    assert (np.asarray(got["label"]) == np.asarray(want)).all()


def test_sweep_file_errors_are_one_line(tmp_path):
    import yaml

    from coreg_ray.distributed.tune import Sweep
    from coreg_ray.errors import CoregError

    base = {"data": {"images": "digits:train", "annotations": "a.parquet"},
            "base": {"train": {"epochs": 4}}, "search": {"train.lr": {"loguniform": [0.001, 0.1]}}}
    cases = [({"search": {"train.lrr": 0.1}}, "does not exist"),
             ({"search": {"train.warmup_epochs": {"randint": [1, 9]}}}, "keep it below"),
             ({"search": {"train.lr": {"normal": [0, 1]}}}, "must be a value or one of"),
             ({"metric": "accuracy"}, "metric must be one of"),
             ({"metric": "test_accuracy"}, "needs data.test_images"),
             ({"bogus": 1}, "unknown key")]
    for change, message in cases:
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(CoregError, match=message):
            Sweep.load(tmp_path / "s.yaml")


def test_distributed_train_input_errors_are_one_line_before_ray_starts(tmp_path, capsys):
    from coreg_ray.cli import main

    assert main(["synth", "--images", "digits:test", "--q", "0.1", "--eta", "0",
                 "--output", str(tmp_path / "ann.parquet")]) == 0
    common = ["train", "--images", "digits:test", "--annotations", str(tmp_path / "ann.parquet"),
              "--output", str(tmp_path / "o"), "--no-mlflow"]
    for extra, message in [(["--workers", "2", "--set", "model.backbone=nope"], "unknown backbone"),
                           (["--workers", "-1"], "--workers: -1 is out of range"),
                           (["--workers", "2", "--set", "train.warmup_epochs=900"], "warmup_epochs")]:
        capsys.readouterr()
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("coreg-ray: error:") and message in err and "\n" not in err
