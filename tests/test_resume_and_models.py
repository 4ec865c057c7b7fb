"""Issue 12, category 4: resume and models know what they were made for.

`train --resume` continues with the run's own config (`--set` on top, `--config` optional) and
refuses, in one line, a checkpoint made on other data or with another model, or a truncated one.
A model applied to a table of other classes is one line; to images of another size, a note."""
import json

import numpy as np
import pytest
import torch

from coreg_ray.cli import main
from coreg_ray.coreg.trainer import (CHECKPOINT, Classifier, CoReg, check_checkpoint,
                                     data_fingerprint, read_checkpoint)
from coreg_ray.data import synthetic_annotations, table_from_arrays
from coreg_ray.errors import CoregError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A finished 2-epoch run on the first 300 training digits: (folder, table, annotations)."""
    train = digits[0].subset(np.arange(300))
    ann = synthetic_annotations(train.ids, train.labels, 10, 0.2, 0.0, 0)
    out = tmp_path_factory.mktemp("run")
    trainer = CoReg(tiny_config(**{"train.epochs": 2, "train.warmup_epochs": 1}), progress=False)
    trainer.fit(train, ann, output_dir=out)
    trainer.save_model(out / "model.pt")
    return out, train, ann


def _resume(out, train, ann, **over):
    cfg = tiny_config(**{"train.epochs": 3, "train.warmup_epochs": 1, **over})
    return CoReg(cfg, progress=False).fit(train, ann, output_dir=out, resume=True)


# ------------------------------------------------------------------ what a checkpoint was made on
def test_checkpoint_records_its_data(run):
    out, train, ann = run
    state = read_checkpoint(out / CHECKPOINT)
    assert state["data"] == data_fingerprint(train, ann.candidates, 8)
    assert state["data"]["rows"] == 300 and state["data"]["classes"] == [str(i) for i in range(10)]


@pytest.mark.parametrize("change, message", [
    (lambda t, a: (t.subset(np.arange(200)), a.subset(np.arange(200))),
     "was made on other data (300 rows, this run 200)"),
    (lambda t, a: (table_from_arrays(t.images.permute(0, 2, 3, 1).numpy(), t.labels,
                                     t.classes, t.ids, 16, "x16"), a),
     "8x8 images, this run 16x16"),
    (lambda t, a: (table_from_arrays(255 - t.images.permute(0, 2, 3, 1).numpy(), t.labels,
                                     t.classes, t.ids, None, "inverted"), a),
     "(other images)"),
    (lambda t, a: (table_from_arrays(t.images.permute(0, 2, 3, 1).numpy(), t.labels,
                                     t.classes, t.ids + 10_000, None, "ids"),
                   synthetic_annotations(t.ids + 10_000, t.labels, 10, 0.2, 0.0, 0)),
     "(other image ids)"),
    (lambda t, a: (t, synthetic_annotations(t.ids, t.labels, 10, 0.5, 0.0, 1)),
     "(other candidate sets)"),
    (lambda t, a: (table_from_arrays(t.images.permute(0, 2, 3, 1).numpy(), t.labels,
                                     list("abcdefghij"), t.ids, None, "named"), a),
     "10 classes: 0, 1, 2, 3, ..., this run 10 classes: a, b, c, d"),
])
def test_resume_refuses_a_checkpoint_made_on_other_data(run, tmp_path, change, message):
    import shutil

    out, train, ann = run
    shutil.copytree(out, tmp_path / "r")
    before = (tmp_path / "r" / CHECKPOINT).read_bytes()
    t2, a2 = change(train, ann)
    with pytest.raises(CoregError) as e:
        _resume(tmp_path / "r", t2, a2)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == before


def test_resume_refuses_another_model_and_a_truncated_or_incomplete_checkpoint(run, tmp_path):
    out, train, ann = run
    with pytest.raises(CoregError, match=r"made with model.backbone=mlp \(this run: small_cnn\)"):
        _resume(out, train, ann, **{"model.backbone": "small_cnn"})
    (tmp_path / CHECKPOINT).write_bytes((out / CHECKPOINT).read_bytes()[:4000])
    with pytest.raises(CoregError, match="not a readable coreg-ray checkpoint: truncated"):
        _resume(tmp_path, train, ann)
    state = read_checkpoint(out / CHECKPOINT)
    del state["opts"]
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(CoregError, match=r"not a complete coreg-ray checkpoint \(missing opts\)"):
        _resume(tmp_path, train, ann)
    state = read_checkpoint(out / CHECKPOINT)
    state["nets"] = [{}, {}]  # complete in outline, contents that do not fit
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(CoregError, match="its contents do not fit this run"):
        _resume(tmp_path, train, ann)
    with pytest.raises(CoregError, match="not a coreg-ray checkpoint"):
        check_checkpoint([1, 2], "x.pt")


def test_cli_resume_uses_the_runs_config(tmp_path, capsys, monkeypatch):
    """`--resume --set train.epochs=N` without --config: the run's backbone and warm-up (it used
    to rebuild the default backbone and crash, or report the default warm-up of 50)."""
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--images", "digits:train", "--limit", "300", "--q", "0.1", "--eta",
                 "0", "--output", "ann.parquet"]) == 0
    common = ["train", "--images", "digits:train", "--limit", "300", "--annotations",
              "ann.parquet", "--output", "run", "--no-mlflow"]
    assert main(common + ["--set", "model.backbone=mlp", "--set", "train.epochs=2",
                          "--set", "train.warmup_epochs=1", "--set", "data.hflip=false",
                          "--set", "coreg.queue_size=256", "--set", "train.batch_size=64"]) == 0
    assert main(common + ["--resume", "--set", "train.epochs=4"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["backbone"], m["epochs"], m["warmup_epochs"]) == ("mlp", 4, 1)
    assert [h["epoch"] for h in m["history"]] == [0, 1, 2, 3]
    assert "epochs: 4" in (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    # resumed on another table: one line, and the run's files are left as they were
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    assert main(["train", "--images", "digits:train", "--limit", "300", "--image-size", "12",
                 "--annotations", "ann.parquet", "--output", "run", "--resume",
                 "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"coreg-ray: error: run/{CHECKPOINT} was made on other data (8x8 images, this "
                   "run 12x12): resume with the inputs it was made on, or train into a new --output")
    assert files == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}


# ------------------------------------------------------------------ models
def test_model_on_a_table_of_other_classes_is_one_line(run, digits, tmp_path, capsys):
    out, train, _ = run
    clf = Classifier.load(out / "model.pt", "cpu")
    test = digits[1]
    five = test.subset(np.flatnonzero(test.labels < 5))
    five = table_from_arrays(five.images.permute(0, 2, 3, 1).numpy(), five.labels,
                             [str(i) for i in range(5)], five.ids, None, "five")
    with pytest.raises(CoregError, match=r"five: 5 classes: 0, 1, 2, 3, \.\.\., but .*model.pt "
                                         r"was trained for 10 classes"):
        clf.evaluate(five)
    named = table_from_arrays(test.images.permute(0, 2, 3, 1).numpy(), test.labels,
                              list("abcdefghij"), test.ids, None, "named")
    # names are always compared (issue 23): the digits' '0'..'9' are names too, so a digits
    # model is not scored on a table of ten other classes, nor a model of named classes
    with pytest.raises(CoregError, match="named: 10 classes: a, b, c, d, ..., but"):
        clf.evaluate(named)
    clf.classes = [f"c{i}" for i in range(10)]
    with pytest.raises(CoregError, match="named: 10 classes: a, b, c, d, ..., but"):
        clf.evaluate(named)
    clf.classes = [str(i) for i in range(10)]
    capsys.readouterr()
    big = table_from_arrays(test.images.permute(0, 2, 3, 1).numpy(), test.labels, None,
                            test.ids, 16, "big")
    assert clf.evaluate(big)["images"] == len(test)
    assert capsys.readouterr().err.strip() == (f"note: big: images are 16x16, {out / 'model.pt'} "
                                                "was trained on 8x8: resized")


def test_incomplete_or_mismatched_model_file_is_one_line(run, tmp_path):
    out, _, _ = run
    state = torch.load(out / "model.pt", weights_only=True)
    for key, message in (("nets", "incomplete coreg-ray model (missing nets)"),
                         ("classes", "incomplete coreg-ray model (missing classes)")):
        bad = dict(state)
        del bad[key]
        torch.save(bad, tmp_path / "m.pt")
        with pytest.raises(CoregError) as e:
            Classifier.load(tmp_path / "m.pt", "cpu")
        assert str(e.value) == f"{tmp_path / 'm.pt'}: {message}"
    bad = dict(state, num_classes=7)
    torch.save(bad, tmp_path / "m.pt")
    with pytest.raises(CoregError, match=r"malformed coreg-ray model \(num_classes 7 but 10"):
        Classifier.load(tmp_path / "m.pt", "cpu")
    bad = dict(state, nets=[{k: v[:1] if v.ndim else v for k, v in state["nets"][0].items()}])
    torch.save(bad, tmp_path / "m.pt")
    with pytest.raises(CoregError, match="its weights do not fit its mlp model"):
        Classifier.load(tmp_path / "m.pt", "cpu")
    with pytest.raises(CoregError, match=r"device 'banana': not a device \(valid: auto, cpu"):
        Classifier.load(out / "model.pt", "banana")


def test_unreadable_model_message_is_not_doubled(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CoregError) as e:
        Classifier.load(tmp_path / "m.pt", "cpu")
    msg = str(e.value)
    assert msg.count(str(tmp_path / "m.pt")) == 1 and "not a readable model file" not in msg
    assert msg.startswith(f"{tmp_path / 'm.pt'}: not a readable coreg-ray model: truncated")
