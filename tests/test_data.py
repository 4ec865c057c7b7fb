"""Tests for coreg_ray/data: candidate generators with known ground truth, annotation tables
and image tables (paper-method.md, "Synthetic noisy partial labels" and "Annotation")."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coreg_ray.data import (AnnotationTable, annotation_stats, apply_few_shot, few_shot_indices,
                            load_image_table, merge_annotations, read_annotations,
                            simulate_vlm_annotator, synthetic_candidates, table_from_arrays,
                            write_annotations, write_image_table)
from coreg_ray.errors import CoregError


# ----------------------------------------------------------------------------- synthetic sets
def test_synthetic_candidates_q0_eta0_is_one_hot_truth():
    labels = np.array([0, 3, 2, 2, 1, 4])
    cand = synthetic_candidates(labels, 5, q=0.0, eta=0.0, seed=1)
    assert cand.dtype == bool and cand.shape == (6, 5)
    assert np.array_equal(cand, np.eye(5, dtype=bool)[labels])


def test_synthetic_candidates_rates_match_protocol():
    n, c, q, eta = 20000, 10, 0.3, 0.2
    labels = np.random.default_rng(5).integers(0, c, n)
    rows = np.arange(n)
    # eta = 0: the truth is always in, each wrong class joins with probability q
    cand0 = synthetic_candidates(labels, c, q, 0.0, seed=7)
    assert cand0[rows, labels].all()
    wrong0 = cand0.sum(1) - 1
    assert abs(wrong0.mean() - q * (c - 1)) < 0.05
    # with eta: the truth is missing at rate ~eta (q^(C-1) ~ 2e-5 of the rows are full)
    cand = synthetic_candidates(labels, c, q, eta, seed=7)
    missing = ~cand[rows, labels]
    assert abs(missing.mean() - eta) < 0.015
    # a swap keeps the set size and moves the truth to one former non-candidate
    assert np.array_equal(cand.sum(1), cand0.sum(1))
    assert np.array_equal(cand[~missing], cand0[~missing])
    kept = cand0[missing].copy()
    kept[np.arange(missing.sum()), labels[missing]] = False
    assert (cand[missing] & kept).sum() == kept.sum()  # the wrong candidates stay
    added = cand[missing] & ~cand0[missing]
    assert (added.sum(1) == 1).all()
    # so wrong candidates average q*(C-1) + eta
    wrong = cand.sum(1) - cand[rows, labels]
    assert abs(wrong.mean() - (q * (c - 1) + eta)) < 0.06


def test_synthetic_candidates_full_set_is_left_unchanged():
    labels = np.array([0, 1, 2])
    cand = synthetic_candidates(labels, 3, q=1.0, eta=1.0, seed=0)
    assert cand.all()


def test_synthetic_candidates_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    a = synthetic_candidates(labels, 10, 0.3, 0.3, seed=3)
    b = synthetic_candidates(labels, 10, 0.3, 0.3, seed=3)
    c = synthetic_candidates(labels, 10, 0.3, 0.3, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("q,eta", [(-0.1, 0.1), (0.1, 1.5)])
def test_synthetic_candidates_rejects_bad_rates(q, eta):
    with pytest.raises(CoregError, match="q and eta"):
        synthetic_candidates(np.array([0]), 3, q, eta)


# ----------------------------------------------------------------------------- simulated VLM
def test_simulate_vlm_annotator_on_digits(digits):
    t = digits[0]
    assert t.images.shape == (1438, 3, 8, 8) and t.images.dtype == torch.uint8
    ann = simulate_vlm_annotator(t.images, t.labels, t.num_classes, ids=t.ids, n_templates=6,
                                 per_class=8, seed=0)
    n = len(t)
    assert ann.candidates.shape == (n, 10) and ann.candidates.dtype == bool
    assert ann.votes.shape == (n, 6)
    assert ann.votes.min() >= 0 and ann.votes.max() < 10
    assert ann.probs.shape == (n, 10)
    assert np.allclose(ann.probs.sum(1), 1.0, atol=1e-4)
    assert np.array_equal(ann.ids, t.ids)
    union = np.zeros((n, 10), bool)
    for k in range(6):
        union[np.arange(n), ann.votes[:, k]] = True
    assert np.array_equal(ann.candidates, union)
    stats = annotation_stats(ann, t.labels)
    assert stats["partial_accuracy"] > stats["ensemble_accuracy"]
    assert 1.0 < stats["avg_candidates"] < 10.0
    # instance-dependent noise, but a useful annotator
    assert stats["ensemble_accuracy"] > 0.5
    with pytest.raises(CoregError, match="labels"):
        simulate_vlm_annotator(t.images, None, 10)


# ----------------------------------------------------------------------------- few-shot
def test_few_shot_indices_and_apply():
    labels = np.array([0, 1, 0, 2, 1, 0, 1, 0, 2, 1, 0, 1])  # class 2 has only two samples
    idx = few_shot_indices(labels, 3, seed=0)
    assert np.array_equal(idx, np.sort(idx)) and len(np.unique(idx)) == len(idx)
    assert np.bincount(labels[idx], minlength=3).tolist() == [3, 3, 2]
    assert np.array_equal(idx, few_shot_indices(labels, 3, seed=0))
    assert len(few_shot_indices(labels, 0)) == 0
    with pytest.raises(CoregError):
        few_shot_indices(None, 2)

    cand = np.zeros((12, 3), bool)
    cand[:, (labels + 1) % 3] = False
    cand[np.arange(12), (labels + 1) % 3] = True  # every set misses the truth
    original = cand.copy()
    new, trusted = apply_few_shot(cand, labels, idx)
    assert np.array_equal(cand, original)  # input untouched
    assert np.array_equal(trusted, np.isin(np.arange(12), idx))
    assert np.array_equal(new[idx], np.eye(3, dtype=bool)[labels[idx]])
    assert np.array_equal(new[~trusted], original[~trusted])


# ----------------------------------------------------------------------------- annotation tables
def _table():
    ids = np.array([10, 11, 12], np.int64)
    cand = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], bool)
    votes = np.array([[0, 2, -1], [1, 1, 1], [0, 1, 2]], np.int64)
    probs = np.array([[0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], np.float32)
    return AnnotationTable(ids, cand, votes, probs, {"annotator": "test", "classes": ["a", "b", "c"]})


def test_annotation_round_trip(tmp_path):
    t = _table()
    path = tmp_path / "sub" / "ann.parquet"
    write_annotations(t, path)
    assert not (tmp_path / "sub" / "ann.parquet.tmp").exists()
    r = read_annotations(path, num_classes=3)
    assert np.array_equal(r.ids, t.ids) and r.ids.dtype == np.int64
    assert np.array_equal(r.candidates, t.candidates)
    assert np.array_equal(r.votes, t.votes)
    assert np.allclose(r.probs, t.probs)
    assert r.meta["annotator"] == "test" and r.meta["classes"] == ["a", "b", "c"]
    assert r.meta["num_classes"] == 3
    # without votes and probs
    t2 = AnnotationTable(t.ids, t.candidates)
    write_annotations(t2, tmp_path / "b.parquet")
    r2 = read_annotations(tmp_path / "b.parquet")
    assert r2.votes is None and r2.probs is None
    assert np.array_equal(r2.candidates, t.candidates)


def test_write_annotations_rejects_empty_set(tmp_path):
    t = _table()
    t.candidates[1] = False
    with pytest.raises(CoregError, match="row id 11"):
        write_annotations(t, tmp_path / "x.parquet")


def test_align_to_reorders_and_fails_on_mismatch():
    t = _table()
    a = t.align_to(np.array([12, 10, 11]))
    assert np.array_equal(a.ids, [12, 10, 11])
    assert np.array_equal(a.candidates, t.candidates[[2, 0, 1]])
    assert np.array_equal(a.votes, t.votes[[2, 0, 1]])
    with pytest.raises(CoregError, match="id 99"):
        t.align_to(np.array([10, 11, 99]))
    with pytest.raises(CoregError, match="id 12"):
        t.align_to(np.array([10, 11]))


def _write_raw(path, cols, meta=None):
    tbl = pa.table(cols)
    if meta is not None:
        tbl = tbl.replace_schema_metadata({b"coreg_ray": json.dumps(meta).encode()})
    pq.write_table(tbl, path)
    return path


def test_read_annotations_errors(tmp_path):
    lists = pa.list_(pa.int32())
    with pytest.raises(CoregError, match="not found"):
        read_annotations(tmp_path / "nope.parquet")
    p = _write_raw(tmp_path / "nocand.parquet", {"id": pa.array([1, 2], pa.int64())})
    with pytest.raises(CoregError, match="missing column 'candidates'"):
        read_annotations(p)
    p = _write_raw(tmp_path / "empty.parquet", {"id": pa.array([5, 7], pa.int64()),
                                                "candidates": pa.array([[0], []], lists)})
    with pytest.raises(CoregError, match="row id 7 has an empty candidate set"):
        read_annotations(p, num_classes=3)
    p = _write_raw(tmp_path / "range.parquet", {"id": pa.array([8, 9], pa.int64()),
                                                "candidates": pa.array([[0], [1, 5]], lists)},
                   {"num_classes": 3})
    with pytest.raises(CoregError, match=r"row id 9 has candidate 5 outside 0\.\.2"):
        read_annotations(p)
    p = _write_raw(tmp_path / "neg.parquet", {"id": pa.array([8], pa.int64()),
                                              "candidates": pa.array([[-1]], lists)})
    with pytest.raises(CoregError, match="row id 8 has candidate -1"):
        read_annotations(p, num_classes=3)
    p = _write_raw(tmp_path / "cls.parquet", {"id": pa.array([1], pa.int64()),
                                              "candidates": pa.array([[0]], lists)},
                   {"num_classes": 3})
    with pytest.raises(CoregError, match="annotated for 3 classes but the images have 4"):
        read_annotations(p, num_classes=4)
    p = _write_raw(tmp_path / "votes.parquet", {"id": pa.array([1, 4], pa.int64()),
                                                "candidates": pa.array([[0], [1]], lists),
                                                "votes": pa.array([[0], [3]], lists)},
                   {"num_classes": 3})
    with pytest.raises(CoregError, match="row id 4 has a vote"):
        read_annotations(p)
    p = _write_raw(tmp_path / "probs.parquet",
                   {"id": pa.array([1, 6], pa.int64()), "candidates": pa.array([[0], [1]], lists),
                    "probs": pa.array([[0.5, 0.5, 0.0], [1.0]], pa.list_(pa.float32()))},
                   {"num_classes": 3})
    with pytest.raises(CoregError, match="row id 6 has probs of length 1"):
        read_annotations(p)
    p = _write_raw(tmp_path / "dup.parquet", {"id": pa.array([1, 1], pa.int64()),
                                              "candidates": pa.array([[0], [1]], lists)})
    with pytest.raises(CoregError, match="duplicate ids"):
        read_annotations(p)


def test_merge_annotations_union_and_min_votes():
    a = AnnotationTable(np.array([1, 2, 3]),
                        np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], bool),
                        np.array([[0, 0], [1, 1], [0, -1]]),
                        np.full((3, 4), 0.25, np.float32), {"annotator": "a", "classes": list("wxyz")})
    # table b lists the same ids in another order
    b = AnnotationTable(np.array([3, 1, 2]),
                        np.array([[0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]], bool),
                        np.array([[2, -1], [0, 1], [1, 3]]),
                        np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], np.float32),
                        {"annotator": "b"})
    m = merge_annotations([a, b])
    assert np.array_equal(m.ids, [1, 2, 3])
    assert np.array_equal(m.candidates, np.array([[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]], bool))
    assert np.array_equal(m.votes, [[0, 0, 0, 1], [1, 1, 1, 3], [0, -1, 2, -1]])
    assert np.allclose(m.probs[0], [0.625, 0.125, 0.125, 0.125])
    assert m.meta["annotator"] == ["a", "b"] and m.meta["classes"] == list("wxyz")
    assert m.meta["merge"] == "union"
    v = merge_annotations([a, b], min_votes=3)
    # id 1: class 0 has 3 votes; id 2: class 1 has 3 votes; id 3: none reaches 3 -> union
    assert np.array_equal(v.candidates, np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]], bool))
    v2 = merge_annotations([a, b], min_votes=2)
    assert np.array_equal(v2.candidates[0], [1, 0, 0, 0])
    with pytest.raises(CoregError, match="min_votes"):
        merge_annotations([a, AnnotationTable(b.ids, b.candidates)], min_votes=2)
    with pytest.raises(CoregError, match="merge table 1"):
        merge_annotations([a, b.subset([0, 1])])
    with pytest.raises(CoregError):
        merge_annotations([])


# ----------------------------------------------------------------------------- image tables
def test_parquet_image_table_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    t = table_from_arrays(x, np.array([0, 1, 2, 1, 0]), ["cat", "dog", "eel"],
                          ids=np.array([4, 9, 2, 7, 5]))
    assert t.images.shape == (5, 3, 8, 8)
    assert np.array_equal(t.images.permute(0, 2, 3, 1).numpy(), x)
    path = tmp_path / "imgs" / "train.parquet"
    write_image_table(t, path)
    assert json.loads((path.parent / "classes.json").read_text()) == ["cat", "dog", "eel"]
    r = load_image_table(path)
    assert torch.equal(r.images, t.images)
    assert np.array_equal(r.ids, t.ids) and np.array_equal(r.labels, t.labels)
    assert r.classes == ["cat", "dog", "eel"]
    # the folder holding train.parquet is accepted too, and `limit` keeps the first rows
    r2 = load_image_table(path.parent, limit=2)
    assert np.array_equal(r2.ids, [4, 9])


def test_image_folder_grayscale_and_non_square(tmp_path):
    root = tmp_path / "folder"
    (root / "class_a").mkdir(parents=True)
    (root / "class_b").mkdir()
    Image.fromarray(np.full((20, 10), 200, np.uint8), "L").save(root / "class_a" / "tall.png")
    Image.fromarray(np.full((12, 12), 90, np.uint8), "L").save(root / "class_a" / "sq.png")
    rgb = np.zeros((8, 24, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb, "RGB").save(root / "class_b" / "wide.png")
    (root / "class_b" / "notes.txt").write_text("not an image")
    t = load_image_table(root, image_size=16)
    assert t.images.dtype == torch.uint8 and t.images.shape == (3, 3, 16, 16)
    assert t.classes == ["class_a", "class_b"]
    assert t.labels.tolist() == [0, 0, 1]
    assert t.meta["files"] == ["class_a/sq.png", "class_a/tall.png", "class_b/wide.png"]
    sq, tall, wide = t.images
    # grayscale -> three equal channels
    assert torch.equal(sq[0], sq[1]) and torch.equal(sq[1], sq[2])
    assert (sq == 90).all()
    # 10x20 (w x h) -> 8x16 content, letterboxed with 4 black columns each side
    assert (tall[:, :, :4] == 0).all() and (tall[:, :, 12:] == 0).all()
    assert (tall[:, :, 4:12] == 200).all()
    # 24x8 -> 16x5 (rounded), black rows above and below, red content
    assert (wide[:, :5] == 0).all() and (wide[:, 11:] == 0).all()
    assert (wide[0, 6:10] == 255).all() and (wide[1:, 6:10] == 0).all()


def test_corrupt_image_bytes_name_the_id(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": pa.array([5, 6], pa.int64()),
                             "image": pa.array([buf.getvalue(), b"\x89PNG garbage"], pa.binary()),
                             "label": pa.array([0, 1], pa.int16())}), path)
    with pytest.raises(CoregError, match="row id 6 cannot be decoded"):
        load_image_table(path)


def test_image_parquet_missing_column(tmp_path):
    path = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"id": pa.array([1], pa.int64())}), path)
    with pytest.raises(CoregError, match="missing column 'image'"):
        load_image_table(path)
    with pytest.raises(CoregError, match="not found"):
        load_image_table(tmp_path / "missing.parquet")


def test_table_from_arrays_gray_floats():
    x = np.array([[[0.0, 0.5], [1.0, 0.25]], [[0.1, 0.2], [0.3, 0.4]]])
    t = table_from_arrays(x, labels=np.array([1, 0]))
    assert t.images.dtype == torch.uint8 and t.images.shape == (2, 3, 2, 2)
    assert t.images[0, 0].tolist() == [[0, 128], [255, 64]]
    assert torch.equal(t.images[:, 0], t.images[:, 1]) and torch.equal(t.images[:, 1], t.images[:, 2])
    assert t.classes == ["0", "1"] and t.ids.tolist() == [0, 1]
    with pytest.raises(CoregError, match="classes"):
        table_from_arrays(x)


def test_image_table_rejects_bad_labels_and_duplicate_ids():
    x = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(CoregError, match="row id 1 has label 3"):
        table_from_arrays(x, np.array([0, 3]), ["a", "b"])
    with pytest.raises(CoregError, match="id 7 appears more than once"):
        table_from_arrays(x, np.array([0, 1]), ids=np.array([7, 7]))
