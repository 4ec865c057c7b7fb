"""Pools: where a source's rows are, what their ids are, and how their bytes are read.

One place for every command (annotate, predict and the table loader behind train/evaluate):

    pool = open_pool("photos/")          # or pool.parquet, shards/, s3://bucket/photos, digits:test
    pool.ids, pool.labels, pool.classes  # ids as the source gives them (int64 or str)
    for batch in pool.iter_raw(256): ... # {"id", "image": encoded bytes}, without Ray
    ds = pool.ray_dataset(ray, ...)      # the same rows as a Ray Data dataset

Forms of a pool:
- a Parquet image table (``id``, ``image``, optional ``label``): a ``.parquet`` file, a folder
  with ``train.parquet``, or a folder of ``.parquet`` shards (all of them, sorted by name);
- a folder of image files, searched recursively (jpg/jpeg/png/webp/bmp/gif/tif/tiff, any case);
  other files are ignored and counted in one note; hidden files and folders (".name") are not
  looked at. The id of an image is its path relative to the folder, with "/" separators;
- the built-in sources (``digits``, ``digits:train``, ``digits:test``, ``torchvision:...``, a
  ``.npz``): decoded in memory, their own int ids;
- any of the first two on object storage (``s3://``, ``gs://``, other pyarrow filesystem URIs;
  `coreg_ray.data.location`).

Labels of a folder (the label rule): when every image lies inside a top-level sub-folder, the
name of that sub-folder is the image's class: the class names are then those sub-folders'
names in sorted order, or the names given (``--classes``, ``classes.json`` in the folder, a
model's classes) when every sub-folder is one of them. An image directly in the folder, or a
sub-folder that is not a given class, makes the whole folder an unlabelled pool.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coreg_ray.data.ids import as_ids, concat_ids, first_duplicate, id_text
from coreg_ray.data.listing import (FORMS, IMAGE_SUFFIXES, folder_labels,  # noqa: F401
                                    list_folder, locate, open_image_parquet, read_classes_at)
from coreg_ray.data.location import filesystem_of, is_uri, location, redact
from coreg_ray.errors import CoregError

def is_builtin(spec) -> bool:
    s = str(spec)
    return s.split(":")[0] == "digits" or s.startswith("torchvision:") or \
        (not is_uri(s) and s.endswith(".npz"))


@dataclass
class Pool:
    spec: str  # as shown to the user (credentials removed)
    kind: str  # "parquet" | "files" | "builtin"
    fs: object = None  # pyarrow FileSystem (parquet / files)
    paths: list = field(default_factory=list)  # parquet files or image files, on `fs`
    root: str = ""  # the folder of a "files" pool, on `fs`
    ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    classes: list | None = None  # classes.json (or class sub-folders) of the pool, if any
    ignored: int = 0  # files that are not images (folder pools)
    table: object = None  # the decoded ImageTable of a built-in source
    tops: list | None = None  # top-level sub-folder of each image ("" if at the root)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def files(self) -> list[str]:
        """What the pool reads, for plans and reports (no credentials)."""
        if self.kind == "builtin":
            return [self.spec]
        if self.kind == "files":
            return [self.spec]
        return [redact(_display(self, p)) for p in self.paths]

    def labels_for(self, classes) -> np.ndarray | None:
        """Labels of the rows as indices into `classes` (None where the pool has none for them:
        a folder whose sub-folders are not all among `classes`, a table of other classes)."""
        if self.kind == "files":
            return folder_labels(self.tops, classes)[0] if self.tops else None
        if self.labels is None:
            return None
        if classes is not None:
            from coreg_ray.data.tables import classes_differ
            # class names are always compared; a table without classes.json is numbered 0..C-1
            mine = self.classes or [str(i) for i in range(len(classes))]
            if classes_differ(classes, mine):
                return None
        return self.labels

    # ------------------------------------------------------------------ reading
    def select(self, keep=None, skip=None) -> np.ndarray:
        """Row positions still to read: ids in `keep` (all when None) and not in `skip`."""
        sel = np.ones(len(self.ids), bool)
        if keep is not None:
            sel &= np.isin(self.ids, keep)
        if skip is not None and len(skip):
            sel &= ~np.isin(self.ids, skip)
        return np.flatnonzero(sel)

    def iter_raw(self, batch_size: int, keep=None, skip=None):
        """{"id", "image": encoded bytes} batches in pool order, without Ray; only the rows in
        `keep` / not in `skip` (files that are not needed are not read)."""
        if self.kind == "parquet":
            for p in self.paths:
                pf = open_image_parquet(self.fs, p, self.spec)[0]
                for rb in pf.iter_batches(batch_size=batch_size, columns=["id", "image"]):
                    yield {"id": as_ids(rb.column(0), self.spec),
                           "image": np.asarray(rb.column(1).to_pylist(), dtype=object)}
            return
        rows = self.select(keep, skip)
        for a in range(0, len(rows), batch_size):
            idx = rows[a:a + batch_size]
            if self.kind == "files":
                blobs = [_read_or_error(self.fs, self.paths[i]) for i in idx]
            else:
                blobs = [_png(self.table.images[i]) for i in idx]
            img = np.empty(len(blobs), dtype=object)
            img[:] = blobs
            yield {"id": self.ids[idx], "image": img}

    def ray_dataset(self, ray, num_cpus, concurrency=None, keep=None, skip=None):
        """A Ray Data dataset of {"id", "image"} rows (Ray's own readers and filesystems)."""
        conc = {} if concurrency is None else {"concurrency": int(concurrency)}
        if self.kind == "parquet":
            ds = ray.data.read_parquet(list(self.paths), filesystem=self.fs, num_cpus=num_cpus,
                                       **conc)
            return ds.select_columns(["id", "image"])
        rows = self.select(keep, skip)
        if self.kind == "builtin":
            return ray.data.from_items([{"id": self.ids[i].item(), "image": _png(self.table.images[i])}
                                        for i in rows])
        if len(rows) == 0:
            return ray.data.from_items([])
        paths = [self.paths[i] for i in rows]
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=self.fs,
                                        num_cpus=num_cpus, ignore_missing_paths=False, **conc)
        return ds.map_batches(_path_to_id, fn_kwargs={"root": self.root}, batch_format="pyarrow",
                              num_cpus=num_cpus, **({} if concurrency is None else
                                                    {"compute": ray.data.TaskPoolStrategy(
                                                        size=int(concurrency))}))


