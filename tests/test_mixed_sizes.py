"""Issue 12, category 5: images of mixed sizes.

The working size is chosen deliberately: the size asked for (`data.image_size` /
`--image-size`), else the most common size in the table; the odd images are letterboxed to it
and one note on stderr says how many. One 1024x768 image among 32x32 ones must not make the
table 1024x1024."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coreg_ray.data import load_image_table
from coreg_ray.data.tables import working_size


def _png(h, w, value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, shapes):
    blobs = [_png(h, w) for h, w in shapes]
    pq.write_table(pa.table({"id": pa.array(range(len(blobs)), pa.int64()),
                             "image": pa.array(blobs, pa.binary()),
                             "label": pa.array([i % 2 for i in range(len(blobs))], pa.int16())}),
                   path)
    return path


def test_one_large_image_does_not_set_the_size(tmp_path, capsys):
    path = _parquet(tmp_path / "t.parquet", [(32, 32)] * 20 + [(768, 1024)])
    t = load_image_table(path)
    assert t.images.shape == (21, 3, 32, 32) and t.meta["resized"] == 1
    assert capsys.readouterr().err.strip() == (
        f"note: {path}: images of 2 sizes; 1 of 21 resized to 32x32 (the most common size; set "
        "data.image_size or --image-size to choose)")
    # the odd image was letterboxed: 1024x768 -> 32x24 content, 4 black rows above and below
    odd = t.images[20]
    assert (odd[:, :4] == 0).all() and (odd[:, 28:] == 0).all() and (odd[:, 5:27] > 100).all()


def test_one_odd_image_does_not_make_a_larger_model(tmp_path, capsys):
    t = load_image_table(_parquet(tmp_path / "t.parquet", [(32, 32)] * 9 + [(40, 48)]))
    assert t.image_size == 32 and t.meta["resized"] == 1
    assert "1 of 10 resized to 32x32" in capsys.readouterr().err


def test_the_size_asked_for_wins_and_the_note_counts_every_resized_image(tmp_path, capsys):
    path = _parquet(tmp_path / "t.parquet", [(32, 32)] * 4 + [(768, 1024), (16, 16)])
    t = load_image_table(path, image_size=16)
    assert t.image_size == 16 and t.meta["resized"] == 5
    assert "images of 3 sizes; 5 of 6 resized to 16x16 (the size asked for)" in \
        capsys.readouterr().err


def test_uniform_tables_say_nothing(tmp_path, capsys):
    t = load_image_table(_parquet(tmp_path / "t.parquet", [(32, 32)] * 5))
    assert t.image_size == 32 and t.meta["resized"] == 0
    t = load_image_table(tmp_path / "t.parquet", image_size=8)  # all resized, as asked: no note
    assert t.image_size == 8
    load_image_table("digits:train")
    assert capsys.readouterr().err == ""


def test_non_square_tables_are_letterboxed_to_their_longer_side(tmp_path, capsys):
    t = load_image_table(_parquet(tmp_path / "t.parquet", [(40, 48)] * 3))
    assert t.image_size == 48
    assert "all 3 images are 48x40 (not square): letterboxed to 48x48" in capsys.readouterr().err


def test_image_folder_with_mixed_sizes(tmp_path, capsys):
    for i, (h, w) in enumerate([(24, 24)] * 3 + [(600, 800)]):
        d = tmp_path / "imgs" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(d / f"{i}.png")
    t = load_image_table(tmp_path / "imgs")
    assert t.images.shape == (4, 3, 24, 24) and t.meta["resized"] == 1
    assert "1 of 4 resized to 24x24" in capsys.readouterr().err


def test_working_size_rule():
    assert working_size([(32, 32)] * 3 + [(1024, 1024)] * 2) == 32
    assert working_size([(32, 32), (64, 64)]) == 32  # a tie: the smaller (memory)
    assert working_size([(40, 48), (40, 48), (32, 32)]) == 48


def test_train_uses_the_configured_size(tmp_path, capsys, monkeypatch):
    """A run on a mixed table: data.image_size sets the size, the note says how many images
    were resized, and the model is made for that size."""
    from coreg_ray.cli import main

    monkeypatch.chdir(tmp_path)
    shapes = [(32, 32)] * 40 + [(768, 1024)]
    blobs = [_png(h, w, value=20 * (i % 10)) for i, (h, w) in enumerate(shapes)]
    pq.write_table(pa.table({"id": pa.array(range(41), pa.int64()),
                             "image": pa.array(blobs, pa.binary()),
                             "label": pa.array([i % 2 for i in range(41)], pa.int16())}),
                   tmp_path / "t.parquet")
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    assert main(["synth", "--images", "t.parquet", "--q", "0.2", "--eta", "0",
                 "--output", "ann.parquet"]) == 0
    capsys.readouterr()
    assert main(["train", "--images", "t.parquet", "--annotations", "ann.parquet", "--output",
                 "run", "--no-mlflow", "--set", "model.backbone=mlp", "--set", "train.epochs=1",
                 "--set", "train.warmup_epochs=1", "--set", "data.image_size=16",
                 "--set", "coreg.queue_size=64", "--set", "train.batch_size=16"]) == 0
    assert "2 sizes; 41 of 41 resized to 16x16 (the size asked for)" in capsys.readouterr().err
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["image_size"] == 16
