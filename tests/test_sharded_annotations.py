"""A sharded run's annotation file (issue 22): the driver reads its id column only (never the
candidate sets, nothing of it put in the object store), each worker reads only its own rows,
by id; the statistics and the candidate key summed over the ranks equal the whole table's."""
import pickle

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.test_object_storage import s3, s3_server  # noqa: F401  (an S3-compatible server)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, digits):
    """240 digits rows as Parquet (row groups of 50), and their annotations written in another
    order (reversed) in row groups of 40, with votes and probabilities."""
    import pyarrow.parquet as pq

    from coreg_ray.data import (AnnotationTable, synthetic_annotations, write_annotations,
                                write_image_table)

    d = tmp_path_factory.mktemp("annpool")
    train = digits[0].subset(np.arange(240))
    write_image_table(train, d / "train.parquet")
    pq.write_table(pq.read_table(d / "train.parquet"), d / "train.parquet", row_group_size=50)
    syn = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    rng = np.random.default_rng(0)
    votes = rng.integers(-1, 10, (240, 3))
    probs = rng.dirichlet(np.ones(10), 240).astype(np.float32)
    ann = AnnotationTable(syn.ids, syn.candidates, votes, probs, {"annotator": "test"})
    back = ann.subset(np.arange(239, -1, -1))
    write_annotations(back, d / "tmp.parquet")
    tbl = pq.read_table(d / "tmp.parquet")
    pq.write_table(tbl, d / "ann.parquet", row_group_size=40)  # 6 groups, schema metadata kept
    assert pq.ParquetFile(d / "ann.parquet").metadata.num_row_groups == 6
    return {"train": d / "train.parquet", "ann": d / "ann.parquet", "table": train,
            "annotations": ann}


