"""Ids: a string or an integer, kept exactly as the source gives it.

In memory an id array is either ``int64`` or NumPy ``object`` of Python ``str`` (never a mix);
on disk (Parquet) an ``int64`` or a ``string`` column. Every reader, writer and join of ids goes
through these functions, so the conversion is written once:

    ids = as_ids(table.column("id"), "pool/train.parquet")   # Arrow or NumPy -> int64 / str
    pa_ids = arrow_ids(ids)                                   # -> pa.int64() / pa.string()
    ids_digest(ids)                                           # what fingerprints compare

Integer columns of any width (and unsigned ones that fit) become int64; string / large_string
/ dictionary-of-string become str. Floats, bytes, booleans, dates or nulls are one `CoregError`
line naming the source and the first bad value: a float id is never silently cut to an integer.
"""
from __future__ import annotations

import hashlib

import numpy as np

from coreg_ray.errors import CoregError

_HOW = "ids must be integers or strings"


def _arrow_ids(col, source: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise CoregError(f"{source}: column 'id' has {col.null_count} empty values")
    t = col.type
    if pa.types.is_integer(t):
        if pa.types.is_unsigned_integer(t) and len(col) and \
                pc.max(col).as_py() > np.iinfo(np.int64).max:
            raise CoregError(f"{source}: id {pc.max(col).as_py()} does not fit in int64")
        return col.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or \
            (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)):
        out = np.empty(len(col), dtype=object)
        out[:] = col.to_pylist()
        return out
    first = col[0].as_py() if len(col) else None
    raise CoregError(f"{source}: id column of type {t} ({_HOW}; first value: {first!r})")


def as_ids(values, source: str = "ids") -> np.ndarray:
    """An id column (pyarrow Array / ChunkedArray, NumPy array or list) -> int64 or object-of-str
    NumPy array; anything else is one line naming `source` and the first bad value."""
    try:
        import pyarrow as pa
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return _arrow_ids(values, source)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and len(arr) and arr.max() > np.iinfo(np.int64).max:
            raise CoregError(f"{source}: id {arr.max()} does not fit in int64")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U":
        out = np.empty(len(arr), dtype=object)
        out[:] = arr.tolist()
        return out
    if arr.dtype.kind == "O":
        vals = arr.tolist()
        kinds = {type(v) for v in vals}
        if kinds <= {str}:
            return arr
        if all(issubclass(k, (int, np.integer)) and not issubclass(k, (bool, np.bool_))
               for k in kinds):
            return arr.astype(np.int64)
        bad = next((v for v in vals if not isinstance(v, str)), None)
        if str in kinds:
            raise CoregError(f"{source}: ids mix strings and other values (first non-string: "
                             f"{bad!r}); {_HOW}, one kind per table")
        raise CoregError(f"{source}: id {bad!r} ({type(bad).__name__}): {_HOW}")
    first = arr[0].item() if len(arr) else None
    raise CoregError(f"{source}: ids of type {arr.dtype} ({_HOW}; first value: {first!r})")


def arrow_ids(ids):
    """The Arrow column to write: int64 for integer ids, string for string ids."""
    import pyarrow as pa

    ids = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if ids.dtype == object or ids.dtype.kind == "U":
        return pa.array([str(i) for i in ids.tolist()], pa.string())
    return pa.array(ids.astype(np.int64, copy=False), pa.int64())


def is_string_ids(ids) -> bool:
    return np.asarray(ids).dtype.kind in "OU"


def ids_digest(ids) -> str:
    """sha1 of the ids in order. int64 ids hash their bytes (as this project always did, so
    existing plans and checkpoints stay valid); string ids hash their UTF-8 text, each followed
    by a NUL byte (unambiguous: a name holds no NUL)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "OU":
        h = hashlib.sha1()
        for i in ids.tolist():
            h.update(str(i).encode("utf-8") + b"\0")
        return h.hexdigest()
    return hashlib.sha1(np.ascontiguousarray(ids.astype(np.int64, copy=False)).tobytes()).hexdigest()


def json_id(i):
    """An id as JSON wants it (int or str), for reports and metadata."""
    if isinstance(i, (np.integer, int)) and not isinstance(i, bool):
        return int(i)
    return str(i)


def json_ids(ids) -> list:
    return [json_id(i) for i in np.asarray(ids).tolist()]


def empty_ids(like=None) -> np.ndarray:
    """An empty id array of the same kind as `like` (int64 when None)."""
    if like is not None and is_string_ids(like):
        return np.empty(0, dtype=object)
    return np.zeros(0, np.int64)


def concat_ids(parts, like=None) -> np.ndarray:
    """Concatenate id arrays keeping their kind (object stays object; a mix is refused)."""
    parts = [np.asarray(p) for p in parts if len(p)]
    if not parts:
        return empty_ids(like)
    kinds = {is_string_ids(p) for p in parts}
    if len(kinds) > 1:
        raise CoregError("ids mix strings and integers across files; one kind per pool")
    if kinds == {True}:
        out = np.empty(sum(len(p) for p in parts), dtype=object)
        out[:] = [x for p in parts for x in p.tolist()]
        return out
    return np.concatenate([p.astype(np.int64, copy=False) for p in parts])


def same_kind(a, b) -> bool:
    return is_string_ids(a) == is_string_ids(b)


def first_duplicate(ids):
    seen = set()
    for i in np.asarray(ids).tolist():
        if i in seen:
            return i
        seen.add(i)
    return None


def ids_from_list(values, like=None) -> np.ndarray:
    """A Python list of ids (e.g. from JSON metadata) -> an id array; empty -> `like`'s kind."""
    values = list(values)
    if not values:
        return empty_ids(like)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return as_ids(arr, "ids")


def id_text(i) -> str:
    """An id in a message: 42, or 'cat/a.jpg' (quoted, so spaces and odd names show)."""
    return repr(json_id(i))
