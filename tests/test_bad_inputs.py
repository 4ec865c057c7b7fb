"""Every command against a list of bad inputs (issue 12): exit status 2, at most three lines of
output, no traceback, and no new or changed file anywhere under the folder that holds the
inputs and the output locations (its files and their mtimes are snapshotted before and after).

Most cases run in-process (`coreg_ray.cli.main`); a few run as `python -m coreg_ray.cli` in a
subprocess, where a traceback would show on stderr as the user would see it.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from coreg_ray.cli import main

TRAIN = ["--set", "model.backbone=mlp", "--set", "data.hflip=false", "--set", "train.epochs=2",
         "--set", "train.warmup_epochs=1", "--set", "train.batch_size=128",
         "--set", "coreg.queue_size=256", "--no-mlflow"]


def _unwritable(root: Path) -> Path:
    """A folder nothing can be created in (a read-only folder; for root, /proc/self)."""
    ro = root / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores the mode bits
        return Path("/proc/self")
    return ro


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs every case needs, and a finished run whose files must survive every case."""
    from coreg_ray.data import load_image_table, write_image_table

    w = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(w)
    try:
        assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
                     "--output", "ann.parquet"]) == 0
        assert main(["synth", "--images", "digits:train", "--limit", "500", "--q", "0.1",
                     "--eta", "0", "--output", "ann500.parquet"]) == 0
        assert main(["train", "--images", "digits:train", "--annotations", "ann.parquet",
                     "--output", "run"] + TRAIN) == 0
    finally:
        os.chdir(cwd)
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 5
    np.savez(w / "five.npz", images=(d.images[keep][:200] / 16 * 255).astype(np.uint8),
             labels=d.target[keep][:200])
    (w / "afile").write_text("a file, not a folder\n")
    (w / "emptydir").mkdir()
    (w / "existing-exp").mkdir()
    (w / "existing-exp" / "results.jsonl").write_text("")
    write_image_table(load_image_table("digits:test", limit=20), w / "imgs" / "train.parquet")
    t = pq.read_table(w / "ann.parquet")
    pq.write_table(t.replace_schema_metadata({b"coreg_ray": b'{"num_classes": 10, "cl'}),
                   w / "corrupt-meta.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int64()),
                             "candidates": pa.array([], pa.list_(pa.int32()))}),
                   w / "no-rows.parquet")
    (w / "broken").mkdir()
    (w / "broken" / "config.yaml").write_bytes((w / "run" / "config.yaml").read_bytes())
    (w / "broken" / "checkpoint.pt").write_bytes((w / "run" / "checkpoint.pt").read_bytes()[:5000])
    m = torch.load(w / "run" / "model.pt", weights_only=True)
    del m["nets"]
    torch.save(m, w / "model-no-nets.pt")
    (w / "cfgdir").mkdir()
    exp = {"name": "t", "data": {"images": "digits:train", "test_images": str(w / "five.npz"),
                                 "limit": 100},
           "settings": [{"name": "s", "synthetic": {"q": 0.1, "eta": 0.0}}],
           "methods": ["coreg"], "seeds": [0],
           "config": {"model": {"backbone": "mlp"}, "train": {"epochs": 1, "warmup_epochs": 1}}}
    (w / "exp-5class.yaml").write_text(yaml.safe_dump(exp))
    exp["data"]["test_images"] = "digits:test"
    (w / "exp-ok.yaml").write_text(yaml.safe_dump(exp))
    unwritable = _unwritable(w)
    return {"root": w, "unwritable": unwritable}


