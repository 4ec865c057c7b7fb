"""Finding a pool's rows on a filesystem: which files, which ids, which labels (no decoding).

The lower half of `coreg_ray.data.sources` (which documents the forms and the label rule),
shared with the table loader `coreg_ray.data.tables` without an import cycle.
"""
from __future__ import annotations

import json
import posixpath

import numpy as np

from coreg_ray.data.location import filesystem_of, fs_error, location, redact
from coreg_ray.errors import CoregError, note

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMS = ("a .parquet file, a folder with train.parquet or of .parquet files, a folder of image "
         "files, digits[:train|:test], or an s3:// / gs:// URI of one of these")


def _parquet_file(fs, path, spec):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except CoregError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and ("curl" in str(exc).lower() or "AWS" in str(exc)):
            raise fs_error(spec, exc) from None
        raise CoregError(f"{redact(spec)}: {posixpath.basename(path)} is not a readable Parquet "
                         f"file ({redact(exc)})") from None


def open_image_parquet(fs, path, spec):
    """(ParquetFile, column names) of an image table file; one line if it lacks id / image."""
    pf = _parquet_file(fs, path, spec)
    cols = set(pf.schema_arrow.names)
    for need in ("id", "image"):
        if need not in cols:
            raise CoregError(f"{redact(spec)}: missing column '{need}' (has: "
                             f"{', '.join(sorted(cols))})")
    return pf, cols


# ----------------------------------------------------------------------------- finding rows
def folder_labels(tops, classes=None):
    """The label rule (module doc): (labels or None, class names or None)."""
    if not tops or any(t == "" for t in tops):
        return None, None
    names = sorted(set(tops))
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        if not all(n in index for n in names):
            return None, None
        return np.asarray([index[t] for t in tops], np.int64), list(classes)
    index = {c: i for i, c in enumerate(names)}
    return np.asarray([index[t] for t in tops], np.int64), names


def list_image_files(loc, fs, root: str, spec: str):
    """(sorted image paths, their relative ids, number of other files) below a folder."""
    import pyarrow.fs as pafs
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except Exception as exc:
        raise fs_error(spec, exc) from None
    cut = len(root.rstrip("/")) + 1
    found, other = [], []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[cut:]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if posixpath.splitext(rel)[1].lower() in IMAGE_SUFFIXES:
            found.append((rel, info.path))
        elif rel != "classes.json":
            other.append(rel)
    found.sort()
    if other and found:
        note(f"{spec}: {len(other)} files that are not images ignored (e.g. {sorted(other)[0]})")
    return [p for _, p in found], [r for r, _ in found], len(other)


def read_classes_at(loc) -> list[str] | None:
    """classes.json at `loc` (a local path or UriPath), or None."""
    try:
        if not loc.exists():
            return None
        text = loc.read_text()
    except FileNotFoundError:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CoregError(f"{loc}: not valid JSON ({exc})")
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names) or not names:
        raise CoregError(f"{loc}: must be a non-empty JSON list of class names")
    return names


def locate(spec, what: str = "this command"):
    """(kind, fs, paths, root, loc) of a Parquet or folder pool; one line if there is none."""
    import pyarrow.fs as pafs

    loc = location(spec)
    shown = str(loc)
    fs, root = filesystem_of(loc)
    try:
        info = fs.get_file_info(root)
    except CoregError:
        raise
    except Exception as exc:
        raise fs_error(shown, exc) from None
    if info.type == pafs.FileType.NotFound:
        raise CoregError(f"image table not found: {shown} ({what} reads {FORMS})")
    if info.type == pafs.FileType.File:
        if not root.endswith(".parquet"):
            raise CoregError(f"{shown}: {what} reads {FORMS}; a single file must be .parquet")
        return "parquet", fs, [root], posixpath.dirname(root), loc
    train = root.rstrip("/") + "/train.parquet"
    if fs.get_file_info(train).type == pafs.FileType.File:
        return "parquet", fs, [train], root, loc
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    shards = sorted(i.path for i in top if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if shards:
        return "parquet", fs, shards, root, loc
    return "files", fs, None, root, loc


def list_folder(loc, fs, root: str, classes=None, limit: int | None = None):
    """A folder pool's (image paths, ids as object array, top-level folder of each, labels or
    None, class names or None, number of other files); one line if it holds no image."""
    shown = str(loc)
    paths, rel, other = list_image_files(loc, fs, root, shown)
    if not paths:
        exts = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise CoregError(f"{shown}: no images found: no .parquet table and no image files "
                         f"({exts}) in the folder or below it"
                         + (f" ({other} other files)" if other else ""))
    if limit is not None:
        paths, rel = paths[:limit], rel[:limit]
    ids = np.empty(len(rel), dtype=object)
    ids[:] = rel
    tops = [r.split("/", 1)[0] if "/" in r else "" for r in rel]
    given = classes or read_classes_at(loc / "classes.json")
    labels, names = folder_labels(tops, given)
    return paths, ids, tops, labels, (names if labels is not None else given), other
