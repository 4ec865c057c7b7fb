"""Issue 22: every source of image files is read per shard. A folder of .parquet files, a
single Parquet file on S3 and a folder of image files (local or on S3) each give a row source
whose `read_rows` returns exactly the rows of `load_image_table` in its range (ids, labels,
pixels) while opening only the files (and, of a Parquet file, only the row groups) the range
overlaps and decoding only its rows, and whose `columns()` decodes nothing. The chunked decode
into one preallocated table gives the same pixels as stacking decoded images, with a lower
peak. The S3 cases use the real S3-compatible server of tests/test_object_storage.py."""
import io
import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_object_storage import _upload, s3, s3_server  # noqa: F401  (fixtures)
from tests.test_pools import make_folder

# the Parquet folder: three files (written out of name order), their row groups
LAYOUT = {"part-1.parquet": (0, 12, 5), "part-2.parquet": (12, 30, 4),
          "part-3.parquet": (30, 45, 100)}  # name: (first row, end row, row group size)


class CountingFS:
    """A pyarrow filesystem that records every file opened for reading (what a worker opens)."""

    def __init__(self, fs):
        self.fs, self.opened = fs, []

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def __getattr__(self, name):
        return getattr(self.fs, name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """45 image files of mixed sizes, modes and formats in class sub-folders (the generated
    pool of test_pools.py, without its two undecodable files)."""
    d = tmp_path_factory.mktemp("shard-sources") / "photos"
    make_folder(d, n=45)
    (d / "cat" / "broken.jpg").unlink()
    (d / "dog" / "sub dir" / "empty.png").unlink()
    return d


@pytest.fixture(scope="module")
def parquet_dir(folder, tmp_path_factory):
    """The folder's images as a folder of three Parquet files (int ids, not positions)."""
    from coreg_ray.data.listing import list_folder
    from coreg_ray.data.location import filesystem_of

    fs, root = filesystem_of(folder)
    paths, _, _, labels, names, _ = list_folder(folder, fs, root)
    assert len(paths) == 45
    d = tmp_path_factory.mktemp("shard-sources") / "shards"
    d.mkdir()
    for name in sorted(LAYOUT, reverse=True):
        a, b, group = LAYOUT[name]
        tbl = pa.table({"id": pa.array(np.arange(a, b) * 7 + 1000, pa.int64()),
                        "image": pa.array([Path(p).read_bytes() for p in paths[a:b]], pa.binary()),
                        "label": pa.array(labels[a:b], pa.int16())})
        pq.write_table(tbl, d / name, row_group_size=group)
    (d / "classes.json").write_text(json.dumps(names))
    return d


def _groups(name, lo, hi):
    """The row groups of file `name` that the global range [lo, hi) overlaps."""
    a, b, group = LAYOUT[name]
    lo, hi = max(lo, a) - a, min(hi, b) - a
    return list(range(lo // group, (hi - 1) // group + 1)) if lo < hi else []


def check_shards(spec, world, size, monkeypatch, expect_files=None):
    """Every rank of `world` reads exactly its rows of load_image_table(spec, size), opening
    only its files (`expect_files(lo, hi)`: the Parquet file names it may open, in order),
    decoding only its rows; columns() decodes nothing. Returns the row groups each rank read,
    per file name."""
    from coreg_ray.data import load_image_table, shards, tables
    from coreg_ray.data.shards import FolderRows, ParquetRows, row_source, shard_bounds

    full = load_image_table(spec, size)
    src = row_source(spec, size)
    assert isinstance(src, (ParquetRows, FolderRows))
    real = tables._to_rgb_array

    def refuse(*a, **k):
        raise AssertionError("decoded an image, or read a whole file")

    with monkeypatch.context() as m:
        m.setattr(tables, "_to_rgb_array", refuse)
        before = dict(shards.DECODED)
        cols = src.columns()
    assert shards.DECODED == before
    assert cols.ids.tolist() == full.ids.tolist() and cols.ids.dtype == full.ids.dtype
    assert np.array_equal(cols.labels, full.labels) and cols.classes == full.classes
    assert cols.image_size == (size or full.image_size) and cols.source == full.source
    if size is None:
        full = load_image_table(spec, cols.image_size)  # what the workers are asked for

    decoded, read, groups = [], [], []
    real_iter = pq.ParquetFile.iter_batches
    with monkeypatch.context() as m:
        m.setattr(tables, "_to_rgb_array", lambda im, *a: decoded.append(1) or real(im, *a))
        m.setattr(pq.ParquetFile, "iter_batches",
                  lambda self, *a, row_groups=None, **k: read.append(row_groups) or
                  real_iter(self, *a, row_groups=row_groups, **k))
        for name in ("read", "read_row_groups", "read_row_group"):  # no whole-file reads
            m.setattr(pq.ParquetFile, name, refuse)
        for lo, hi in shard_bounds(len(full), world):
            worker = pickle.loads(pickle.dumps(src))  # as Ray hands it to a worker
            assert worker._fs is None  # re-made from the spec there: no filesystem pickled
            fs = worker._fs = CountingFS(worker.fs)
            decoded.clear(), read.clear()
            n0 = shards.DECODED["rows"]
            part = worker.read_rows(lo, hi, cols.image_size)
            assert part.ids.tolist() == full.ids[lo:hi].tolist()
            assert np.array_equal(part.labels, full.labels[lo:hi])
            assert part.classes == full.classes and part.source == full.source
            assert part.images.shape == (hi - lo, 3, cols.image_size, cols.image_size)
            assert part.images.is_contiguous() and (part.images == full.images[lo:hi]).all()
            assert shards.DECODED["rows"] - n0 == hi - lo
            assert len(decoded) == hi - lo  # its images, each once, nothing else
            if isinstance(src, FolderRows):  # the files opened are its files
                assert sorted(p.rsplit("/photos/", 1)[1] for p in fs.opened) == \
                    sorted(full.ids[lo:hi].tolist())
            else:
                names = [p.rsplit("/", 1)[1] for p in fs.opened]
                assert names == expect_files(lo, hi), (lo, hi, names)
                groups.append(dict(zip(names, read)))
    return groups


def test_a_folder_of_parquet_files_is_read_per_shard(parquet_dir, monkeypatch):
    """Ranks of 2 and 3 each open only the files their range overlaps and read only those
    files' row groups it overlaps; the rows are those of the whole-folder loader, in its order
    (files sorted by name, row groups in order)."""
    def files(lo, hi):
        return [n for n in sorted(LAYOUT) if LAYOUT[n][0] < hi and LAYOUT[n][1] > lo]

    for world in (2, 3):
        from coreg_ray.data.shards import shard_bounds
        groups = check_shards(str(parquet_dir), world, 12, monkeypatch, files)
        for (lo, hi), got in zip(shard_bounds(45, world), groups):
            assert got == {n: _groups(n, lo, hi) for n in files(lo, hi)}, (lo, hi)
    # rank 1 of 3, [15, 30): one file, its row groups 0..4 of 4 rows: not the first file
    assert groups[1] == {"part-2.parquet": [0, 1, 2, 3, 4]}


def test_a_folder_of_image_files_is_read_per_shard(folder, monkeypatch):
    """Ids are the files' relative paths, labels their class sub-folders; a rank opens and
    decodes only its files; with no size asked for, the size comes from headers."""
    for world, size in ((2, 12), (3, None)):
        check_shards(str(folder), world, size, monkeypatch)


def test_a_single_parquet_file_and_its_folder_with_train_parquet(parquet_dir, tmp_path,
                                                                 monkeypatch):
    import shutil

    (tmp_path / "t").mkdir()
    shutil.copy(parquet_dir / "part-2.parquet", tmp_path / "t" / "train.parquet")
    shutil.copy(parquet_dir / "classes.json", tmp_path / "t" / "classes.json")
    LAYOUT["train.parquet"] = (0, 18, 4)
    try:
        for spec in (tmp_path / "t", tmp_path / "t" / "train.parquet"):
            groups = check_shards(str(spec), 3, 10, monkeypatch,
                                  lambda lo, hi: ["train.parquet"])
            assert groups == [{"train.parquet": _groups("train.parquet", lo, hi)}
                              for lo, hi in ((0, 6), (6, 12), (12, 18))]
    finally:
        del LAYOUT["train.parquet"]


@pytest.mark.slow
def test_sources_in_a_bucket_are_read_per_shard(s3, folder, parquet_dir, monkeypatch):
    """The same three forms on the S3-compatible server: a folder of Parquet files, one
    Parquet file, a folder of image files."""
    uri, fs, _ = s3
    _upload(fs, parquet_dir, uri[5:] + "/shards")
    _upload(fs, folder, uri[5:] + "/photos")

    def files(lo, hi):
        return [n for n in sorted(LAYOUT) if LAYOUT[n][0] < hi and LAYOUT[n][1] > lo]

    check_shards(f"{uri}/shards", 3, 12, monkeypatch, files)
    check_shards(f"{uri}/shards/part-3.parquet", 2, 12, monkeypatch,
                 lambda lo, hi: ["part-3.parquet"])
    check_shards(f"{uri}/photos", 2, 12, monkeypatch)


def test_the_other_sources_still_load_whole_tables():
    from coreg_ray.data.shards import TableRows, row_source

    assert isinstance(row_source("digits:train"), TableRows)
    assert isinstance(row_source("torchvision:CIFAR10:/nowhere"), TableRows)


# ------------------------------------------------------------------ the chunked decode
def _old_decode(blobs, size):
    """The decode before issue 22, for comparison: every image to an array, the arrays
    stacked, then permuted into a contiguous copy."""
    import torch
    from PIL import Image

    from coreg_ray.data.tables import _to_rgb_array

    arrays = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            im.load()
            arrays.append(_to_rgb_array(im, size))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _blobs(folder):
    return [p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tiff")
            and ".hidden" not in p.parts]


def test_chunked_decode_equals_the_old_stacking_bit_for_bit(folder, monkeypatch, capsys):
    from PIL import Image

    from coreg_ray.data import tables

    blobs = _blobs(folder)
    ids = np.arange(len(blobs))
    for chunk in (7, 2048):  # chunks that split the table, one chunk for all of it
        monkeypatch.setattr(tables, "CHUNK_ROWS", chunk)
        for size in (8, 16, 13):
            meta = {}
            new = tables.decode_images(blobs, ids, size, "t", meta)
            assert new.dtype == tables.torch.uint8 and new.is_contiguous()
            assert tables.torch.equal(new, _old_decode(blobs, size)), (chunk, size)
            assert meta["resized"] > 0 and "resized to" in capsys.readouterr().err
    # fetched chunk by chunk (uneven chunks): the same table
    parts = [(ids[a:b], blobs[a:b]) for a, b in ((0, 5), (5, 6), (6, 30), (30, len(blobs)))]
    assert tables.torch.equal(tables.decode_chunks(iter(parts), len(blobs), 16, "t"),
                              _old_decode(blobs, 16))
    capsys.readouterr()
    # without a size: the most common shape, the odd ones letterboxed, counted, one note
    meta = {}
    img = tables.decode_images(blobs, ids, None, "t", meta)
    assert capsys.readouterr().err.count("resized to") == 1
    shapes = [_shape(b) for b in blobs]
    target = tables.working_size(shapes)
    assert meta["resized"] == sum(s != (target, target) for s in shapes) > 0
    arrays = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            a = tables._to_rgb_array(im, None)
        arrays.append(a if a.shape[:2] == (target, target) else tables._letterbox(a, target))
    old = tables.torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    assert tables.torch.equal(img, old)


def _shape(blob):
    from PIL import Image
    with Image.open(io.BytesIO(blob)) as im:
        return im.size[1], im.size[0]


def test_a_bad_image_is_one_line_naming_its_row_in_any_chunk(folder, monkeypatch):
    from coreg_ray.data import tables
    from coreg_ray.errors import CoregError

    blobs = _blobs(folder)[:20]
    blobs[13] = b"\xff\xd8\xff not really a jpeg"
    monkeypatch.setattr(tables, "CHUNK_ROWS", 6)
    with pytest.raises(CoregError, match=r"^t: image of row id 1013 cannot be decoded") as e:
        tables.decode_images(blobs, np.arange(20) + 1000, 8, "t")
    assert "\n" not in str(e.value)


def test_chunked_decode_peaks_at_about_one_copy_of_the_images(monkeypatch):
    """tracemalloc (NumPy's allocations are traced): decoding 400 images of 32x32 into the
    preallocated table peaks at about 1x their bytes (plus a chunk in flight); stacking a list
    of arrays, as before, at about 2x (3x with the permuted copy torch then made, which
    tracemalloc does not see)."""
    from PIL import Image

    from coreg_ray.data import tables

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(400):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    monkeypatch.setattr(tables, "CHUNK_ROWS", 32)
    images = 400 * 3 * 32 * 32

    def peak(fn):
        tracemalloc.start()
        out = fn()
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p, out

    new_peak, new = peak(lambda: tables.decode_images(blobs, np.arange(400), 32, "t"))
    old_peak, old = peak(lambda: _old_decode(blobs, 32))
    assert tables.torch.equal(new, old)
    assert new_peak < 1.3 * images, new_peak / images
    assert old_peak > 1.8 * images, old_peak / images  # + the permuted copy (torch: untraced)
