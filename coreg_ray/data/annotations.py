"""Annotation tables: candidate label sets per image, read/written as Parquet keyed by `id`.

Columns: `id` (int64 or string: ids as the images' source gives them, `coreg_ray.data.ids`), `candidates` (list<int>), `votes` (list<int>, one per template, -1 = no
vote), optional `probs` (list<float>, mean template probabilities). The file metadata key
`coreg_ray` holds JSON: `{"num_classes", "classes", "annotator", ...}`.
In memory the candidates are a dense bool [N, C] matrix (what training uses).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coreg_ray.data.ids import arrow_ids, as_ids, first_duplicate, id_text, is_string_ids
from coreg_ray.errors import CoregError
from coreg_ray.outputs import atomic_path, check_output_file

META_KEY = b"coreg_ray"


@dataclass
class AnnotationTable:
    ids: np.ndarray  # [N] int64 or object-of-str (coreg_ray.data.ids)
    candidates: np.ndarray  # bool [N, C]
    votes: np.ndarray | None = None  # int64 [N, K], -1 = no vote
    probs: np.ndarray | None = None  # float32 [N, C]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids = as_ids(self.ids, "annotations")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return int(self.candidates.shape[1])

    def subset(self, index) -> "AnnotationTable":
        index = np.asarray(index)
        return AnnotationTable(self.ids[index], self.candidates[index],
                               None if self.votes is None else self.votes[index],
                               None if self.probs is None else self.probs[index], dict(self.meta))

    def align_to(self, ids: np.ndarray, source: str = "annotations") -> "AnnotationTable":
        """Reorder rows to `ids` (an image table's order); fail if the id sets differ."""
        ids = as_ids(ids, source)
        pos = {i: k for k, i in enumerate(self.ids.tolist())}
        want = ids.tolist()
        missing = [i for i in want if i not in pos]
        if missing:
            hint = ""
            if len(self.ids) and is_string_ids(self.ids) != is_string_ids(ids):
                hint = (f" (the annotations' ids are {'strings' if is_string_ids(self.ids) else 'integers'}"
                        f", the images' {'strings' if is_string_ids(ids) else 'integers'}: annotate "
                        "the same source the run reads)")
            raise CoregError(f"{source}: {len(missing)} image ids have no annotation "
                             f"(first: id {id_text(missing[0])}){hint}")
        if len(self.ids) != len(ids):
            extra = sorted(set(pos) - set(want))
            raise CoregError(f"{source}: {len(extra)} annotated ids are not in the image table "
                             f"(first: id {id_text(extra[0])})")
        return self.subset(np.fromiter((pos[i] for i in want), np.int64, len(want)))


def candidate_matrix(sets, num_classes: int, ids=None, source="candidates") -> np.ndarray:
    """Lists of class indices -> bool [N, C]; out-of-range or empty sets fail naming the row."""
    out = np.zeros((len(sets), num_classes), dtype=bool)
    for r, s in enumerate(sets):
        rid = ids[r] if ids is not None else r
        if s is None or len(s) == 0:
            raise CoregError(f"{source}: row id {rid} has an empty candidate set")
        arr = np.asarray(s, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= num_classes:
            raise CoregError(f"{source}: row id {rid} has candidate {int(arr.max() if arr.max() >= num_classes else arr.min())} "
                             f"outside 0..{num_classes - 1}")
        out[r, arr] = True
    return out


def check_candidates(candidates: np.ndarray, ids, source="candidates") -> None:
    empty = np.flatnonzero(~candidates.any(1))
    if len(empty):
        raise CoregError(f"{source}: row id {ids[empty[0]]} has an empty candidate set "
                         f"({len(empty)} rows in all)")


def write_annotations(table: AnnotationTable, path: str | Path) -> None:
    """Write atomically (temp file + rename): a crash never leaves a half-written table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_candidates(table.candidates, table.ids, str(path))
    path = check_output_file(path, "annotation table", uri_ok=True)
    cand_lists = [np.flatnonzero(r).tolist() for r in table.candidates]
    cols = {
        "id": arrow_ids(table.ids),
        "candidates": pa.array(cand_lists, pa.list_(pa.int32())),
        "votes": pa.array(table.votes.tolist() if table.votes is not None else
                          [[] for _ in range(len(table))], pa.list_(pa.int32())),
    }
    if table.probs is not None:
        cols["probs"] = pa.array(table.probs.astype(np.float32).tolist(), pa.list_(pa.float32()))
    meta = dict(table.meta)
    meta["num_classes"] = table.num_classes
    arrow = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def read_meta(schema_meta, path) -> dict:
    """The `coreg_ray` metadata block of a Parquet file: a JSON object, or {} if absent. A
    corrupt block is one line (it is plain JSON: nothing in it is executed)."""
    raw = (schema_meta or {}).get(META_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CoregError(f"{path}: the coreg_ray metadata block is not valid JSON ({exc}); "
                         "rewrite the table with write_annotations") from None
    if not isinstance(meta, dict):
        raise CoregError(f"{path}: the coreg_ray metadata block must be a JSON object, got "
                         f"{type(meta).__name__}")
    return meta


def read_annotations(path: str | Path, num_classes: int | None = None) -> AnnotationTable:
    import pyarrow.parquet as pq

    from coreg_ray.data.location import filesystem_of, location, redact

    path = location(path)
    if not path.exists():
        raise CoregError(f"annotation table not found: {path}")
    fs, fpath = filesystem_of(path)
    try:
        tbl = pq.read_table(fpath, filesystem=fs)
    except Exception as exc:
        raise CoregError(f"{path}: not a readable Parquet file ({redact(exc)})")
    check_columns(tbl.column_names, path)
    meta = read_meta(tbl.schema.metadata, path)
    return table_from_arrow(tbl, meta, path, class_count(meta, num_classes, path))


def check_columns(names, path) -> None:
    for need in ("id", "candidates"):
        if need not in names:
            raise CoregError(f"{path}: missing column '{need}' (has: {', '.join(names)})")


def class_count(meta: dict, num_classes: int | None, path) -> int | None:
    """The number of classes: the images' (checked against the file's metadata block), else
    the file's, else None (then found from the candidate sets)."""
    file_c = meta.get("num_classes")
    if file_c is not None and (isinstance(file_c, bool) or not isinstance(file_c, int) or file_c < 1):
        raise CoregError(f"{path}: the coreg_ray metadata block says num_classes={file_c!r} "
                         "(want a positive integer)")
    if num_classes is not None and file_c is not None and int(file_c) != num_classes:
        raise CoregError(f"{path}: annotated for {file_c} classes but the images have {num_classes}")
    return num_classes or file_c


def table_from_arrow(tbl, meta: dict, path, c: int | None) -> AnnotationTable:
    """An `AnnotationTable` from the Arrow rows of an annotation file (all of them, or the rows
    a worker read, `coreg_ray.data.annotation_rows`): every row's sets checked, naming its id."""
    ids = as_ids(tbl.column("id"), str(path))
    dup = first_duplicate(ids)
    if dup is not None:
        raise CoregError(f"{path}: duplicate ids in the annotation table (first: id {id_text(dup)})")
    sets = tbl.column("candidates").to_pylist()
    if c is None:
        c = 1 + max((max(s) for s in sets if s), default=0)
    cand = candidate_matrix(sets, int(c), ids, str(path))
    votes = None
    if "votes" in tbl.column_names:
        vl = tbl.column("votes").to_pylist()
        k = max((len(v) for v in vl if v is not None), default=0)
        if k:
            votes = np.full((len(vl), k), -1, np.int64)
            for r, v in enumerate(vl):
                if v:
                    votes[r, : len(v)] = v
            if votes.max() >= c or votes.min() < -1:
                r = int(np.flatnonzero((votes >= c).any(1) | (votes < -1).any(1))[0])
                raise CoregError(f"{path}: row id {ids[r]} has a vote outside -1..{c - 1}")
    probs = None
    if "probs" in tbl.column_names:
        pl = tbl.column("probs").to_pylist()
        if any(p is None or len(p) != c for p in pl):
            r = next(i for i, p in enumerate(pl) if p is None or len(p) != c)
            raise CoregError(f"{path}: row id {ids[r]} has probs of length "
                             f"{0 if pl[r] is None else len(pl[r])}, expected {c}")
        probs = np.asarray(pl, np.float32).reshape(len(pl), int(c))
    return AnnotationTable(ids, cand, votes, probs, meta)


# ----------------------------------------------------------------------------- statistics
def ensemble_prediction(ann: AnnotationTable) -> np.ndarray:
    """Single label per sample: argmax of the mean template probabilities where known (the
    paper's template ensemble), else the majority vote (ties -> lowest class, restricted to the
    candidates), else the first candidate."""
    if ann.probs is not None:
        return ann.probs.argmax(1)
    if ann.votes is not None:
        return majority_vote(ann.votes, ann.num_classes, ann.candidates)
    return ann.candidates.argmax(1)


def majority_vote(votes: np.ndarray, num_classes: int, candidates=None) -> np.ndarray:
    counts = np.zeros((len(votes), num_classes), np.int64)
    rows = np.repeat(np.arange(len(votes)), votes.shape[1])
    flat = votes.reshape(-1)
    ok = flat >= 0
    np.add.at(counts, (rows[ok], flat[ok]), 1)
    if candidates is not None:
        counts = np.where(candidates, counts, -1)
    return counts.argmax(1)


def annotation_stats(ann: AnnotationTable, labels: np.ndarray | None = None) -> dict:
    """Average set size ("Avg. num"), and with ground truth: partial accuracy (truth in the
    set), ensemble accuracy, per-template accuracy."""
    sizes = ann.candidates.sum(1)
    out = {"images": int(len(ann)), "avg_candidates": float(sizes.mean()) if len(ann) else None,
           "set_size_histogram": {int(k): int(v) for k, v in
                                  zip(*np.unique(sizes, return_counts=True))}}
    if len(ann) == 0:  # no rows: nothing to average (None, i.e. JSON null, never NaN)
        if labels is not None:
            out.update(partial_accuracy=None, ensemble_accuracy=None)
        return out
    if labels is not None:
        labels = np.asarray(labels)
        out["partial_accuracy"] = float(ann.candidates[np.arange(len(labels)), labels].mean())
        out["ensemble_accuracy"] = float((ensemble_prediction(ann) == labels).mean())
        if ann.votes is not None:
            out["vote_accuracy"] = float(
                (majority_vote(ann.votes, ann.num_classes) == labels).mean())
            out["template_accuracy"] = [float((ann.votes[:, k] == labels).mean())
                                        for k in range(ann.votes.shape[1])]
    return out


def merge_annotations(tables: list[AnnotationTable], min_votes: int | None = None) -> AnnotationTable:
    """Merge several annotators' tables on `id`: union of candidates (default), or the classes
    named by at least `min_votes` votes across all templates (falling back to the union where
    none reaches it, so no set is empty)."""
    if not tables:
        raise CoregError("merge: no annotation tables")
    base = tables[0]
    aligned = [base] + [t.align_to(base.ids, f"merge table {i + 1}") for i, t in enumerate(tables[1:])]
    c = {t.num_classes for t in aligned}
    if len(c) != 1:
        raise CoregError(f"merge: tables disagree on the number of classes: {sorted(c)}")
    union = np.logical_or.reduce([t.candidates for t in aligned])
    votes = None
    if all(t.votes is not None for t in aligned):
        votes = np.concatenate([t.votes for t in aligned], 1)
    cand = union
    if min_votes is not None:
        if votes is None:
            raise CoregError("merge: min_votes needs votes in every table")
        counts = np.zeros_like(union, np.int64)
        for k in range(votes.shape[1]):
            ok = votes[:, k] >= 0
            counts[np.flatnonzero(ok), votes[ok, k]] += 1
        cand = counts >= min_votes
        empty = ~cand.any(1)
        cand[empty] = union[empty]
    probs = None
    if all(t.probs is not None for t in aligned):
        probs = np.mean([t.probs for t in aligned], 0).astype(np.float32)
    meta = {"annotator": [t.meta.get("annotator") for t in aligned],
            "merge": "union" if min_votes is None else f"min_votes={min_votes}"}
    if "classes" in base.meta:
        meta["classes"] = base.meta["classes"]
    return AnnotationTable(base.ids.copy(), cand, votes, probs, meta)
