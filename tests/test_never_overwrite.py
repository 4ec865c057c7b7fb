"""Issue 23: never overwrite what the user gave, never compare the incomparable, stop cleanly
when training breaks. Each case as in tests/test_bad_inputs.py: exit status 2, at most three
lines, no traceback, and every file under the folder holding the inputs and outputs (inputs,
the finished run, the output locations) byte- and mtime-identical afterwards. The cases that
must succeed (a run replaced with --overwrite, predictions without a score, an error row for an
oversized image, the divergence stop) follow the table."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from coreg_ray.cli import main
from tests.test_bad_inputs import TRAIN, _check, snapshot

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _table(folder, classes, n=20):
    """The first n digits test images as folder/train.parquet with these class names."""
    from coreg_ray.data import load_image_table, write_image_table

    t = load_image_table("digits:test", limit=n)
    t.classes = list(classes)
    write_image_table(t, folder / "train.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from coreg_ray.data import load_image_table, write_image_table

    w = tmp_path_factory.mktemp("world23")
    cwd = os.getcwd()
    os.chdir(w)
    try:
        assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
                     "--output", "ann.parquet"]) == 0
        assert main(["train", "--images", "digits:train", "--annotations", "ann.parquet",
                     "--output", "run"] + TRAIN) == 0
        assert main(["synth", "--images", "digits:train", "--limit", "300", "--q", "0.1",
                     "--eta", "0", "--output", "ann300.parquet"]) == 0
    finally:
        os.chdir(cwd)
    write_image_table(load_image_table("digits:test", limit=20), w / "pool.parquet")
    os.symlink(w / "pool.parquet", w / "link.parquet")
    _table(w / "pool", [str(i) for i in range(10)])
    _table(w / "cifar", CIFAR)
    _table(w / "ansi", [f"\x1b[31mred{i}\x1b[0m" for i in range(10)])
    (w / "notes.txt").write_text("my notes\n")
    (w / "half").mkdir()  # a run killed after its first checkpoint
    for f in ("config.yaml", "checkpoint.pt"):
        shutil.copy2(w / "run" / f, w / "half" / f)
    (w / "nockpt").mkdir()  # a finished run whose checkpoint was deleted
    for f in ("config.yaml", "model.pt", "metrics.json"):
        shutil.copy2(w / "run" / f, w / "nockpt" / f)
    sweep = {"data": {"images": "digits:train", "annotations": {"synthetic": {"q": 0.3}}},
             "search": {"train.lr": {"loguniform": [0.003, 0.05]}}, "num_samples": 2,
             "output": str(w / "sweep")}
    (w / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (w / "sweep").mkdir()
    (w / "sweep" / "sweep.json").write_text('{"mlflow_model_uri": "runs:/x/model"}')
    import pickle

    (w / "raw.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}))
    with warnings.catch_warnings():  # torch.jit's deprecation notes
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), w / "ts.pt")
    return w


def _cases():
    """(id, argv with {w} = the world folder, expected words, extra environment)."""
    pr = ["predict", "--model", "{w}/run/model.pt", "--engine", "local"]
    tr = ["train", "--images", "digits:train", "--annotations", "{w}/ann.parquet"]
    sy = ["synth", "--q", "0.1", "--eta", "0"]
    sim = ["simulate-annotator", "--partial-acc", "0.9", "--avg-candidates", "2",
           "--zero-shot", "0.5"]
    ann = ["annotate", "--annotator", "clip:ViT-S-32-alt/random", "--engine", "local"]
    net = ["--set", "tracking.mlflow=true"]
    return [
        # -- an output that is, or lies inside, an input: refused before anything is read
        ("predict-output-is-images", pr + ["--images", "{w}/pool.parquet", "--output",
                                           "{w}/pool.parquet"], "is the --images input", None),
        ("predict-output-symlink-to-images", pr + ["--images", "{w}/pool.parquet", "--output",
                                                   "{w}/link.parquet"], "is the --images input",
         None),
        ("predict-output-dotdot-images", pr + ["--images", "{w}/pool.parquet", "--output",
                                               "{w}/pool/../pool.parquet"],
         "is the --images input", None),
        ("predict-output-inside-images-folder", pr + ["--images", "{w}/pool", "--output",
                                                      "{w}/pool/pred.parquet"],
         "lies inside the --images input folder", None),
        ("predict-output-is-model", pr + ["--images", "{w}/pool.parquet", "--output",
                                          "{w}/run/model.pt"], "is the --model input", None),
        ("predict-output-not-parquet", pr + ["--images", "{w}/pool.parquet", "--output",
                                             "{w}/notes.txt"], "not a Parquet table", None),
        ("synth-output-is-images", sy + ["--images", "{w}/pool.parquet", "--output",
                                         "{w}/pool.parquet"], "is the --images input", None),
        ("synth-output-inside-images-folder", sy + ["--images", "{w}/pool", "--output",
                                                    "{w}/pool/ann.parquet"],
         "lies inside the --images input folder", None),
        ("synth-output-not-parquet", sy + ["--images", "digits:train", "--output",
                                           "{w}/notes.txt"], "not a Parquet table", None),
        ("sim-output-is-images", sim + ["--images", "{w}/pool.parquet", "--output",
                                        "{w}/pool.parquet"], "is the --images input", None),
        ("sim-test-output-is-test-images", sim + ["--images", "digits:train", "--output",
                                                  "{w}/s.parquet", "--test-images",
                                                  "{w}/pool.parquet", "--test-output",
                                                  "{w}/pool.parquet"],
         "is the --test-images input", None),
        ("annotate-output-is-images", ann + ["--images", "{w}/pool.parquet", "--output",
                                             "{w}/pool.parquet"], "is the --images input", None),
        ("annotate-output-inside-images-folder", ann + ["--images", "{w}/pool", "--output",
                                                        "{w}/pool/a.parquet"],
         "lies inside the --images input folder", None),
        ("annotate-report-inside-images-folder", ann + ["--images", "{w}/pool", "--output",
                                                        "{w}/a.parquet", "--report",
                                                        "{w}/pool/rep"],
         "lies inside the --images input folder", None),
        ("export-output-is-model", ["export", "--model", "{w}/run/model.pt", "--format",
                                    "torchscript", "--output", "{w}/run/model.pt"],
         "is the --model input", None),
        ("train-output-inside-images-folder", ["train", "--images", "{w}/pool", "--annotations",
                                               "{w}/ann.parquet", "--output", "{w}/pool/run"]
         + TRAIN, "lies inside the --images input folder", None),
        ("train-output-file-is-annotations", ["train", "--images", "digits:train",
                                              "--annotations", "{w}/run/metrics.json",
                                              "--output", "{w}/run"] + TRAIN,
         "is the --annotations input", None),
        # -- a run folder is never replaced silently, config.yaml always describes model.pt
        ("train-into-finished-run", tr + ["--output", "{w}/run"] + TRAIN,
         "holds a finished run; --resume to continue it or --overwrite to replace it", None),
        ("train-into-unfinished-run", tr + ["--output", "{w}/half"] + TRAIN,
         "holds an unfinished run (checkpoint.pt); --resume to continue it or --overwrite", None),
        ("train-resume-without-checkpoint", tr + ["--output", "{w}/nockpt", "--resume",
                                                  "--no-mlflow"],
         "holds a finished run but no checkpoint.pt: nothing to resume from", None),
        ("train-resume-finished-other-settings", tr + ["--output", "{w}/run", "--resume",
                                                       "--no-mlflow", "--set",
                                                       "coreg.sharpen_T=0.7"],
         "would train nothing", None),
        ("train-resume-finished-same-settings", tr + ["--output", "{w}/run", "--resume",
                                                      "--no-mlflow"], "nothing to resume", None),
        ("train-resume-and-overwrite", tr + ["--output", "{w}/run", "--resume", "--overwrite",
                                             "--no-mlflow"], "give one of them", None),
        ("train-resume-mlflow-unreachable", tr + ["--output", "{w}/run", "--resume", "--set",
                                                  "train.epochs=3"] + net,
         "cannot be reached", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
        ("train-new-mlflow-unreachable", tr + ["--output", "{w}/new"] + TRAIN[:-1],
         "cannot be reached", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
        ("train-workers-mlflow-unreachable", tr + ["--output", "{w}/new", "--workers", "1"]
         + TRAIN[:-1], "cannot be reached", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
        ("train-mlflow-sqlite-folder-missing", tr + ["--output", "{w}/new"] + TRAIN[:-1],
         "does not exist", {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent-23/mlruns.db"}),
        # -- absurd values: one line, before any allocation
        ("train-queue-size-1e12", tr + ["--output", "{w}/new", "--set", "coreg.queue_size=1e12",
                                        "--no-mlflow"], "coreg.queue_size': 1000000000000", None),
        ("train-proj-dim-1e12", tr + ["--output", "{w}/new", "--set",
                                      "model.proj_dim=1000000000000", "--no-mlflow"],
         "model.proj_dim", None),
        ("train-lr-1e300", tr + ["--output", "{w}/new", "--set", "train.lr=1.0e+300",
                                 "--no-mlflow"], "train.lr': 1e+300 is out of range", None),
        ("train-sharpen-T-1e300", tr + ["--output", "{w}/new", "--set",
                                        "coreg.sharpen_T=1.0e+300", "--no-mlflow"],
         "coreg.sharpen_T", None),
        ("train-memory", tr + ["--output", "{w}/new"] + TRAIN + [
            "--set", "coreg.queue_size=4000000", "--set", "model.proj_dim=8192"],
         "GiB up front", None),
        # -- classes always compared
        ("evaluate-digits-model-on-cifar", ["evaluate", "--model", "{w}/run/model.pt",
                                            "--images", "{w}/cifar"],
         "evaluate it on a table of its classes", None),
        ("evaluate-ansi-class-names", ["evaluate", "--model", "{w}/run/model.pt", "--images",
                                       "{w}/ansi"], "\\x1b[31mred0", None),
        # -- what a file is, without warnings
        ("evaluate-raw-pickle", ["evaluate", "--model", "{w}/raw.pkl", "--images",
                                 "digits:test"], "a plain pickle file", None),
        ("evaluate-torchscript", ["evaluate", "--model", "{w}/ts.pt", "--images", "digits:test"],
         "a TorchScript program", None),
        ("predict-torchscript", ["predict", "--model", "{w}/ts.pt", "--images",
                                 "{w}/pool.parquet", "--output", "{w}/p.parquet", "--engine",
                                 "local"], "a TorchScript program", None),
        ("evaluate-device-missing", ["evaluate", "--model", "{w}/run/model.pt", "--images",
                                     "digits:test", "--device", "cuda:3"], "--device cuda:3",
         None),
        ("sim-avg-candidates-above-classes", ["simulate-annotator", "--images", "digits:train",
                                              "--partial-acc", "0.9", "--avg-candidates", "15",
                                              "--zero-shot", "0.5", "--output", "{w}/s.parquet"],
         "--avg-candidates: 15 is more than the 10 classes", None),
        ("tune-relaunch-finished-sweep", ["tune", "--config", "{w}/sweep.yaml", "--no-mlflow"],
         "holds a finished sweep", None),
        ("synth-image-over-pixel-cap", sy + ["--images", "{w}/pool.parquet", "--output",
                                             "{w}/s.parquet"], "pixels, more than the 10",
         {"COREG_RAY_MAX_IMAGE_PIXELS": "10"}),
    ]


def _argv(argv, w):
    return [a.replace("{w}", str(w)) for a in argv]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_refused_in_one_line_touching_nothing(world, case, capsys, monkeypatch):
    name, argv, expect, env = case
    if name == "annotate-output-is-images" or name.startswith("annotate-"):
        pytest.importorskip("open_clip")
    if name == "evaluate-device-missing" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    monkeypatch.chdir(world)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    before = snapshot(world)
    rc = main(_argv(argv, world))
    cap = capsys.readouterr()
    _check(rc, cap.out + cap.err, expect)
    assert "\x1b" not in cap.out + cap.err  # escapes shown, never sent raw
    assert snapshot(world) == before


# ------------------------------------------------------------------ what must still work
def test_overwrite_replaces_a_finished_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    old = (run / "model.pt").stat().st_mtime_ns
    assert main(["train", "--images", "digits:train", "--annotations",
                 str(world / "ann.parquet"), "--output", str(run), "--overwrite"] + TRAIN) == 0
    assert (run / "model.pt").stat().st_mtime_ns != old
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_predict_labels_a_pool_of_other_classes_without_a_score(world, tmp_path, capsys):
    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", str(world / "run" / "model.pt"), "--images",
                 str(world / "cifar"), "--output", str(out), "--engine", "local"]) == 0
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert "accuracy" not in s and "other classes" in s["accuracy_note"]
    assert "note: no accuracy" in cap.err
    assert pq.read_table(out).num_rows == 20
    # the same pool under the model's own class names is scored
    assert main(["predict", "--model", str(world / "run" / "model.pt"), "--images",
                 str(world / "pool"), "--output", str(tmp_path / "q.parquet"), "--engine",
                 "local"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


def test_classes_are_always_compared():
    from coreg_ray.data.tables import classes_differ

    digits = [str(i) for i in range(10)]
    assert classes_differ(digits, CIFAR) and classes_differ(CIFAR, digits)
    assert not classes_differ(digits, list(digits)) and not classes_differ(CIFAR, list(CIFAR))
    assert classes_differ(digits, digits[:5])


def test_an_oversized_image_is_an_error_row_in_predict(world, tmp_path, capsys, monkeypatch):
    """One 64x64 image among 8x8 ones, a cap of 1000 pixels: that row is an error row (header
    read only), the others are predicted."""
    from PIL import Image

    t = pq.read_table(world / "pool.parquet")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    blobs = t.column("image").to_pylist()
    blobs[3] = buf.getvalue()
    (tmp_path / "big").mkdir()
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image",
                                pa.array(blobs, pa.binary())), tmp_path / "big" / "train.parquet")
    monkeypatch.setenv("COREG_RAY_MAX_IMAGE_PIXELS", "1000")
    assert main(["predict", "--model", str(world / "run" / "model.pt"), "--images",
                 str(tmp_path / "big"), "--output", str(tmp_path / "p.parquet"), "--engine",
                 "local"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["rows"], s["predicted"], s["errors"]) == (20, 19, 1)
    err = pq.read_table(tmp_path / "p.parquet").column("error").to_pylist()
    assert "4,096 pixels, more than the 1,000 allowed" in err[3]


def test_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(
        world, tmp_path, capsys, monkeypatch):
    """The weights turn non-finite in the third epoch (as with a far too high train.lr): the run
    stops there with one line naming the epoch and train.lr, exit 2, no model.pt, and the
    checkpoint on disk is epoch 2's, finite."""
    from coreg_ray.coreg import trainer as tr

    real = tr.CoReg.divide

    def poisoned(self, epoch):
        if epoch == 2:
            with torch.no_grad():
                for p in self.raw_nets[0].parameters():
                    p.mul_(float("inf"))
        return real(self, epoch)

    monkeypatch.setattr(tr.CoReg, "divide", poisoned)
    out = tmp_path / "run"
    rc = main(["train", "--images", "digits:train", "--limit", "300", "--annotations",
               str(world / "ann300.parquet"), "--output", str(out)] + TRAIN
              + ["--set", "train.epochs=4", "--set", "train.batch_size=64"])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("coreg-ray: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert "training diverged at epoch 3" in lines[0] and "train.lr" in lines[0]
    assert "(epoch 2)" in lines[0]
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for n in state["nets"] for v in n.values()
               if torch.is_tensor(v) and v.is_floating_point())


