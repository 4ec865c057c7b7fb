"""Issue 12, category 6: the remaining tracebacks and misleading messages, each now one line
that says what was wrong or what was looked for."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coreg_ray.cli import main
from coreg_ray.errors import CoregError


def _err(capsys, argv) -> str:
    """Run the CLI: exit 2 and exactly one line on stderr, returned without the prefix."""
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coreg-ray: error: "), cap.err
    return lines[0][len("coreg-ray: error: "):]


@pytest.fixture
def ann(tmp_path, capsys):
    path = tmp_path / "ann.parquet"
    assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0", "--output",
                 str(path)]) == 0
    capsys.readouterr()
    return path


@pytest.mark.parametrize("block, message", [
    (b'{"num_classes": 10, "cl', "the coreg_ray metadata block is not valid JSON"),
    (b"\xff\xfe", "the coreg_ray metadata block is not valid JSON"),
    (b"[1, 2]", "the coreg_ray metadata block must be a JSON object, got list"),
    (b'{"num_classes": "ten"}', "the coreg_ray metadata block says num_classes='ten'"),
])
def test_corrupt_metadata_block(ann, tmp_path, capsys, block, message):
    t = pq.read_table(ann)
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.replace_schema_metadata({b"coreg_ray": block}), bad)
    assert message in _err(capsys, ["report", "--annotations", str(bad)])
    assert message in _err(capsys, ["train", "--images", "digits:train", "--annotations",
                                    str(bad), "--output", str(tmp_path / "run"), "--no-mlflow"])
    assert not (tmp_path / "run").exists()


def test_torchvision_specs(tmp_path, capsys):
    from coreg_ray.data import load_image_table

    (tmp_path / "folder").mkdir()
    with pytest.raises(CoregError, match=r"for a folder of class sub-folders pass the folder "
                                         r"itself \(--images .*folder\)"):
        load_image_table(f"torchvision:ImageFolder:{tmp_path / 'folder'}")
    with pytest.raises(CoregError, match="torchvision has no dataset 'utils'"):
        load_image_table(f"torchvision:utils:{tmp_path}")
    with pytest.raises(CoregError, match="use torchvision:NAME:ROOT"):
        load_image_table("torchvision:CIFAR10")
    with pytest.raises(CoregError, match="root folder .*nowhere not found"):
        load_image_table(f"torchvision:CIFAR10:{tmp_path / 'nowhere'}")
    with pytest.raises(CoregError, match="not found on disk under .*downloads are off"):
        load_image_table(f"torchvision:CIFAR10:{tmp_path / 'folder'}:test")


@pytest.mark.parametrize("args, message", [
    (["--per-class", "0"], "--per-class: 0 is out of range (valid: >= 1)"),
    (["--feature-fraction", "2"], "--feature-fraction: 2.0 is out of range (valid: (0, 1])"),
    (["--feature-fraction", "0"], "--feature-fraction: 0.0 is out of range (valid: (0, 1])"),
    (["--templates", "0"], "--templates: 0 is out of range (valid: >= 1)"),
    (["--limit", "-5"], "--limit: -5 is out of range (valid: >= 1)"),
    (["--seed", "-1"], "--seed: -1 is out of range (valid: [0, 4294967295])"),
    (["--like", "clip-vitb32", "--dataset", "mnist"],
     "--dataset: 'mnist' is not valid (valid: one of cifar10, cifar100, eurosat, fmnist, gtsrb, svhn)"),
    (["--dataset", "gtsrb"], "--like and --dataset go together"),
    (["--partial-acc", "0.8", "--avg-candidates", "2", "--zero-shot", "1"],
     "--zero-shot: 1.0 is out of range (valid: (0, 1))"),
    (["--partial-acc", "0.8", "--avg-candidates", "2"], "(missing: zero_shot)"),
    (["--features", "voxels"], "argument --features: invalid choice: 'voxels'"),
])
def test_simulate_annotator_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "s.parquet"
    assert message in _err(capsys, ["simulate-annotator", "--images", "digits:train",
                                    "--output", str(out)] + args)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_device_and_model_keys(tmp_path, capsys):
    import torch

    assert "--device: 'banana' is not valid (valid: auto, cpu, mps, cuda or cuda:N)" in _err(
        capsys, ["evaluate", "--model", "nope.pt", "--images", "digits:test", "--device", "banana"])
    torch.save({"format": "coreg-ray/1", "backbone": "mlp"}, tmp_path / "m.pt")
    assert _err(capsys, ["evaluate", "--model", str(tmp_path / "m.pt"), "--images",
                         "digits:test"]) == (
        f"{tmp_path / 'm.pt'}: incomplete coreg-ray model (missing num_classes, classes, "
        "image_size, proj_dim, mean, std, nets)")


def test_say_what_was_looked_for(tmp_path, capsys, ann):
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("x")
    assert _err(capsys, ["report", "--annotations", str(ann), "--images",
                         str(tmp_path / "empty")]) == (
        f"{tmp_path / 'empty'}: no images found: no .parquet table and no image files "
        "(bmp/gif/jpeg/jpg/png/tif/tiff/webp) in the folder or below it")
    assert "in the folder or below it (1 other files)" in _err(
        capsys, ["report", "--annotations", str(ann), "--images", str(tmp_path / "classes")])
    assert _err(capsys, ["train", "--images", "digits:train", "--annotations", str(ann),
                         "--config", str(tmp_path / "empty"), "--output",
                         str(tmp_path / "run")]) == (
        f"config file {tmp_path / 'empty'}: is a folder, not a YAML file")
    assert _err(capsys, ["report", "--annotations", str(ann), "--images", "digits:train",
                         "--limit", "-5"]) == "--limit: -5 is out of range (valid: >= 1)"
    assert _err(capsys, ["annotate", "--images", str(tmp_path / "empty"), "--annotator",
                         "clip:RN50/random", "--output", str(tmp_path / "a.parquet")]).startswith(
        f"{tmp_path / 'empty'}: no images found: no .parquet table and no image files")
    # --limit also in the library, for callers that do not come through the CLI
    from coreg_ray.data import load_image_table

    with pytest.raises(CoregError, match=r"--limit: -5 is out of range"):
        load_image_table("digits:train", limit=-5)


def test_report_on_an_empty_table_prints_json(tmp_path, capsys):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64()),
                             "candidates": pa.array([], pa.list_(pa.int32()))}), path)
    assert main(["report", "--annotations", str(path)]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"images": 0, "avg_candidates": None, "set_size_histogram": {}}
    assert "NaN" not in cap.out and cap.err == ""


def test_a_failed_annotate_leaves_no_plan_that_blocks_the_rerun(tmp_path, capsys):
    """The first run stops on an unreadable image (--fail-on-bad-image) before any shard is
    finished; a rerun with other settings is not refused because of its plan.json."""
    pytest.importorskip("open_clip")
    blobs = []
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    blobs.append(b"not an image")
    (tmp_path / "imgs").mkdir()
    pq.write_table(pa.table({"id": pa.array(range(8), pa.int64()),
                             "image": pa.array(blobs, pa.binary()),
                             "label": pa.array([i % 2 for i in range(8)], pa.int16())}),
                   tmp_path / "imgs" / "train.parquet")
    (tmp_path / "imgs" / "classes.json").write_text(json.dumps(["cat", "dog"]))
    base = ["annotate", "--images", str(tmp_path / "imgs"), "--annotator",
            "clip:ViT-S-32-alt/random", "--engine", "local", "--image-size", "32",
            "--output", str(tmp_path / "ann.parquet")]
    assert main(base + ["--fail-on-bad-image"]) == 2  # stops while annotating (after a bar)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("coreg-ray: error: ") and "image of row id 7 cannot be decoded" in err
    assert not (tmp_path / "ann.parquet.parts").exists()
    assert main(base + ["--mode", "topk:1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1
    assert (tmp_path / "ann.parquet").exists()


@pytest.mark.slow
def test_sigterm_marks_the_mlflow_run_killed(tmp_path, mlflow_store):
    """SIGTERM stops `train` like Ctrl-C: exit 143, the checkpoint kept, the MLflow run KILLED
    (it used to stay RUNNING forever)."""
    assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0", "--output",
                 str(tmp_path / "ann.parquet")]) == 0
    cmd = [sys.executable, "-m", "coreg_ray.cli", "train", "--images", "digits:train",
           "--annotations", str(tmp_path / "ann.parquet"), "--output", str(tmp_path / "run"),
           "--set", "model.backbone=mlp", "--set", "train.epochs=400", "--set",
           "train.warmup_epochs=1", "--set", "train.batch_size=128", "--set",
           "coreg.queue_size=256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "terminated: the last finished epoch is checkpointed" in err
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)  # the default store of a run in tmp_path
    try:
        runs = mlflow.search_runs(experiment_names=["coreg-ray"])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(runs["status"]) == ["KILLED"]
