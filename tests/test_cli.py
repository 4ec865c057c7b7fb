"""The `coreg-ray` command line as a user runs it: real files, real MLflow store."""
import json
import subprocess
import sys

import pytest

from coreg_ray.cli import main


def run(*args):
    return main(list(args))


def test_synth_train_evaluate_with_mlflow(tmp_path, monkeypatch, capsys, mlflow_store):
    monkeypatch.chdir(tmp_path)
    assert run("synth", "--images", "digits:train", "--q", "0.2", "--eta", "0.1",
               "--output", "ann.parquet") == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0.85 < stats["partial_accuracy"] < 0.95  # eta=0.1 removes ~10% of truths
    rc = run("train", "--images", "digits:train", "--annotations", "ann.parquet",
             "--test-images", "digits:test", "--output", "run",
             "--set", "model.backbone=mlp", "--set", "data.hflip=false",
             "--set", "train.epochs=3", "--set", "train.warmup_epochs=1",
             "--set", "train.batch_size=128", "--set", "coreg.queue_size=256")
    assert rc == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_accuracy", "annotator_accuracy", "partial_accuracy", "avg_candidates",
                "epochs", "seconds"):
        assert m[key] is not None, key
    assert m["epochs"] == 3 and len(m["history"]) == 3
    assert (tmp_path / "run" / "model.pt").exists()
    assert "train:\n  epochs: 3" in (tmp_path / "run" / "config.yaml").read_text()
    # MLflow: embedded SQLite store in the working directory (mlflow_store: its tables made
    # already), one finished run with metrics
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["coreg-ray"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert runs.iloc[0]["params.train.epochs"] == "3"
    capsys.readouterr()
    assert run("evaluate", "--model", "run/model.pt", "--images", "digits:test") == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(m["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["train", "--images", "nope.parquet", "--annotations", "a.parquet", "--output", "o"],
     "image table not found: nope.parquet"),
    (["train", "--images", "digits:train", "--annotations", "missing.parquet", "--output", "o"],
     "annotation table not found"),
    (["train", "--images", "digits:train", "--annotations", "ann.parquet", "--output", "o",
      "--set", "train.epoch=3"], "config key 'train.epoch' does not exist"),
    (["synth", "--images", "digits", "--q", "2", "--eta", "0", "--output", "x.parquet"],
     "--q: 2.0 is out of range (valid: [0, 1])"),
    (["train", "--images", "digits:test", "--annotations", "ann.parquet", "--output", "o"],
     "image ids have no annotation"),
    (["evaluate", "--model", "nope.pt", "--images", "digits:test"], "model not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert run("synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
               "--output", "ann.parquet") == 0
    capsys.readouterr()
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coreg-ray: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert not (tmp_path / "x.parquet").exists()


def test_simulate_annotator_with_patch_features(tmp_path, capsys):
    from coreg_ray.data import read_annotations

    assert run("simulate-annotator", "--images", "digits:train", "--features", "patches",
               "--templates", "4", "--per-class", "5", "--test-images", "digits:test",
               "--test-output", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "a.parquet")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    test_stats, stats = json.loads(lines[0])["test"], json.loads(lines[1])
    assert stats["images"] == 1438 and test_stats["images"] == 359
    assert test_stats["ensemble_accuracy"] > 0.5  # digits through the patch encoder
    ann = read_annotations(tmp_path / "a.parquet", 10)
    assert ann.meta["annotator"].endswith("features=patches") and ann.meta["simulated"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "coreg_ray.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for sub in ("synth", "simulate-annotator", "train", "evaluate", "quickstart"):
        assert sub in out


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    """SIGINT mid-run: exit code 130, a checkpoint of the last finished epoch, no metrics.json;
    `--resume` then finishes every epoch."""
    import signal
    import time

    assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0.0",
                 "--output", str(tmp_path / "ann.parquet")]) == 0
    cmd = [sys.executable, "-m", "coreg_ray.cli", "train", "--images", "digits:train",
           "--annotations", str(tmp_path / "ann.parquet"), "--output", str(tmp_path / "run"),
           "--no-mlflow", "--set", "model.backbone=mlp", "--set", "train.epochs=400",
           "--set", "train.warmup_epochs=2", "--set", "train.batch_size=128",
           "--set", "coreg.queue_size=256"]
    # A shell's background job (`cmd &`) inherits SIGINT *ignored*, and Python then leaves it
    # ignored: give the child the disposition a terminal would, so this tests the CLI only.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    time.sleep(1.0)
    # 400 epochs (~5 min): a loaded machine that delays this signal must not let the run finish
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    assert not (tmp_path / "run" / "metrics.json").exists()
    import torch

    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 0 <= done < 399
    short = [c if c != "train.epochs=400" else f"train.epochs={done + 3}" for c in cmd]
    res = subprocess.run(short + ["--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == list(range(done + 3))