def test_the_driver_reads_the_annotation_ids_only_and_sends_no_table(pool, monkeypatch):
    """Everything the driver reads of the annotation file is its id column; what it hands the
    workers is a few hundred bytes (no ids, no candidate sets)."""
    import pyarrow.parquet as pq

    from coreg_ray.data import annotations as annmod
    from coreg_ray.data.annotation_rows import AnnotationRows
    from coreg_ray.distributed.train import check_sharded_inputs

    def refuse(*a, **k):
        raise AssertionError("the driver read the annotation table")

    monkeypatch.setattr(annmod, "read_annotations", refuse)
    monkeypatch.setattr(annmod, "table_from_arrow", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    reads = []
    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        real = getattr(pq.ParquetFile, name)

        def spy(self, *a, _real=real, _name=name, **k):
            reads.append((_name, k.get("columns")))
            return _real(self, *a, **k)

        monkeypatch.setattr(pq.ParquetFile, name, spy)
    _, _, train, _, ann, checked = check_sharded_inputs(
        tiny_config(), str(pool["train"]), str(pool["ann"]), None, None, None, 3)
    assert isinstance(ann, AnnotationRows) and len(ann) == 240 and ann.num_classes == 10
    assert np.array_equal(ann.ids, pool["table"].ids)  # in the pool's order
    assert ("read", ["id"]) in reads  # the annotation file's id column ...
    assert all(cols is not None and "candidates" not in cols and "votes" not in cols
               and "probs" not in cols for _, cols in reads)  # ... and nothing else of it
    assert checked.fingerprint["candidates"] is None and checked.candidates is None
    sent = pickle.dumps(ann)
    assert len(sent) < 2_000 and pickle.loads(sent).ids is None and ann.meta["annotator"] == "test"


def test_each_worker_reads_only_its_own_annotation_rows(pool, monkeypatch):
    """Rank r of 3 reads the candidate sets of the row groups holding its ids only, parses only
    its rows, and gets exactly the whole table's rows for its ids, in its order."""
    import pyarrow.parquet as pq

    from coreg_ray.data import annotation_rows
    from coreg_ray.data.annotation_rows import annotation_ids
    from coreg_ray.data.shards import shard_bounds

    full = pool["annotations"]  # in the pool's order
    rows = annotation_ids(pool["ann"], pool["table"].ids, 10)
    worker = pickle.loads(pickle.dumps(rows))  # what a worker gets
    groups = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda self, *a, **k: groups.append(
        (k["row_groups"], k["columns"])) or real(self, *a, **k))
    for lo, hi in shard_bounds(240, 3):  # [0,80) [80,160) [160,240) = file rows 239-lo .. 240-hi
        groups.clear()
        before = annotation_rows.READ["rows"]
        mine = worker.read(pool["table"].ids[lo:hi])
        assert annotation_rows.READ["rows"] - before == hi - lo  # its rows, nothing else
        file_groups = sorted({(239 - i) // 40 for i in range(lo, hi)})
        assert [g for g, _ in groups] == [[g] for g in file_groups]
        assert all("candidates" in cols for _, cols in groups)
        want = full.subset(np.arange(lo, hi))
        assert np.array_equal(mine.ids, want.ids)
        assert np.array_equal(mine.candidates, want.candidates)
        assert np.array_equal(mine.votes, want.votes) and np.array_equal(mine.probs, want.probs)


def test_annotation_ids_errors_are_the_aligners_lines(pool, tmp_path):
    from coreg_ray.data import AnnotationTable, write_annotations
    from coreg_ray.data.annotation_rows import annotation_ids
    from coreg_ray.errors import CoregError

    ann, ids = pool["annotations"], pool["table"].ids
    write_annotations(ann.subset(np.arange(1, 240)), tmp_path / "missing.parquet")
    write_annotations(AnnotationTable(np.concatenate([ann.ids, [10_000, 9_999]]),
                                      np.concatenate([ann.candidates, ann.candidates[:2]])),
                      tmp_path / "extra.parquet")
    for name in ("missing", "extra"):
        with pytest.raises(CoregError) as got:
            annotation_ids(tmp_path / f"{name}.parquet", ids, 10, "ann")
        with pytest.raises(CoregError) as want:
            ann.subset(np.arange(1, 240)).align_to(ids, "ann") if name == "missing" else \
                AnnotationTable(np.concatenate([ann.ids, [10_000, 9_999]]),
                                np.concatenate([ann.candidates, ann.candidates[:2]])).align_to(
                    ids, "ann")
        assert str(got.value) == str(want.value) and "\n" not in str(got.value)
    with pytest.raises(CoregError, match="annotated for 10 classes but the images have 7"):
        annotation_ids(pool["ann"], ids, 7)
    names = np.array([f"x/{i}.png" for i in ids], dtype=object)
    with pytest.raises(CoregError, match="image ids have no annotation .*the images' strings"):
        annotation_ids(pool["ann"], names, 10)


def test_summed_statistics_and_candidate_key_equal_the_whole_tables(pool, tmp_path):
    """`shard_annotations` over a (world-1) process group gives `annotation_stats` to the bit;
    the candidate key of any split, in any order, sums to the whole table's."""
    import torch.distributed as dist

    from coreg_ray.data import annotation_stats
    from coreg_ray.data.annotation_rows import annotation_ids, candidate_key, key_parts, key_text
    from coreg_ray.distributed.shard_data import shard_annotations

    full, train = pool["annotations"], pool["table"]
    whole = candidate_key(full.ids, full.candidates)
    for world in (1, 2, 3, 7):
        parts = [key_parts(full.ids[lo:hi], full.candidates[lo:hi])
                 for lo, hi in [(r * 240 // world, (r + 1) * 240 // world) for r in range(world)]]
        assert key_text(np.sum(parts, 0)) == whole
    perm = np.random.default_rng(1).permutation(240)
    assert candidate_key(full.ids[perm], full.candidates[perm]) == whole
    flipped = full.candidates.copy()
    flipped[5] = ~flipped[5]
    assert candidate_key(full.ids, flipped) != whole
    names = np.array([f"x/{i}.png" for i in full.ids], dtype=object)
    assert candidate_key(names, full.candidates) != whole

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        rows = pickle.loads(pickle.dumps(annotation_ids(pool["ann"], train.ids, 10)))
        ann, stats, key = shard_annotations(rows, train, 0, 240)
    finally:
        dist.destroy_process_group()
    assert stats == annotation_stats(full, train.labels) and key == whole
    assert np.array_equal(ann.candidates, full.candidates)


@pytest.mark.slow
def test_a_workers_annotation_rows_from_a_file_in_a_bucket(s3, pool):
    """An annotation file in a bucket (a real S3-compatible server): the driver's id check and
    a worker's read by id work on the URI as on a local path."""
    from coreg_ray.data import write_annotations
    from coreg_ray.data.annotation_rows import annotation_ids

    uri = s3[0]
    full, ids = pool["annotations"], pool["table"].ids
    write_annotations(full.subset(np.arange(239, -1, -1)), f"{uri}/ann.parquet")
    rows = annotation_ids(f"{uri}/ann.parquet", ids, 10)
    assert rows.path == f"{uri}/ann.parquet" and np.array_equal(rows.ids, ids)
    part = pickle.loads(pickle.dumps(rows)).read(ids[100:160])
    assert np.array_equal(part.ids, ids[100:160])
    assert np.array_equal(part.candidates, full.candidates[100:160])
    assert np.array_equal(part.probs, full.probs[100:160])
