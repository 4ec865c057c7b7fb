"""Issue 12, category 3: outputs are touched only after inputs are validated.

The output checks (`coreg_ray.outputs`) create nothing; the atomic writer leaves no temp file
whatever fails; a rejected run leaves an existing run's files as they were."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from coreg_ray.cli import main
from coreg_ray.errors import CoregError
from coreg_ray.outputs import (atomic_path, check_output_dir, check_output_file, to_json,
                               write_json_atomic, write_text_atomic)

TRAIN = ["--set", "model.backbone=mlp", "--set", "data.hflip=false", "--set", "train.epochs=2",
         "--set", "train.warmup_epochs=1", "--set", "train.batch_size=128",
         "--set", "coreg.queue_size=256", "--no-mlflow"]


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _unwritable(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    return ro if not os.access(ro, os.W_OK) else Path("/proc/self")


# ------------------------------------------------------------------ the checks
def test_check_output_dir_and_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert not (tmp_path / "a").exists()  # nothing created
    with pytest.raises(CoregError, match=r"output folder .*/f: is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(CoregError, match=r"/f is a file, not a folder, so nothing can be written"):
        check_output_dir(tmp_path / "f" / "run")
    with pytest.raises(CoregError, match=r"cannot be written \(no write permission in"):
        check_output_dir(_unwritable(tmp_path) / "run")
    assert check_output_file(tmp_path / "f") == tmp_path / "f"  # an existing file: overwritten
    assert check_output_file(tmp_path / "new" / "x.parquet")
    with pytest.raises(CoregError, match="is a folder, not a file; hint"):
        check_output_file(tmp_path, "--output", "; hint")
    with pytest.raises(CoregError, match="/f is a file"):
        check_output_file(tmp_path / "f" / "x.parquet")
    (tmp_path / "new2").mkdir()
    with pytest.raises(CoregError, match="cannot be written"):
        check_output_file(_unwritable(tmp_path / "new2") / "x.parquet")
    with pytest.raises(CoregError, match="empty path"):
        check_output_dir("")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_writer_keeps_the_old_file_and_leaves_no_tmp(tmp_path, exc):
    target = tmp_path / "sub" / "metrics.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise exc
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_atomic_writer_os_error_is_one_line(tmp_path):
    (tmp_path / "d.json").mkdir()  # os.replace of a file over a folder fails
    with pytest.raises(CoregError, match=r"d.json: cannot be written"):
        write_text_atomic(tmp_path / "d.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_json_is_strict():
    assert to_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32(2)}) == \
        '{"a": null, "b": [null, 1.5], "c": 2.0}'


# ------------------------------------------------------------------ commands
def test_a_rejected_run_leaves_the_finished_run_as_it_was(tmp_path, capsys, monkeypatch):
    """The issue's case: a 5-class test table for a 10-class run used to overwrite the finished
    run's config.yaml first, after which --resume crashed."""
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0",
                 "--output", "ann.parquet"]) == 0
    assert main(["train", "--images", "digits:train", "--annotations", "ann.parquet",
                 "--output", "run"] + TRAIN) == 0
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez("five.npz", images=(d.images[d.target < 5][:100] / 16 * 255).astype(np.uint8),
             labels=d.target[d.target < 5][:100])
    before = _files(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--images", "digits:train", "--annotations", "ann.parquet",
                 "--test-images", "five.npz", "--output", "run"] + TRAIN) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("coreg-ray: error: test table five.npz has 5 classes, the training table 10: "
                   "test on a table of the same classes")
    assert _files(tmp_path / "run") == before
    assert main(["train", "--images", "digits:train", "--annotations", "ann.parquet",
                 "--output", "run", "--resume"] + TRAIN + ["--set", "train.epochs=3"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("cmd", [
    ["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0", "--output", "OUT"],
    ["simulate-annotator", "--images", "digits:train", "--templates", "2", "--per-class", "1",
     "--output", "OUT"],
])
def test_a_failed_write_leaves_no_tmp(tmp_path, capsys, monkeypatch, cmd):
    """The disk fills up while the table is written: one line, no *.tmp, no table."""
    import errno

    import pyarrow.parquet as pq

    def full(table, where, *a, **k):
        Path(where).write_bytes(b"PAR1 half a table")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    out = tmp_path / "ann.parquet"
    assert main([str(out) if a == "OUT" else a for a in cmd]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"coreg-ray: error: {out}: cannot be written (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_annotate_checks_its_output_before_annotating(tmp_path, capsys, monkeypatch):
    """`annotate --output <dir>` used to annotate everything, then crash: now nothing is read
    or computed (the annotator would fail the test if it ran)."""
    import coreg_ray.annotate.pipeline as pipeline
    from coreg_ray.data import load_image_table, write_image_table

    write_image_table(load_image_table("digits:test", limit=8), tmp_path / "imgs" / "train.parquet")

    def never(*a, **k):
        raise AssertionError("annotated before the output was checked")

    monkeypatch.setattr(pipeline, "_local_batches", never)
    monkeypatch.setattr(pipeline, "open_input", never)
    (tmp_path / "outdir").mkdir()
    before = _files(tmp_path)
    assert main(["annotate", "--images", str(tmp_path / "imgs"), "--annotator",
                 "clip:ViT-S-32-alt/random", "--engine", "local", "--output",
                 str(tmp_path / "outdir")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder, not a file (give the annotation table's file name" in err
    assert _files(tmp_path) == before and not (tmp_path / "outdir.parts").exists()


@pytest.mark.parametrize("where", ["file", "under-file", "unwritable"])
@pytest.mark.parametrize("cmd", ["train", "synth", "simulate-annotator", "experiment",
                                 "quickstart", "annotate"])
def test_every_writing_command_checks_its_output_location(tmp_path, capsys, monkeypatch, cmd,
                                                          where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    base = {"file": tmp_path / "afile", "under-file": tmp_path / "afile" / "o",
            "unwritable": _unwritable(tmp_path) / "o"}[where]
    out = str(base if cmd in ("train", "experiment", "quickstart") or where != "file"
              else tmp_path / "afile")
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: t\ndata: {images: 'digits:train', test_images: 'digits:test'}\n"
                   "settings: [{name: s, synthetic: {q: 0.1, eta: 0.0}}]\nmethods: [coreg]\n")
    argv = {
        "train": ["train", "--images", "digits:train", "--annotations", "a.parquet", "--output",
                  out, "--no-mlflow"],
        "synth": ["synth", "--images", "digits:train", "--q", "0.1", "--eta", "0", "--output",
                  out if where != "file" else str(tmp_path)],
        "simulate-annotator": ["simulate-annotator", "--images", "digits:train", "--output",
                               out if where != "file" else str(tmp_path)],
        "experiment": ["experiment", "--config", str(exp), "--output", out, "--no-mlflow"],
        "quickstart": ["quickstart", "--output", out, "--no-mlflow"],
        "annotate": ["annotate", "--images", "x.parquet", "--annotator", "clip:RN50/random",
                     "--output", out if where != "file" else str(tmp_path)],
    }[cmd]
    before = _files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("coreg-ray: error:")
    assert {"file": "is a f", "under-file": "afile is a file",
            "unwritable": "cannot be written"}[where] in err, err
    assert _files(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_checkpoint_and_model_writes_leave_no_temp_file_on_failure(digits, tmp_path, monkeypatch):
    """torch.save dying half-way (Ctrl-C, disk full) leaves the previous file and no *.tmp."""
    import numpy as np
    import pytest
    import torch

    from coreg_ray.coreg import trainer as trainer_mod
    from coreg_ray.data import synthetic_annotations
    from tests.conftest import tiny_config

    train, _ = digits
    train = train.subset(np.arange(200))
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.2, eta=0.1, seed=0)
    t = trainer_mod.CoReg(tiny_config(**{"train.epochs": 1, "train.warmup_epochs": 1}), progress=False)
    t.fit(train, ann, output_dir=tmp_path)
    ckpt, model = tmp_path / "checkpoint.pt", tmp_path / "model.pt"
    t.save_model(model)
    before = {p: p.read_bytes() for p in (ckpt, model)}
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save({"partial": True}, f)  # something is on disk already
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(ckpt, 0)
    with pytest.raises(KeyboardInterrupt):
        t.save_model(model)
    assert {p: p.read_bytes() for p in (ckpt, model)} == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv", [
    ["annotate", "--images", "s3://bucket/train.parquet", "--annotator", "clip:RN50/random",
     "--output", "OUT/ann.parquet"],
    ["annotate", "--images", "IMAGES", "--annotator", "clip:RN50/random",
     "--output", "s3://bucket/ann.parquet"],
    ["predict", "--model", "s3://bucket/model.pt", "--images", "IMAGES",
     "--output", "OUT/p.parquet"],
    ["predict", "--model", "MODEL", "--images", "gs://bucket/pool/", "--output", "OUT/p.parquet"],
    ["train", "--images", "s3://bucket/train.parquet", "--annotations", "ANN",
     "--output", "OUT/run", "--no-mlflow"],
    ["train", "--images", "digits:train", "--annotations", "s3://bucket/ann.parquet",
     "--output", "OUT/run", "--no-mlflow"],
    ["evaluate", "--model", "MODEL", "--images", "s3://bucket/test.parquet"],
])
def test_remote_uris_are_one_line_naming_the_uri(tmp_path, capsys, monkeypatch, argv, digits,
                                                 tiny_student):
    """Tables and annotate/predict outputs may be s3:// / gs:// URIs (issue 21): without
    credentials that is one line naming the URI, within seconds; models and run folders stay
    local (one line saying so, not "not found: s3:/bucket/..."). Nothing is written."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from coreg_ray.data import synthetic_annotations, write_annotations, write_image_table

    monkeypatch.chdir(tmp_path)
    train, _ = digits
    write_image_table(train.subset(np.arange(64)), tmp_path / "images.parquet")
    ann = synthetic_annotations(train.ids, train.labels, train.num_classes, q=0.1, eta=0.0,
                                seed=0)
    write_annotations(ann, tmp_path / "ann.parquet")
    sub = {"IMAGES": str(tmp_path / "images.parquet"), "ANN": str(tmp_path / "ann.parquet"),
           "MODEL": str(tmp_path / "model.pt"), "OUT": str(tmp_path / "out")}
    (tmp_path / "model.pt").write_bytes(tiny_student.read_bytes())
    argv = [next((a.replace(k, v) for k, v in sub.items() if a.startswith(k)), a) for a in argv]
    uri = next(a for a in argv if "://" in a)
    before = _files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("coreg-ray: error:"), err
    if "model" in uri:
        assert uri in err and "remote URIs" in err and "every node mounts" in err, err
    else:
        assert uri.rstrip("/") in err and "no credentials" in err, err
    assert _files(tmp_path) == before
