"""An annotation table read by ids, for sharded runs (docs/scale.md): the driver reads only its
id column, each worker only its own rows.

`annotation_ids(path, pool_ids, num_classes)` is the driver's side: the file's schema and
`coreg_ray` metadata block, and its `id` column alone (never the candidate sets, votes or
probabilities), checked against the pool's ids -- one line for annotation ids missing from the
pool or the reverse, duplicates, another class count -- giving an `AnnotationRows`: the file's
location and what was checked (a few hundred bytes, what the workers are sent).

`AnnotationRows.read(ids)` is a worker's side: the rows of `ids` (its rows of the pool), in
their order. Row group by row group it reads the `id` column, and only from the row groups that
hold some of its ids the columns training and the statistics use (id, candidates, votes,
probs), in batches, keeping the matching rows; every kept row's candidate set, votes and
probabilities are checked as `read_annotations` checks them.

`candidate_key(ids, candidates)`: the candidate sets' fingerprint of a sharded run -- a sum
over rows of a 64-bit hash of (id, candidate set), so each rank hashes its own rows and the
sum of the ranks' parts is the table's, for any world size and in any row order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from coreg_ray.data.annotations import (AnnotationTable, check_columns, class_count, read_meta,
                                        table_from_arrow)
from coreg_ray.data.ids import as_ids, first_duplicate, id_text, is_string_ids
from coreg_ray.errors import CoregError

READ = {"rows": 0, "calls": 0}  # annotation rows this process parsed (tests: a worker its own)
BATCH = 65_536  # rows per Arrow batch a worker reads from a row group holding its ids
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _open(path):
    import pyarrow.parquet as pq

    from coreg_ray.data.location import filesystem_of, location, redact

    loc = location(path)
    if not loc.exists():
        raise CoregError(f"annotation table not found: {loc}")
    fs, fpath = filesystem_of(loc)
    try:
        return pq.ParquetFile(fs.open_input_file(fpath)), loc
    except Exception as exc:
        raise CoregError(f"{loc}: not a readable Parquet file ({redact(exc)})")


def isin(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """bool per value: is it one of `wanted` (int64 ids by NumPy, string ids by a set)."""
    if not len(values) or not len(wanted):
        return np.zeros(len(values), bool)
    if is_string_ids(values) or is_string_ids(wanted):
        s = set(np.asarray(wanted).tolist())
        return np.fromiter((v in s for v in values.tolist()), bool, len(values))
    return np.isin(values, wanted)


def check_same_ids(ann_ids: np.ndarray, pool_ids: np.ndarray, source: str) -> None:
    """`AnnotationTable.align_to`'s checks from the two id columns alone (the same lines)."""
    miss = ~isin(pool_ids, ann_ids)
    if miss.any():
        hint = ""
        if len(ann_ids) and is_string_ids(ann_ids) != is_string_ids(pool_ids):
            hint = (f" (the annotations' ids are "
                    f"{'strings' if is_string_ids(ann_ids) else 'integers'}, the images' "
                    f"{'strings' if is_string_ids(pool_ids) else 'integers'}: annotate the same "
                    "source the run reads)")
        first = pool_ids[int(np.flatnonzero(miss)[0])]
        raise CoregError(f"{source}: {int(miss.sum())} image ids have no annotation "
                         f"(first: id {id_text(first)}){hint}")
    if len(ann_ids) != len(pool_ids):
        extra = ann_ids[~isin(ann_ids, pool_ids)]
        raise CoregError(f"{source}: {len(extra)} annotated ids are not in the image table "
                         f"(first: id {id_text(sorted(extra.tolist())[0])})")


