"""Which rows of a pool each Ray Train worker owns, and reading only those rows.

The assignment is fixed and deterministic: with N rows (in the table's order: Parquet files
in order, row groups in order) and W ranks, rank r owns the contiguous range
[r * N // W, (r + 1) * N // W). Why contiguous ranges (docs/scale.md):

- shards differ by at most one row, so every rank makes the same number of steps (DDP);
- rank order is row order: concatenating every rank's per-sample values (the N scalar
  division losses the GMM is fitted on) gives exactly the table's order, so the split is the
  one a single process holding every row would fit, and re-sharding a checkpoint to another
  world size is a matter of row positions;
- a worker reads only the Parquet row groups its range overlaps (`ParquetRows.read_rows`:
  pyarrow `read_row_groups`, the id/image/label columns only) and decodes only its own rows.

A row source (`row_source`) answers two questions: `columns()` -- ids, labels, class names
and the working image size, from the columns and one image header, never decoding a pixel
(what the driver checks the run's tables with) -- and `read_rows(lo, hi, size)` -- an
`ImageTable` of rows lo..hi-1 (what a worker trains on). Parquet tables are read by row group;
every other source (digits, .npz, image folders, torchvision, a table already in memory) falls
back to loading the whole table in the worker and keeping its rows. Ids are kept exactly as
read (int64 or str): nothing here casts them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coreg_ray.data import tables
from coreg_ray.data.tables import ImageTable
from coreg_ray.data.ids import as_ids
from coreg_ray.errors import CoregError

# rows this process has decoded through a row source (tests prove a worker decodes its own)
DECODED = {"rows": 0, "calls": 0}


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per rank: contiguous ranges, sizes differing by at most one row."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def check_world(n: int, world: int, what: str = "training table") -> None:
    if world > n:
        raise CoregError(f"--workers {world} is more than the {n} rows of the {what}: every "
                         f"worker must own at least one row (use --workers <= {n})")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world`: rows [lo, hi) of a table of `n` rows; `trusted` the table's
    few-shot rows (global positions)."""
    rank: int
    world: int
    n: int
    trusted: tuple = ()
    fingerprint: dict | None = field(default=None, compare=False)  # the table's (driver's)

    @property
    def bounds(self) -> tuple[int, int]:
        return shard_bounds(self.n, self.world)[self.rank]

    @property
    def counts(self) -> list[int]:
        return [hi - lo for lo, hi in shard_bounds(self.n, self.world)]

    def trusted_local(self) -> np.ndarray:
        """This rank's few-shot rows, as positions in its shard."""
        lo, hi = self.bounds
        t = np.asarray(self.trusted, np.int64)
        return t[(t >= lo) & (t < hi)] - lo