def _path_to_id(batch, root: str):
    """Ray Data: read_binary_files rows {bytes, path} -> {id (relative path), image}."""
    import pyarrow as pa

    cut = len(root.rstrip("/")) + 1
    ids = [p[cut:] if p.startswith(root) else p for p in batch.column("path").to_pylist()]
    return pa.table({"id": pa.array(ids, pa.string()), "image": batch.column("bytes")})


def _display(pool: Pool, p: str) -> str:
    """A file of the pool as the user named it: s3://BUCKET/KEY, or the local path under the
    spec as given (relative stays relative, so plans and metadata read as they always did)."""
    if is_uri(pool.spec):
        return f"{pool.spec.split('://', 1)[0]}://{p}"
    given = Path(pool.spec)
    if p == filesystem_of(given)[1]:
        return str(given)
    return str(given / posixpath.basename(p))


def _read_or_error(fs, path):
    """The bytes of a file; an unreadable file gives b"" (decoded as an error row)."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception:
        return b""


def _png(img) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def open_pool(spec, what: str = "this command", classes=None, limit: int | None = None) -> Pool:
    """Find a pool's rows and read its index (ids, labels; no image is decoded). `classes`
    (given names) decide a folder's labels (module doc)."""
    if is_builtin(spec):
        from coreg_ray.data.tables import load_image_table
        t = load_image_table(spec, limit=limit)
        return Pool(str(spec), "builtin", ids=t.ids, labels=t.labels, classes=list(t.classes),
                    table=t)
    kind, fs, paths, root, loc = locate(spec, what)
    shown = str(loc) if is_uri(spec) else str(spec)  # a local path as given (messages, reports)
    if kind == "files":
        paths, ids, tops, labels, names, other = list_folder(loc, fs, root, classes, limit)
        return Pool(shown, "files", fs, paths, root, ids, labels, names, other, tops=tops)
    ids, labels, with_labels = [], [], True
    for p in paths:
        pf, cols = open_image_parquet(fs, p, shown)
        want = ["id"] + (["label"] if "label" in cols and with_labels else [])
        tbl = pf.read(columns=want)
        ids.append(as_ids(tbl.column("id"), f"{shown}"))
        if "label" in want and tbl.column("label").null_count == 0:
            labels.append(tbl.column("label").to_numpy().astype(np.int64))
        else:
            with_labels = False
    ids = concat_ids(ids)
    if len(ids) == 0:
        raise CoregError(f"{shown}: no images")
    dup = first_duplicate(ids)
    if dup is not None:
        raise CoregError(f"{shown}: id {id_text(dup)} appears more than once")
    labels = np.concatenate(labels) if with_labels else None
    if limit is not None:
        ids, labels = ids[:limit], (None if labels is None else labels[:limit])
    one_file = paths == [filesystem_of(loc)[1]]
    cls_loc = (loc.parent if one_file else loc) / "classes.json"
    return Pool(shown, "parquet", fs, paths, root, ids, labels, read_classes_at(cls_loc))