@dataclass
class AnnotationRows:
    """An annotation Parquet file checked against a pool by the driver; `read` gives a worker
    its rows. `path` as given (a local path or a bucket URI)."""
    path: str
    num_classes: int
    rows: int
    columns: tuple
    meta: dict = field(default_factory=dict)
    # the annotated ids in the pool's order (the pool's, checked equal as sets): the driver's
    # only; never sent to a worker, which reads the ids of its own rows
    ids: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self):
        return {**self.__dict__, "ids": None}

    def read(self, ids, source: str | None = None) -> AnnotationTable:
        """The rows of `ids`, in the order of `ids` (one line if one is missing: the file
        changed since the driver checked it)."""
        import pyarrow as pa

        ids = as_ids(ids, source or self.path)
        pf, loc = _open(self.path)
        want = [c for c in ("id", "candidates", "votes", "probs") if c in self.columns]
        parts = []
        for g in range(pf.metadata.num_row_groups):
            gid = as_ids(pf.read_row_group(g, columns=["id"]).column("id"), str(loc))
            if not isin(gid, ids).any():
                continue  # none of this worker's ids: its other columns are never read
            for batch in pf.iter_batches(batch_size=BATCH, row_groups=[g], columns=want):
                keep = isin(as_ids(batch.column(0), str(loc)), ids)
                if keep.any():
                    parts.append(batch.filter(pa.array(keep)))
        schema = pf.schema_arrow
        tbl = pa.Table.from_batches(parts, schema=pa.schema([schema.field(c) for c in want]))
        READ["rows"] += tbl.num_rows
        READ["calls"] += 1
        table = table_from_arrow(tbl, dict(self.meta), loc, self.num_classes)
        return table.align_to(ids, source or str(loc))


def annotation_ids(path, pool_ids, num_classes: int, source: str | None = None) -> AnnotationRows:
    """The driver's check of an annotation file against the pool: its id column only."""
    pf, loc = _open(path)
    names = pf.schema_arrow.names
    check_columns(names, loc)
    meta = read_meta(pf.schema_arrow.metadata, loc)
    c = class_count(meta, num_classes, loc)
    ids = as_ids(pf.read(columns=["id"]).column("id"), str(loc))
    dup = first_duplicate(ids)
    if dup is not None:
        raise CoregError(f"{loc}: duplicate ids in the annotation table (first: id {id_text(dup)})")
    pool_ids = as_ids(pool_ids, source or str(loc))
    check_same_ids(ids, pool_ids, source or str(loc))
    return AnnotationRows(str(path), int(c), len(ids), tuple(names), meta, pool_ids)


def pad_votes(ann: AnnotationTable, width: int) -> AnnotationTable:
    """The votes of a shard's rows widened to the table's widest row (as `read_annotations`
    makes them: -1 = no vote), so every rank's votes have the same columns."""
    have = 0 if ann.votes is None else ann.votes.shape[1]
    if width > have:
        votes = np.full((len(ann), width), -1, np.int64)
        if have:
            votes[:, :have] = ann.votes
        ann.votes = votes
    return ann


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def row_hashes(ids, candidates: np.ndarray) -> np.ndarray:
    """uint64 per row: a hash of its id and its candidate set."""
    ids = np.asarray(ids)
    if is_string_ids(ids):
        h = np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"),
                                                         digest_size=8).digest(), "little")
                         for i in ids.tolist()), np.uint64, len(ids))
    else:
        h = _mix(ids.astype(np.int64).view(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
    packed = np.packbits(np.asarray(candidates, bool), axis=1)
    for j in range(packed.shape[1]):
        h = _mix(h ^ (packed[:, j].astype(np.uint64) | np.uint64((j + 1) << 8)))
    return h


def key_parts(ids, candidates: np.ndarray) -> np.ndarray:
    """int64 [2]: the low and high 32 bits of the rows' hashes, each summed (a rank's part;
    sums of parts never overflow int64 below 2^31 rows)."""
    h = row_hashes(ids, candidates)
    return np.array([int((h & np.uint64(0xFFFFFFFF)).sum(dtype=np.uint64)),
                     int((h >> np.uint64(32)).sum(dtype=np.uint64))], np.int64)


def key_text(parts) -> str:
    """The fingerprint text of summed `key_parts` (every rank's, or the whole table's)."""
    lo, hi = (int(x) for x in parts)
    return f"{(lo + (hi << 32)) & int(_MASK):016x}"


def candidate_key(ids, candidates: np.ndarray) -> str:
    return key_text(key_parts(ids, candidates))