def _cases():
    """(id, argv with {w} = the world folder and {ro} = an unwritable folder, expected words)."""
    T = TRAIN
    tr = ["train", "--images", "digits:train", "--annotations", "{w}/ann.parquet"]
    sim = ["simulate-annotator", "--images", "digits:train"]
    ev = ["evaluate", "--model", "{w}/run/model.pt", "--images", "digits:test"]
    ann = ["annotate", "--images", "{w}/imgs", "--annotator", "clip:ViT-S-32-alt/random",
           "--engine", "local", "--image-size", "32"]
    return [
        # -- synth
        ("synth-output-is-folder", ["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
                                    "--output", "{w}/run"], "is a folder"),
        ("synth-output-under-file", ["synth", "--images", "digits:train", "--q", "0.1", "--eta",
                                     "0", "--output", "{w}/afile/a.parquet"], "afile is a file"),
        ("synth-output-unwritable", ["synth", "--images", "digits:train", "--q", "0.1", "--eta",
                                     "0", "--output", "{ro}/a.parquet"], "cannot be written"),
        ("synth-q", ["synth", "--images", "digits:train", "--q", "2", "--eta", "0", "--output",
                     "{w}/x.parquet"], "--q"),
        ("synth-limit", ["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
                         "--limit", "-5", "--output", "{w}/x.parquet"], "--limit: -5"),
        ("synth-empty-folder", ["synth", "--images", "{w}/emptydir", "--q", "0.1", "--eta", "0",
                                "--output", "{w}/x.parquet"], "no images found"),
        # -- simulate-annotator
        ("sim-per-class-0", sim + ["--per-class", "0", "--output", "{w}/s.parquet"], "--per-class"),
        ("sim-feature-fraction-2", sim + ["--feature-fraction", "2", "--output", "{w}/s.parquet"],
         "--feature-fraction"),
        ("sim-feature-fraction-0", sim + ["--feature-fraction", "0", "--output", "{w}/s.parquet"],
         "--feature-fraction"),
        ("sim-templates-0", sim + ["--templates", "0", "--output", "{w}/s.parquet"], "--templates"),
        ("sim-limit", sim + ["--limit", "-5", "--output", "{w}/s.parquet"], "--limit"),
        ("sim-like-unknown", sim + ["--like", "gpt", "--dataset", "gtsrb", "--output",
                                    "{w}/s.parquet"], "--like"),
        ("sim-dataset-unknown", sim + ["--like", "clip-vitb32", "--dataset", "mnist", "--output",
                                       "{w}/s.parquet"], "--dataset"),
        ("sim-like-without-dataset", sim + ["--like", "clip-vitb32", "--output", "{w}/s.parquet"],
         "--like and --dataset"),
        ("sim-partial-acc-range", sim + ["--partial-acc", "1.5", "--avg-candidates", "2",
                                         "--zero-shot", "0.5", "--output", "{w}/s.parquet"],
         "--partial-acc"),
        ("sim-avg-candidates-range", sim + ["--partial-acc", "0.8", "--avg-candidates", "0.5",
                                            "--zero-shot", "0.5", "--output", "{w}/s.parquet"],
         "--avg-candidates"),
        ("sim-zero-shot-range", sim + ["--partial-acc", "0.8", "--avg-candidates", "2",
                                       "--zero-shot", "0", "--output", "{w}/s.parquet"],
         "--zero-shot"),
        ("sim-targets-incomplete", sim + ["--partial-acc", "0.8", "--output", "{w}/s.parquet"],
         "missing: avg_candidates, zero_shot"),
        ("sim-targets-inconsistent", sim + ["--partial-acc", "0.5", "--avg-candidates", "2",
                                            "--zero-shot", "0.7", "--output", "{w}/s.parquet"],
         "cannot exceed"),
        ("sim-templates-vs-avg", sim + ["--partial-acc", "0.8", "--avg-candidates", "4",
                                        "--zero-shot", "0.5", "--templates", "3", "--output",
                                        "{w}/s.parquet"], "average set size"),
        ("sim-test-images-alone", sim + ["--test-images", "digits:test", "--output",
                                         "{w}/s.parquet"], "--test-output"),
        ("sim-test-output-alone", sim + ["--test-output", "{w}/t.parquet", "--output",
                                         "{w}/s.parquet"], "--test-images"),
        ("sim-same-outputs", sim + ["--test-images", "digits:test", "--test-output",
                                    "{w}/s.parquet", "--output", "{w}/s.parquet"], "same file"),
        ("sim-output-is-folder", sim + ["--output", "{w}/run"], "is a folder"),
        ("sim-output-under-file", sim + ["--output", "{w}/afile/s.parquet"], "afile is a file"),
        ("sim-test-output-under-file", sim + ["--test-images", "digits:test", "--test-output",
                                              "{w}/afile/t.parquet", "--output", "{w}/s.parquet"],
         "afile is a file"),
        # -- report
        ("report-corrupt-meta", ["report", "--annotations", "{w}/corrupt-meta.parquet"],
         "metadata block is not valid JSON"),
        ("report-imagefolder-spec", ["report", "--annotations", "{w}/ann.parquet", "--images",
                                     "torchvision:ImageFolder:{w}/emptydir"],
         "pass the folder itself"),
        ("report-empty-folder", ["report", "--annotations", "{w}/ann.parquet", "--images",
                                 "{w}/emptydir"], "no images found"),
        ("report-limit", ["report", "--annotations", "{w}/ann.parquet", "--images",
                          "digits:train", "--limit", "-5"], "--limit"),
        ("report-missing", ["report", "--annotations", "{w}/nope.parquet"], "not found"),
        # -- train
        ("train-output-is-file", tr + ["--output", "{w}/afile"] + T, "is a file"),
        ("train-output-under-file", tr + ["--output", "{w}/afile/run"] + T, "afile is a file"),
        ("train-output-unwritable", tr + ["--output", "{ro}/run"] + T, "cannot be written"),
        ("train-5-class-test-into-finished-run", tr + ["--test-images", "{w}/five.npz",
                                                       "--output", "{w}/run"] + T, "5 classes"),
        ("train-config-is-folder", tr + ["--config", "{w}/cfgdir", "--output", "{w}/new"],
         "is a folder, not a YAML file"),
        ("train-limit", tr + ["--limit", "-5", "--output", "{w}/new"] + T, "--limit"),
        ("train-lr", tr + ["--output", "{w}/new", "--set", "train.lr=-1"], "train.lr"),
        ("train-resume-other-rows", ["train", "--images", "digits:train", "--limit", "500",
                                     "--annotations", "{w}/ann500.parquet", "--output",
                                     "{w}/run", "--resume", "--no-mlflow"], "other data"),
        ("train-resume-other-size", tr + ["--image-size", "16", "--output", "{w}/run",
                                          "--resume", "--no-mlflow"], "8x8 images, this run 16x16"),
        ("train-resume-other-backbone", tr + ["--output", "{w}/run", "--resume", "--set",
                                              "model.backbone=small_cnn", "--no-mlflow"],
         "model.backbone=mlp"),
        ("train-resume-truncated", tr + ["--output", "{w}/broken", "--resume", "--no-mlflow"],
         "truncated"),
        ("train-missing-annotations", ["train", "--images", "digits:train", "--annotations",
                                       "{w}/nope.parquet", "--output", "{w}/new"] + T, "not found"),
        ("train-no-output-flag", ["train", "--images", "digits:train", "--annotations",
                                  "{w}/ann.parquet"], "--output"),
        ("train-limit-not-a-number", tr + ["--limit", "many", "--output", "{w}/new"],
         "invalid int value"),
        # -- evaluate
        ("evaluate-device-banana", ev + ["--device", "banana"], "--device"),
        ("evaluate-5-class-table", ["evaluate", "--model", "{w}/run/model.pt", "--images",
                                    "{w}/five.npz"], "5 classes"),
        ("evaluate-model-missing-keys", ["evaluate", "--model", "{w}/model-no-nets.pt",
                                         "--images", "digits:test"], "missing nets"),
        ("evaluate-checkpoint-as-model", ["evaluate", "--model", "{w}/run/checkpoint.pt",
                                          "--images", "digits:test"], "not a coreg-ray model"),
        ("evaluate-config-as-model", ["evaluate", "--model", "{w}/run/config.yaml", "--images",
                                      "digits:test"], "not a coreg-ray model"),
        ("evaluate-limit", ev + ["--limit", "-5"], "--limit"),
        # -- annotate
        ("annotate-builtin-unknown", ["annotate", "--images", "digits:nope", "--annotator",
                                      "clip:ViT-S-32-alt/random", "--output", "{w}/a.parquet"],
         "use digits, digits:train or digits:test"),
        ("annotate-output-is-folder", ann + ["--output", "{w}/run"], "is a folder"),
        ("annotate-output-under-file", ann + ["--output", "{w}/afile/a.parquet"],
         "afile is a file"),
        ("annotate-report-under-file", ann + ["--output", "{w}/a.parquet", "--report",
                                              "{w}/afile/rep"], "afile is a file"),
        ("annotate-shard-size", ann + ["--output", "{w}/a.parquet", "--shard-size", "0"],
         "--shard-size"),
        ("annotate-empty-folder", ["annotate", "--images", "{w}/emptydir", "--annotator",
                                   "clip:ViT-S-32-alt/random", "--output", "{w}/a.parquet"],
         "no images found"),
        # -- experiment
        ("experiment-output-is-file", ["experiment", "--config", "{w}/exp-ok.yaml", "--output",
                                       "{w}/afile", "--no-mlflow"], "is a file"),
        ("experiment-5-class-test-existing-output", ["experiment", "--config",
                                                     "{w}/exp-5class.yaml", "--output",
                                                     "{w}/existing-exp", "--no-mlflow",
                                                     "--no-resume"], "5 classes"),
        ("experiment-config-is-folder", ["experiment", "--config", "{w}/cfgdir", "--output",
                                         "{w}/exp-new"], "is a folder"),
        ("experiment-parallel", ["experiment", "--config", "{w}/exp-ok.yaml", "--output",
                                 "{w}/exp-new", "--parallel", "0"], "--parallel"),
        # -- quickstart
        ("quickstart-output-is-file", ["quickstart", "--output", "{w}/afile", "--no-mlflow"],
         "is a file"),
        ("quickstart-output-under-file", ["quickstart", "--output", "{w}/afile/q", "--no-mlflow"],
         "afile is a file"),
        ("quickstart-epochs", ["quickstart", "--output", "{w}/q", "--epochs", "0"], "--epochs"),
        # -- tune
        ("tune-config-is-folder", ["tune", "--config", "{w}/cfgdir"], "is a folder"),
    ]


