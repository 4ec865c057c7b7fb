"""Which rows of a pool each Ray Train worker owns, and reading only those rows.

The assignment is fixed and deterministic: with N rows (in the table's order: Parquet files
in order, row groups in order) and W ranks, rank r owns the contiguous range
[r * N // W, (r + 1) * N // W). Why contiguous ranges (docs/scale.md):

- shards differ by at most one row, so every rank makes the same number of steps (DDP);
- rank order is row order: concatenating every rank's per-sample values (the N scalar
  division losses the GMM is fitted on) gives exactly the table's order, so the split is the
  one a single process holding every row would fit, and re-sharding a checkpoint to another
  world size is a matter of row positions;
- a worker reads only its rows' files and row groups and decodes only its own rows.

A row source (`row_source`) answers two questions: `columns()` -- ids, labels, class names
and the working image size, from the columns (or the folder's listing) and a few image
headers, never decoding a pixel (what the driver checks the run's tables with) -- and
`read_rows(lo, hi, size)` -- an `ImageTable` of rows lo..hi-1 (what a worker trains on),
decoded chunk by chunk into one preallocated uint8 table (`tables.decode_chunks`). Which
sources are read per shard, local or on object storage (s3://, gs://):

- `ParquetRows`: a Parquet file, a folder holding train.parquet, or a folder of .parquet files
  (sorted by name: the order `load_image_table` gives). A range opens only the files it
  overlaps and reads, a few thousand rows at a time (`iter_batches`), only their row groups it
  overlaps (the id / image / label columns);
- `FolderRows`: a folder of image files (ids their relative paths, labels by the rule of
  `coreg_ray.data.sources`). The driver lists the folder once; the listing travels with the
  source, and a range opens and decodes only its own files.

Every other source (digits, .npz, torchvision, a table already in memory) falls back to
`TableRows`: the whole table is loaded in the worker, which keeps its rows. A source sent to a
worker re-opens its filesystem there from the spec (the filesystem object is not pickled). Ids
are kept exactly as read (int64 or str): nothing here casts them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from coreg_ray.data import tables
from coreg_ray.data.tables import ImageTable
from coreg_ray.data.ids import as_ids, first_duplicate, id_text
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


class _Rows:
    """What the file-backed row sources share: the spec (a worker re-opens the filesystem from
    it: the filesystem object, and the credentials it holds, is not pickled), the filesystem,
    the name shown."""

    def __init__(self, spec, image_size, limit, fs):
        from coreg_ray.data.location import for_workers, location

        tables.check_size_limit(image_size, limit)
        self.spec = str(for_workers(spec))  # a Ray worker's working folder is not the driver's
        self.image_size, self.limit, self._fs = image_size, limit, fs
        self.shown = str(location(spec))  # as load_image_table names it (no credentials)

    @property
    def fs(self):
        if self._fs is None:
            from coreg_ray.data.location import filesystem_of, location
            self._fs = filesystem_of(location(self.spec))[0]
        return self._fs

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}

    def _location(self):
        from coreg_ray.data.location import location
        return location(self.spec)


class ParquetRows(_Rows):
    """A Parquet image table (`id`, encoded `image`, optional `label`; classes.json beside it):
    one file, a folder holding train.parquet, or a folder of .parquet files (sorted by name),
    local or on object storage; rows in the order `load_image_table` gives them (files in
    order, row groups in order). Read by row ranges: a range opens only the files it overlaps
    and reads only their row groups it overlaps."""

    def __init__(self, spec, image_size: int | None = None, limit: int | None = None, *,
                 fs=None, paths=None):
        if paths is None:
            from coreg_ray.data.listing import locate
            _, fs, paths, _, _ = locate(spec, "this command")
        super().__init__(spec, image_size, limit, fs)
        self.paths = list(paths)
        from coreg_ray.data.location import filesystem_of
        self._one_file = self.paths == [filesystem_of(self._location())[1]]
        # from columns() (the driver), pickled with the source: rows of each file, whether
        # every file has labels, the class names
        self._counts = self._has_label = self._names = None

    def _open(self, path):
        from coreg_ray.data.listing import open_image_parquet
        return open_image_parquet(self.fs, path, self.shown)

    def _classes(self, labels):
        from coreg_ray.data.listing import read_classes_at

        loc = self._location()
        names = read_classes_at((loc.parent if self._one_file else loc) / "classes.json")
        if names is None:
            if labels is None:
                raise CoregError(f"{self.shown}: no classes.json beside it and no labels: pass "
                                 "class names")
            names = [str(i) for i in range(int(labels.max()) + 1)]
        return list(names)

    def columns(self) -> TableColumns:
        import pyarrow as pa

        parts, counts, has_label = [], [], True
        for p in self.paths:
            pf, cols = self._open(p)
            has_label = has_label and "label" in cols
            counts.append(pf.metadata.num_rows)
            parts.append(pf.read(columns=["id"] + (["label"] if "label" in cols else [])))
        if not has_label:
            parts = [t.select(["id"]) for t in parts]
        try:
            tbl = pa.concat_tables(parts)
        except pa.ArrowInvalid as exc:
            raise CoregError(f"{self.shown}: the Parquet files disagree on their columns "
                             f"({exc})") from None
        if self.limit is not None:
            tbl = tbl.slice(0, self.limit)
        if tbl.num_rows == 0:
            raise CoregError(f"{self.shown}: no rows (no images)")
        ids = as_ids(tbl.column("id"), self.shown)  # int64 or str, kept as given
        labels = tables.label_column(tbl, self.shown)
        names = self._classes(labels)
        dup = first_duplicate(ids)
        if dup is not None:
            raise CoregError(f"{self.shown}: id {id_text(dup)} appears more than once")
        if labels is not None and ((labels < 0) | (labels >= len(names))).any():
            i = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
            raise CoregError(f"{self.shown}: row id {ids[i]} has label {labels[i]} outside "
                             f"0..{len(names) - 1} ({len(names)} classes)")
        self._counts, self._has_label, self._names = counts, has_label, names
        size = self.image_size or self._header_size()
        return TableColumns(ids, labels, list(names), self.shown, int(size))

    def _header_size(self) -> int:
        """The working size of a table with no size asked for: that of the most common shape
        among the first 64 images' headers (PIL reads the header; no pixel is decoded)."""
        shapes = []
        for p in self.paths:
            pf, _ = self._open(p)
            for batch in pf.iter_batches(batch_size=64, columns=["image"]):
                for b in batch.column(0).to_pylist()[:64 - len(shapes)]:
                    b = b.get("bytes") if isinstance(b, dict) else b
                    shapes.append(image_shape(io.BytesIO(b)) if b is not None else None)
                break
            if len(shapes) >= 64:
                break
        return header_size(shapes, self.shown)

    def _index(self):
        """(rows of each file, whether every file has labels): kept from `columns()`, else
        read from the files' footers and schemas."""
        if self._counts is None:
            counts, has_label = [], True
            for p in self.paths:
                pf, cols = self._open(p)
                counts.append(pf.metadata.num_rows)
                has_label = has_label and "label" in cols
            self._counts, self._has_label = counts, has_label
        return self._counts, self._has_label

    def _batches(self, lo: int, hi: int, want: list):
        """The Arrow record batches of rows lo..hi-1 (at most `tables.CHUNK_ROWS` rows each),
        in order: only the files the range overlaps are opened, only their row groups it
        overlaps are read, a batch at a time."""
        at = 0
        for path, count in zip(self.paths, self._index()[0]):
            a, b = max(lo, at) - at, min(hi, at + count) - at  # the range in this file
            if a < b:
                pf, _ = self._open(path)
                groups, pos, start = [], None, 0
                for g in range(pf.metadata.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    if start < b and start + rows > a:
                        groups.append(g)
                        pos = start if pos is None else pos
                    start += rows
                for batch in pf.iter_batches(batch_size=tables.CHUNK_ROWS, row_groups=groups,
                                             columns=want):
                    s, e = max(a, pos), min(b, pos + batch.num_rows)
                    if s < e:
                        yield batch.slice(s - pos, e - s)
                    pos += batch.num_rows
                    if pos >= b:
                        break
            at += count

    def read_rows(self, lo: int, hi: int, size: int) -> ImageTable:
        """Rows lo..hi-1, decoded at `size` into one preallocated table, a chunk of rows at a
        time (`tables.decode_chunks`): only the files and row groups the range overlaps are
        read, only the range's images decoded."""
        from coreg_ray.data.ids import concat_ids

        has_label = self._index()[1]
        want = ["id", "image"] + (["label"] if has_label else [])
        ids, labels = [], []

        def chunks():
            for batch in self._batches(lo, hi, want):
                rid = as_ids(batch.column("id"), self.shown)  # int64 or str, kept as given
                blobs = batch.column("image").to_pylist()
                for i, b in enumerate(blobs):
                    if isinstance(b, dict):  # HF-style struct {bytes, path}
                        blobs[i] = b.get("bytes")
                    if blobs[i] is None:
                        raise CoregError(f"{self.shown}: row id {rid[i]} has no image bytes")
                ids.append(rid)
                if has_label:
                    labels.append(tables.label_column(batch, self.shown))
                yield rid, blobs

        meta_out: dict = {}
        images = tables.decode_chunks(chunks(), hi - lo, size, self.shown, meta_out)
        ids = concat_ids(ids)
        labels = np.concatenate(labels) if has_label else None
        names = self._names or self._classes(labels)
        DECODED["rows"] += hi - lo
        DECODED["calls"] += 1
        meta_out["rows"] = (lo, hi)
        return ImageTable(images, ids, labels, list(names), self.shown, meta_out)


class FolderRows(_Rows):
    """A folder of image files (local or on object storage): ids are the files' paths relative
    to the folder, labels from its class sub-folders or classes.json, as `load_image_table`
    finds them (`coreg_ray.data.listing.list_folder`). `columns()` lists the folder and reads
    a few headers; `read_rows` opens and decodes only the range's files."""

    def __init__(self, spec, image_size: int | None = None, limit: int | None = None, *,
                 fs=None, root=None):
        if root is None:
            from coreg_ray.data.listing import locate
            _, fs, _, root, _ = locate(spec, "this command")
        super().__init__(spec, image_size, limit, fs)
        self.root = root
        self._listing = None  # (ids, labels, names) from columns(), pickled with the source

    def _list(self):
        if self._listing is None:
            from coreg_ray.data.listing import list_folder

            _, ids, _, labels, names, _ = list_folder(self._location(), self.fs, self.root,
                                                      None, self.limit)
            self._listing = (ids, labels, tables.folder_classes(names, self.shown))
        return self._listing

    def _paths(self, ids):
        return [self.root.rstrip("/") + "/" + rel for rel in ids]

    def columns(self) -> TableColumns:
        ids, labels, names = self._list()
        size = self.image_size
        if not size:
            shapes = []
            for p in self._paths(ids[:64]):
                try:
                    with self.fs.open_input_file(p) as f:  # PIL reads only the header of it
                        shapes.append(image_shape(f))
                except Exception:
                    continue  # an unreadable file fails, naming it, in the worker that reads it
            size = header_size(shapes, self.shown)
        return TableColumns(ids, labels, list(names), self.shown, int(size))

    def read_rows(self, lo: int, hi: int, size: int) -> ImageTable:
        """Rows lo..hi-1: only those files are opened and decoded, at `size`, into one
        preallocated table."""
        ids, labels, names = self._list()
        part = ids[lo:hi]
        meta: dict = {}
        decode = tables.folder_decoder(self.fs, self._paths(part), part, self.shown, size)
        images = tables._stack(decode, len(part), size, self.shown, part, meta)
        DECODED["rows"] += len(part)
        DECODED["calls"] += 1
        meta.update(files=list(part), rows=(lo, hi))
        return ImageTable(images, part, None if labels is None else labels[lo:hi], list(names),
                          self.shown, meta)


def image_shape(f):
    """(h, w) of an image from its header (`f`: a file object; PIL reads only the header, no
    pixel is decoded), None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            return im.size[1], im.size[0]
    except Exception:
        return None  # a corrupt image fails, naming its id, in the worker that decodes it


def header_size(shapes, shown: str) -> int:
    """The working size of a table with no size asked for: that of the most common of these
    header shapes (the first 64 images'; None: unreadable)."""
    shapes = [s for s in shapes if s is not None]
    if not shapes:
        raise CoregError(f"{shown}: none of the first images can be read")
    return tables.working_size(shapes)


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
    `ImageTable`): `ParquetRows` for a Parquet file, a folder holding train.parquet or one of
    .parquet files, `FolderRows` for a folder of image files, local or on object storage;
    `TableRows` for digits, .npz, torchvision and a table already in memory."""
    from coreg_ray.data.sources import is_builtin

    if isinstance(spec, ImageTable) or is_builtin(spec):
        return TableRows(spec, image_size, limit)
    from coreg_ray.data.listing import locate

    kind, fs, paths, root, _ = locate(spec, "this command")
    if kind == "parquet":
        return ParquetRows(spec, image_size, limit, fs=fs, paths=paths)
    return FolderRows(spec, image_size, limit, fs=fs, root=root)