@dataclass
class TableColumns:
    """What the driver knows of a table without decoding it (the attributes of an
    `ImageTable` that `check_training_inputs` reads)."""
    ids: np.ndarray
    labels: np.ndarray | None
    classes: list
    source: str
    image_size: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ParquetRows:
    """A Parquet image table (`id`, encoded `image`, optional `label`; classes.json beside it),
    read by row ranges."""

    def __init__(self, path, image_size: int | None = None, limit: int | None = None):
        self.path, self.image_size, self.limit = Path(path), image_size, limit

    def _file(self):
        return tables.open_image_parquet(self.path)

    def columns(self) -> TableColumns:
        pf, cols = self._file()
        want = ["id"] + (["label"] if "label" in cols else [])
        tbl = pf.read(columns=want)
        if self.limit is not None:
            tbl = tbl.slice(0, self.limit)
        if tbl.num_rows == 0:
            raise CoregError(f"{self.path}: no rows (no images)")
        ids = as_ids(tbl.column("id"), str(self.path))  # int64 or str, kept as given
        labels = tables.label_column(tbl, str(self.path))
        names = tables.read_classes(self.path)
        if names is None:
            if labels is None:
                raise CoregError(f"{self.path}: no classes.json beside it and no labels: pass "
                                 "class names")
            names = [str(i) for i in range(int(labels.max()) + 1)]
        if len(np.unique(ids)) != len(ids):
            raise CoregError(f"{self.path}: id {tables._first_duplicate(ids)} appears more "
                             "than once")
        if labels is not None and ((labels < 0) | (labels >= len(names))).any():
            i = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
            raise CoregError(f"{self.path}: row id {ids[i]} has label {labels[i]} outside "
                             f"0..{len(names) - 1} ({len(names)} classes)")
        size = self.image_size or self._header_size(pf)
        return TableColumns(ids, labels, list(names), str(self.path), int(size))

    def _header_size(self, pf) -> int:
        """The working size of a table with no size asked for: that of the most common shape
        among the first 64 images' headers (PIL reads the header; no pixel is decoded)."""
        from PIL import Image

        batch = next(pf.iter_batches(batch_size=64, columns=["image"]))
        shapes = []
        for b in batch.column(0).to_pylist():
            b = b.get("bytes") if isinstance(b, dict) else b
            try:
                with Image.open(io.BytesIO(b)) as im:
                    shapes.append((im.size[1], im.size[0]))
            except Exception:
                continue  # a corrupt image fails, naming its id, in the worker that decodes it
        if not shapes:
            raise CoregError(f"{self.path}: none of the first images can be read")
        return tables.working_size(shapes)

    def read_rows(self, lo: int, hi: int, size: int) -> ImageTable:
        """Rows lo..hi-1, decoded at `size`: only the row groups the range overlaps are read,
        only the range's images decoded."""
        pf, cols = self._file()
        meta = pf.metadata
        groups, starts, at = [], [], 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if at < hi and at + rows > lo:
                groups.append(g)
                starts.append(at)
            at += rows
        want = ["id", "image"] + (["label"] if "label" in cols else [])
        tbl = pf.read_row_groups(groups, columns=want).slice(lo - starts[0], hi - lo)
        ids = as_ids(tbl.column("id"), str(self.path))  # int64 or str, kept as given
        blobs = tbl.column("image").to_pylist()
        for i, b in enumerate(blobs):
            if isinstance(b, dict):
                blobs[i] = b.get("bytes")
            if blobs[i] is None:
                raise CoregError(f"{self.path}: row id {ids[i]} has no image bytes")
        labels = tbl.column("label").to_numpy().astype(np.int64) if "label" in want else None
        names = tables.read_classes(self.path) or \
            [str(i) for i in range(int(labels.max()) + 1 if labels is not None else 0)]
        meta_out: dict = {}
        images = tables.decode_images(blobs, ids, size, str(self.path), meta_out)
        DECODED["rows"] += len(blobs)
        DECODED["calls"] += 1
        meta_out["rows"] = (lo, hi)
        return ImageTable(images, ids, labels, list(names), str(self.path), meta_out)


class TableRows:
    """Any other source (or a table already in memory): the fallback. `columns()` and
    `read_rows` load the whole table (decoding it) and keep what they need."""

    def __init__(self, spec, image_size: int | None = None, limit: int | None = None):
        self.spec, self.image_size, self.limit = spec, image_size, limit

    def _load(self, size=None) -> ImageTable:
        if isinstance(self.spec, ImageTable):
            return self.spec
        return tables.load_image_table(self.spec, size or self.image_size, self.limit)

    def columns(self) -> TableColumns:
        t = self._load()
        return TableColumns(t.ids, t.labels, list(t.classes), t.source,
                            int(self.image_size or t.image_size), dict(t.meta))

    def read_rows(self, lo: int, hi: int, size: int) -> ImageTable:
        t = self._load(size)
        DECODED["rows"] += len(t) if not isinstance(self.spec, ImageTable) else 0
        part = t.subset(np.arange(lo, hi))
        part.meta["rows"] = (lo, hi)
        return part


def row_source(spec, image_size: int | None = None, limit: int | None = None):
    """The row source of an image table given as `coreg-ray train --images` takes it (or an
    `ImageTable`): `ParquetRows` for a Parquet file (or a folder holding train.parquet),
    `TableRows` for everything else."""
    if isinstance(spec, (str, Path)) and "://" not in str(spec):
        path = Path(spec)
        if path.is_dir() and (path / "train.parquet").exists():
            path = path / "train.parquet"
        if path.suffix == ".parquet" and path.is_file():
            return ParquetRows(path, image_size, limit)
    return TableRows(spec, image_size, limit)