def _argv(argv, world):
    return [a.replace("{w}", str(world["root"])).replace("{ro}", str(world["unwritable"]))
            for a in argv]


def snapshot(root: Path) -> dict:
    """Every file (and link) under `root` with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
        for d in dirnames:  # empty folders count too (a created, then abandoned, output)
            out.setdefault(str((Path(dirpath) / d).relative_to(root)) + "/", "dir")
    return out


def _check(rc, text, expect):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert rc == 2, text
    assert "Traceback" not in text, text
    assert 1 <= len(lines) <= 3, text
    assert any(ln.startswith("coreg-ray: error:") for ln in lines), text
    assert expect in text, text


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_is_one_line_and_touches_nothing(world, case, capsys, monkeypatch):
    _, argv, expect = case
    monkeypatch.chdir(world["root"])  # relative defaults (mlruns.db, runs/) would land here
    before = snapshot(world["root"])
    rc = main(_argv(argv, world))
    cap = capsys.readouterr()
    _check(rc, cap.out + cap.err, expect)
    assert snapshot(world["root"]) == before


SUBPROCESS_CASES = ["synth-output-is-folder", "sim-per-class-0", "evaluate-device-banana",
                    "train-5-class-test-into-finished-run", "report-corrupt-meta"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_subprocess_has_no_traceback(world, name):
    _, argv, expect = next(c for c in _cases() if c[0] == name)
    before = snapshot(world["root"])
    res = subprocess.run([sys.executable, "-m", "coreg_ray.cli", *_argv(argv, world)],
                         capture_output=True, text=True, cwd=world["root"], timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    _check(res.returncode, res.stdout + res.stderr, expect)
    assert snapshot(world["root"]) == before


def test_the_finished_run_still_resumes(world, tmp_path, capsys):
    """After every rejected case above, the finished run's files are intact: --resume with a
    longer schedule continues it (the run's own config, no --config)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["root"] / "run", run)
    assert main(["train", "--images", "digits:train", "--annotations",
                 str(world["root"] / "ann.parquet"), "--output", str(run), "--resume",
                 "--set", "train.epochs=3", "--no-mlflow"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2]
    assert m["warmup_epochs"] == 1  # the run's, not the default 50