def test_a_diverging_loss_is_caught_once_per_epoch_without_weights():
    from coreg_ray.coreg.divergence import Diverged, check_finite

    check_finite({"loss": 1.0, "loss_x": 2.0}, 0)
    with pytest.raises(Diverged, match="at epoch 5: the loss \\(loss\\) is not finite"):
        check_finite({"loss": float("nan")}, 4)
    net = torch.nn.Linear(2, 2)
    check_finite({"loss": 1.0}, 0, [net])
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(Diverged, match="the weights are not finite"):
        check_finite({"loss": 1.0}, 0, [net])


def test_check_not_input_rules(tmp_path):
    from coreg_ray.errors import CoregError
    from coreg_ray.outputs import check_not_input

    (tmp_path / "d").mkdir()
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    os.link(tmp_path / "a.parquet", tmp_path / "hard.parquet")
    check_not_input(tmp_path / "b.parquet", {"--images": tmp_path / "a.parquet"})
    check_not_input(tmp_path / "d2" / "x", {"--images": tmp_path / "d"})  # a sibling folder
    check_not_input("out.parquet", {"--images": "digits:train"})  # not a path: skipped
    with pytest.raises(CoregError, match="is the --images input"):
        check_not_input(tmp_path / "hard.parquet", {"--images": tmp_path / "a.parquet"})
    with pytest.raises(CoregError, match="lies inside the --images input folder"):
        check_not_input(tmp_path / "d" / "sub" / "x.parquet", {"--images": tmp_path / "d"})
    with pytest.raises(CoregError, match="is the --model input"):
        check_not_input("s3://b/model.pt", {"--model": "s3://b/model.pt"})


