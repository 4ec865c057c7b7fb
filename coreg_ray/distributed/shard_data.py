"""A Ray Train worker's annotation rows, and what the ranks work out together from them.

The driver checks an annotation file by its id column only (`coreg_ray.data.annotation_rows`);
every worker reads its own rows of it (`AnnotationRows.read`, by the ids of its rows of the
pool), or, for a table handed over in memory, takes its rows from the object store's copy.
Then, over the process group Ray Train set up (every rank, in the same order):

- the ranks agree on errors: a rank whose rows are bad (an empty candidate set, a class out of
  range) has every rank stop with its line (`AgreedError`: no retry; the driver raises it),
  as does a restored checkpoint made on other data (other candidate sets: `candidate_key`);
- votes are widened to the widest row of any rank (`read_annotations` widens to the table's);
- the annotation statistics of metrics.json (`annotation_stats`: set sizes, partial,
  ensemble, vote and per-template accuracy) are integer counts summed over the ranks, so they
  equal those of the whole table to the bit;
- the candidate sets' fingerprint (`candidate_key`) is the sum of the ranks' parts: the same
  for any world size, compared when a checkpoint is restored.
"""
from __future__ import annotations

import numpy as np

from coreg_ray.errors import CoregError


def _device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum(values, op="sum") -> np.ndarray:
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(np.asarray(values, np.int64)).to(_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().numpy()


class AgreedError(CoregError):
    """An error every rank raises alike (`agree`): the workers stop together, without the
    retries Ray Train gives a failed worker group (the same inputs would fail again), and the
    driver raises it as its one line (`error_box`)."""


def agree(error: str | None) -> None:
    """Every rank raises the first rank's error, if any rank has one."""
    import torch.distributed as dist

    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise AgreedError(first)


def agree_on(check, *args) -> None:
    """Run `check(*args)` on every rank; if it fails (one line) on any, every rank raises."""
    error = None
    try:
        check(*args)
    except CoregError as exc:
        error = str(exc)
    agree(error)


def error_box():
    """A small actor the workers leave an `AgreedError`'s line in (rank 0, before every rank
    returns) and the driver reads after `fit`."""
    import ray

    @ray.remote(num_cpus=0)
    class ErrorBox:
        def __init__(self):
            self.line = None

        def put(self, line):
            self.line = self.line or line

        def get(self):
            return self.line

    return ErrorBox.remote()


def shard_annotations(ann_src, train, lo: int, hi: int):
    """(this rank's annotation rows aligned to `train` (its rows of the pool), the whole
    table's annotation statistics, the whole table's candidate key)."""
    from coreg_ray.data.annotation_rows import key_parts, key_text, pad_votes

    error, ann = None, None
    try:
        if hasattr(ann_src, "read"):  # AnnotationRows: read from the file, by id
            ann = ann_src.read(train.ids)
        else:  # an AnnotationTable from the object store, aligned by the driver
            ann = ann_src.subset(np.arange(lo, hi))
            if not np.array_equal(ann.ids, train.ids):
                raise CoregError(f"{train.source}: rows [{lo}, {hi}) changed since the driver "
                                 "checked them (their ids are not the annotated ones)")
    except CoregError as exc:
        error = str(exc)
    agree(error)
    width = int(_sum([0 if ann.votes is None else ann.votes.shape[1]], "max")[0])
    ann = pad_votes(ann, width)
    stats = annotation_stats(ann, train.labels)
    return ann, stats, key_text(_sum(key_parts(ann.ids, ann.candidates)))


def annotation_stats(ann, labels) -> dict:
    """`coreg_ray.data.annotation_stats` of the whole table, from every rank's rows: counts
    summed over the ranks, divided once (the same float as over the whole table)."""
    from coreg_ray.data.annotations import ensemble_prediction, majority_vote

    c = ann.num_classes
    sizes = ann.candidates.sum(1)
    k = 0 if ann.votes is None else ann.votes.shape[1]
    counts = [len(ann), int(sizes.sum()), *np.bincount(sizes, minlength=c + 1)[:c + 1].tolist()]
    if labels is not None:
        labels = np.asarray(labels)
        counts += [int(ann.candidates[np.arange(len(labels)), labels].sum()),
                   int((ensemble_prediction(ann) == labels).sum())]
        if k:
            counts += [int((majority_vote(ann.votes, c) == labels).sum())]
            counts += [int((ann.votes[:, j] == labels).sum()) for j in range(k)]
    total = _sum(counts).tolist()
    n, size_sum, hist = total[0], total[1], total[2:c + 3]
    out = {"images": int(n), "avg_candidates": float(size_sum) / n,
           "set_size_histogram": {s: int(v) for s, v in enumerate(hist) if v}}
    if labels is not None:
        rest = total[c + 3:]
        out["partial_accuracy"] = float(rest[0]) / n
        out["ensemble_accuracy"] = float(rest[1]) / n
        if k:
            out["vote_accuracy"] = float(rest[2]) / n
            out["template_accuracy"] = [float(x) / n for x in rest[3:]]
    return out
