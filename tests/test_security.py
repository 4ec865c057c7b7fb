"""Issue 12, category 1: no code runs from a model, checkpoint or saved state a user was handed.

Each planted file carries a real pickle payload (`open(marker, "w")` when unpickled, shown to
fire under `weights_only=False`); every load path must refuse it in one line (exit code 2 on
the command line) and the marker must never appear. Genuine files from a tiny run still load.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from coreg_ray.cli import main
from coreg_ray.errors import CoregError

TRAIN_SETS = ["--set", "model.backbone=mlp", "--set", "data.hflip=false",
              "--set", "train.warmup_epochs=1", "--set", "train.batch_size=64",
              "--set", "coreg.queue_size=256", "--set", "coreg.feature_delay=0"]


class OpenPayload:
    """Unpickling this calls open(marker, "w"): the marker file exists iff the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ExecPayload(OpenPayload):
    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant(path, payload, legacy=False, **looks_like):
    """A file that looks like ours (`looks_like` keys) with the payload inside."""
    torch.save({**looks_like, "nets": [payload]}, path, _use_new_zipfile_serialization=not legacy)
    return path


def cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "coreg_ray.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_refused(res, name):
    err = res.stderr.strip()
    assert res.returncode == 2, err[-2000:]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("coreg-ray: error:") and name in err and "refused" in err, err


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A finished 2-epoch digits run (mlp): OUT/model.pt, OUT/checkpoint.pt, OUT/config.yaml."""
    d = tmp_path_factory.mktemp("genuine")
    assert main(["synth", "--images", "digits:train", "--limit", "300", "--q", "0.1",
                 "--eta", "0", "--output", str(d / "ann.parquet")]) == 0
    assert main(["train", "--images", "digits:train", "--limit", "300", "--annotations",
                 str(d / "ann.parquet"), "--output", str(d / "run"), "--no-mlflow",
                 "--set", "train.epochs=2", *TRAIN_SETS]) == 0
    return d


@pytest.mark.parametrize("payload", [OpenPayload, ExecPayload])
def test_the_payload_is_real(tmp_path, payload):
    """The planted files are hostile: the unsafe load these paths used to do runs them."""
    marker = tmp_path / "ran"
    f = plant(tmp_path / "evil.pt", payload(marker), format="coreg-ray/1")
    out = torch.load(f, weights_only=False)
    for obj in out["nets"]:
        getattr(obj, "close", lambda: None)()
    assert marker.exists()


@pytest.mark.parametrize("payload, legacy", [(OpenPayload, False), (ExecPayload, False),
                                             (OpenPayload, True)])
def test_evaluate_refuses_a_planted_model(tmp_path, payload, legacy):
    marker = tmp_path / "ran"
    plant(tmp_path / "model.pt", payload(marker), legacy, format="coreg-ray/1",
          backbone="mlp", num_classes=10, classes=[str(i) for i in range(10)], image_size=8)
    res = cli("evaluate", "--model", "model.pt", "--images", "digits:test", cwd=tmp_path)
    assert_refused(res, "model.pt")
    assert not marker.exists()


def test_resume_refuses_a_planted_checkpoint(tmp_path, genuine):
    """`train --resume` on a run whose checkpoint.pt was swapped: one line, exit 2, nothing ran,
    the run's files untouched."""
    run = tmp_path / "run"
    shutil.copytree(genuine / "run", run)
    marker = tmp_path / "ran"
    plant(run / "checkpoint.pt", OpenPayload(marker), epoch=0, config={})
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    res = cli("train", "--images", "digits:train", "--limit", "300", "--annotations",
              str(genuine / "ann.parquet"), "--output", "run", "--no-mlflow", "--resume",
              "--set", "train.epochs=3", *TRAIN_SETS, cwd=tmp_path)
    assert_refused(res, "checkpoint.pt")
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_load_checkpoint_and_load_state_refuse_in_process(tmp_path, genuine):
    """CoReg.load_checkpoint (through fit --resume) and the helper used by distributed
    training's restore both refuse, and never run the payload."""
    from coreg_ray.config import Config
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data import load_image_table, read_annotations
    from coreg_ray.safeload import load_state

    marker = tmp_path / "ran"
    out = tmp_path / "out"
    out.mkdir()
    plant(out / "checkpoint.pt", OpenPayload(marker), epoch=0)
    cfg = Config.load(genuine / "run" / "config.yaml")
    train = load_image_table("digits:train", None, 300)
    ann = read_annotations(genuine / "ann.parquet", 10)
    with pytest.raises(CoregError, match="checkpoint.pt: not a coreg-ray checkpoint, or it "
                                         "contains code: refused"):
        CoReg(cfg, progress=False).fit(train, ann, None, out, resume=True)
    with pytest.raises(CoregError, match="refused"):
        load_state(out / "checkpoint.pt", "cpu", "checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable coreg-ray model"),
    (b"PK\x03\x04 truncated", "not a readable coreg-ray model"),
    (b"PAR1 not a torch file", "not a coreg-ray model"),
])
def test_unreadable_model_is_one_line(tmp_path, content, message):
    (tmp_path / "m.pt").write_bytes(content)
    with pytest.raises(CoregError, match=message) as exc:
        from coreg_ray.coreg.trainer import Classifier

        Classifier.load(tmp_path / "m.pt", "cpu")
    assert "\n" not in str(exc.value)


def test_genuine_model_and_checkpoint_still_load(tmp_path, genuine, capsys):
    """A real model.pt evaluates; a real checkpoint.pt resumes (weights-only needs no
    allow-listed types for either)."""
    from coreg_ray.safeload import load_state

    assert torch.serialization.get_unsafe_globals_in_checkpoint(genuine / "run" / "checkpoint.pt") == []
    assert torch.serialization.get_unsafe_globals_in_checkpoint(genuine / "run" / "model.pt") == []
    state = load_state(genuine / "run" / "checkpoint.pt", "cpu", "checkpoint")
    assert state["epoch"] == 1 and isinstance(state["torch_rng"], torch.Tensor)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(genuine / "run" / "model.pt"),
                 "--images", "digits:test", "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    run = tmp_path / "run"
    shutil.copytree(genuine / "run", run)
    assert main(["train", "--images", "digits:train", "--limit", "300", "--annotations",
                 str(genuine / "ann.parquet"), "--output", str(run), "--no-mlflow", "--resume",
                 "--set", "train.epochs=3", *TRAIN_SETS]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2]  # epochs 0-1 restored, 2 trained