def test_resume_continues_the_mlflow_run_it_resumes(world, tmp_path, mlflow_store, capsys,
                                                    monkeypatch):
    """A run left RUNNING (as kill -9 leaves it), then --resume: the same MLflow run goes on
    and ends FINISHED; no second run beside it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    base = ["train", "--images", "digits:train", "--limit", "300", "--annotations",
            str(world / "ann300.parquet"), "--output", str(tmp_path / "run")] + TRAIN[:-1]
    assert main(base) == 0
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("coreg-ray").experiment_id])
    client.set_terminated(run.info.run_id, "RUNNING")  # what kill -9 leaves behind
    assert main(base + ["--resume", "--set", "train.epochs=3"]) == 0
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert 2 in steps


@pytest.mark.slow
def test_sigterm_in_predict_on_ray_keeps_the_shards_and_exits_143(world, tmp_path):
    """SIGTERM while Ray Data predicts: exit 143 (not Ray's sys.exit(15)), no traceback, one
    line saying the finished shards are kept; the same command then finishes the pool."""
    from coreg_ray.data import load_image_table, write_image_table

    write_image_table(load_image_table("digits:train"), tmp_path / "pool" / "train.parquet")
    out = tmp_path / "p.parquet"
    cmd = [sys.executable, "-m", "coreg_ray.cli", "predict", "--model",
           str(world / "run" / "model.pt"), "--images", str(tmp_path / "pool"), "--output",
           str(out), "--shard-size", "50", "--batch-size", "8", "--actors", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    parts = tmp_path / "p.parquet.parts"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not any(parts.glob("shard-*")):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "finished shard(s) kept in" in err, err[-2000:]
    assert not out.exists()


def test_sigterm_reraised_as_ctrl_c_by_a_library_still_exits_143(monkeypatch, capsys):
    """Ray Train turns the CLI's SIGTERM (Terminated) into a plain KeyboardInterrupt: the exit
    status is still SIGTERM's 143, not Ctrl-C's 130."""
    import coreg_ray.cli as cli
    from coreg_ray.errors import Terminated

    def stopped(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            raise KeyboardInterrupt() from None

    monkeypatch.setattr(cli, "cmd_report", stopped)
    assert cli.main(["report", "--annotations", "x.parquet"]) == 143
    monkeypatch.setattr(cli, "cmd_report", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["report", "--annotations", "x.parquet"]) == 130
