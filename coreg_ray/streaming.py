"""Batch inference over image pools (`coreg_ray.data.sources`), shard by shard: what `annotate`
(`coreg_ray.annotate.pipeline`) and `predict` (`coreg_ray.predict`) have in common.

    pool = open_input("pool/")                    # Parquet, a folder of images, s3://, digits
    ids, labels = pool.ids, pool.labels           # every id once, in pool order
    plan = ShardPlan(ids, shard_size=4096)        # rows cut into fixed-size shards
    sink = ShardCollector(plan, pending, columns, write_shard, source="pool/")
    for batch in ray_stream(pool, skip, prep, ActorClass, kwargs, batch_size, res):
        sink.add(batch)                           # a shard is written the moment it is complete
    sink.finish()

The stream is Ray Data: ``read_parquet`` / ``read_binary_files`` (the pool's own reader) -> decode + resize on CPU tasks (NumPy + Pillow, no
torch) -> a callable class on an actor pool (one model per actor) -> the driver. Blocks are
kept to about one batch, so the first results reach the driver after one batch per actor, not
after the first ~128 MiB of decoded pixels. `local_stream` runs the same steps in this process.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from coreg_ray.data.ids import as_ids, concat_ids, id_text, is_string_ids, same_kind
from coreg_ray.data.location import filesystem_of, has_files
from coreg_ray.errors import CoregError, require


# ----------------------------------------------------------------------------- input
def open_input(images_path, what: str = "annotate", classes=None):
    """The pool to stream (`coreg_ray.data.sources.open_pool`): a Parquet table or folder of
    them, a folder of image files, a built-in source, or a URI of one of these."""
    from coreg_ray.data.sources import open_pool
    return open_pool(images_path, what, classes)


# ----------------------------------------------------------------------------- plan / shards
class ShardPlan:
    """Rows in file order cut into fixed-size shards; id -> position / shard lookups."""

    def __init__(self, ids: np.ndarray, shard_size: int):
        if shard_size < 1:
            raise CoregError(f"shard_size must be >= 1, got {shard_size}")
        self.ids = ids = as_ids(ids, "ids")
        self.shard_size = int(shard_size)
        self.num_shards = math.ceil(len(ids) / self.shard_size)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def _like(self, ids) -> np.ndarray:
        ids = as_ids(ids, "ids")
        if len(ids) and not same_kind(ids, self.ids):
            raise CoregError(f"id {id_text(ids[0])} is not in the input (the input's ids are "
                             f"{'strings' if is_string_ids(self.ids) else 'integers'})")
        return ids

    def position(self, ids) -> np.ndarray:
        ids = self._like(ids)
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        i = np.searchsorted(self._sorted, ids)
        i = np.clip(i, 0, len(self._sorted) - 1)
        miss = self._sorted[i] != ids
        if miss.any():
            raise CoregError(f"id {id_text(ids[miss][0])} is not in the input")
        return self._order[i]

    def shard_of(self, ids) -> np.ndarray:
        return self.position(ids) // self.shard_size

    def shard_ids(self, k: int) -> np.ndarray:
        return self.ids[k * self.shard_size:(k + 1) * self.shard_size]

    def covers(self, ids) -> bool:
        """Whether `ids` hold every id of the plan exactly once."""
        ids = as_ids(ids, "ids")
        if len(ids) != len(self.ids) or not same_kind(ids, self.ids):
            return len(ids) == len(self.ids) == 0
        return bool(np.array_equal(np.sort(ids), self._sorted))

    def skip_ids(self, pending) -> np.ndarray | None:
        """The ids of the shards not in `pending` (already finished), or None."""
        pend = set(pending)
        if len(pend) == self.num_shards:
            return None
        return concat_ids([self.shard_ids(s) for s in range(self.num_shards) if s not in pend],
                          self.ids)


def fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def has_shards(parts_root) -> bool:
    """Whether any finished shard is in the parts folder (or below it; a local folder or a
    bucket prefix)."""
    return has_files(parts_root, "shard-", ".parquet")


def shard_path(parts, k: int):
    return parts / f"shard-{k:05d}.parquet"


def shard_plan_tag(path: Path) -> str | None:
    """The plan fingerprint stored in a shard's `coreg_ray` metadata (None if unreadable)."""
    import pyarrow.parquet as pq

    from coreg_ray.data.annotations import META_KEY
    try:
        fs, p = filesystem_of(path)
        meta = pq.read_schema(p, filesystem=fs).metadata or {}
        return json.loads(meta.get(META_KEY, b"{}")).get("plan")
    except Exception:
        return None


def pending_shards(parts: Path, plan: ShardPlan, tag: str) -> list[int]:
    """The shards not yet written with this plan's settings (`tag`)."""
    return [s for s in range(plan.num_shards) if shard_plan_tag(shard_path(parts, s)) != tag]


class ShardCollector:
    """Collects result rows per shard on the driver; calls ``write_shard(k, columns)`` (rows in
    input order) the moment shard k is complete. Rows carry an ``error`` column: with
    ``on_bad_image="fail"`` the first non-empty one stops the run naming the id."""

    def __init__(self, plan: ShardPlan, pending: list[int], columns,
                 write_shard: Callable[[int, dict], None], on_bad_image: str = "skip",
                 source: str = "images"):
        self.plan, self.columns, self.write_shard = plan, tuple(columns), write_shard
        self.on_bad_image, self.source = on_bad_image, source
        self.expected = {s: len(plan.shard_ids(s)) for s in pending}
        self.buf = {s: [] for s in pending}
        self.count = {s: 0 for s in pending}
        self.written = 0
        self.rows = 0

    def add(self, batch: dict) -> int:
        ids = as_ids(batch["id"], self.source)
        if len(ids) == 0:
            return 0
        errors = np.asarray(batch["error"], dtype=object)
        if self.on_bad_image == "fail" and (errors != "").any():
            i = int(np.flatnonzero(errors != "")[0])
            raise CoregError(f"{self.source}: image of row id {id_text(ids[i])} cannot be decoded "
                             f"({errors[i]}); without --fail-on-bad-image (on_bad_image='skip') "
                             "unreadable images are skipped and reported")
        shards = self.plan.shard_of(ids)
        for s in np.unique(shards):
            s = int(s)
            sel = shards == s
            if s not in self.buf:
                raise CoregError(f"internal: rows of shard {s} arrived twice or after it was written")
            self.buf[s].append({col: np.asarray(batch[col])[sel] for col in self.columns})
            self.count[s] += int(sel.sum())
            if self.count[s] > self.expected[s]:
                raise CoregError(f"internal: shard {s} got {self.count[s]} rows, expected "
                                 f"{self.expected[s]}")
            if self.count[s] == self.expected[s]:
                self._flush(s)
        self.rows += len(ids)
        return len(ids)

    def _flush(self, s: int) -> None:
        parts = self.buf.pop(s)
        cols = {col: np.concatenate([p[col] for p in parts]) for col in self.columns}
        order = np.argsort(self.plan.position(cols["id"]))
        self.write_shard(s, {col: v[order] for col, v in cols.items()})
        self.written += 1

    def finish(self) -> None:
        if self.buf:
            missing = {s: self.expected[s] - self.count[s] for s in self.buf}
            first = next(iter(missing))
            raise CoregError(f"{len(missing)} shards did not receive all their rows (shard {first} "
                             f"is missing {missing[first]}); re-run to resume")


# ----------------------------------------------------------------------------- engines
def actor_resources(ray, num_actors, actor_cpus, use_gpu):
    """The actor pool on this cluster: one actor per GPU (1 GPU each); on CPU one actor per core
    (at most 8) with the cores shared out as torch threads.

    On CPU, Ray's accounting leaves one CPU to the read/decode tasks (else they starve), but the
    actors' torch threads use all the node's cores (`threads`): decoding is a small share of the
    work and runs between the model's batches, so holding a core back for it would halve the
    model. Single-threaded actors side by side beat one actor with all threads (measured on 2
    cores: ViT-B-32 25.6 vs 21.3 images/s, PreAct ResNet-18 83 vs 70; benchmarks/predict.md).
    """
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    gpu = gpus >= 1 if use_gpu is None else bool(use_gpu)
    if gpu and gpus < 1:
        raise CoregError("use_gpu=True but the Ray cluster has no GPU")
    n = int(num_actors) if num_actors else max(1, int(gpus) if gpu else min(8, int(cpus)))
    if n < 1:
        raise CoregError(f"num_actors must be >= 1, got {num_actors}")
    if gpu and n > gpus:
        raise CoregError(f"{n} GPU actors asked for but the cluster has {gpus:g} GPUs")
    free = max(0.0, cpus - 1.0)
    given = actor_cpus is not None
    if actor_cpus is None:
        actor_cpus = min(1.0, max(0.25, free / n)) if gpu else max(0.25, free / n)
    actor_cpus = float(actor_cpus)
    decode_cpus = 0.5 if actor_cpus != 0.5 else 0.25  # differing args: Ray keeps decode separate
    threads = max(1, int(actor_cpus)) if gpu or given else max(1, int(cpus // n))
    # On CPU the model is the bottleneck (one read+decode task does ~400 images/s): as many
    # concurrent decode tasks as the cores left over, else Ray starts extra worker processes
    # whose imports compete with the actors' start-up. GPU actors can use more; left to Ray.
    decode_tasks = None if gpu else max(1, int(free))
    return {"gpu": gpu, "num_actors": n, "actor_cpus": actor_cpus, "decode_cpus": decode_cpus,
            "decode_tasks": decode_tasks, "threads": threads, "cluster_cpus": cpus,
            "cluster_gpus": gpus}


def coreg_cause(exc: BaseException) -> CoregError | None:
    """The CoregError inside a Ray error (raised in an actor or task), if there is one."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, CoregError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    marker = "coreg_ray.errors.CoregError: "  # e.g. ActorDiedError carries only the text
    for line in reversed(str(exc).splitlines()):
        if marker in line:
            return CoregError(line.split(marker, 1)[1].strip())
    return None


def ray_stream(pool, skip, prep, actor_cls, actor_kwargs, batch_size, res, keep=None):
    """Ray Data: read -> decode (CPU tasks) -> `actor_cls(**actor_kwargs, num_threads=...)` on an
    actor pool -> NumPy batches on the driver, in the order they finish. Rows whose id is in
    `skip` (or, with `keep`, not in it) are dropped before decoding."""
    from coreg_ray.annotate.imageio import decode_udf

    ray = require("ray", "ray")
    import ray.data  # noqa: F401

    ctx = ray.data.DataContext.get_current()
    saved = {a: getattr(ctx, a) for a in ("use_datasource_v2", "enable_progress_bars",
                                          "target_max_block_size") if hasattr(ctx, a)}
    # Ray 2.60's Parquet datasource V2 starts 32 footer-reader actors per read (seconds of
    # start-up on a small node); the V1 reader is enough for image tables.
    if "use_datasource_v2" in saved:
        ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False  # the caller shows one bar over images instead
    if "target_max_block_size" in saved:
        # Blocks of at most one batch of decoded pixels (a block is cut once it is *over* the
        # target, hence half a batch): the default (128 MiB, ~900 images at 224 px) made the
        # actor return its first rows only after hundreds of images.
        size = int(prep.get("size") or 224)
        ctx.target_max_block_size = max(1024, int(batch_size) * size * size * 3 // 2)
    try:
        tasks = res.get("decode_tasks")
        compute = {} if tasks is None else {"compute": ray.data.TaskPoolStrategy(size=int(tasks))}
        ds = pool.ray_dataset(ray, res["decode_cpus"], tasks, keep=keep, skip=skip)
        ds = ds.map_batches(decode_udf, fn_kwargs={"prep": prep, "skip": skip, "keep": keep},
                            batch_size=batch_size, batch_format="numpy",
                            num_cpus=res["decode_cpus"], **compute)
        remote = {"num_cpus": res["actor_cpus"]}
        if res["gpu"]:
            remote["num_gpus"] = res.get("num_gpus", 1)
        ds = ds.map_batches(actor_cls, compute=ray.data.ActorPoolStrategy(size=res["num_actors"]),
                            fn_constructor_kwargs=dict(actor_kwargs, num_threads=res["threads"]),
                            batch_size=batch_size, batch_format="numpy", **remote)
        # prefetch_batches=0: with the default (1) the iterator holds each block until the next
        # one is ready, so every result reached the driver one batch late (4-5 s per batch of
        # 256 on 2 CPU cores); the driver's work per block is small, nothing is lost.
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    finally:
        for a, v in saved.items():
            setattr(ctx, a, v)


def local_stream(pool, skip, prep, actor_cls, actor_kwargs, batch_size, keep=None):
    """The same steps in this process, without Ray (stops reading once every id in `keep` was
    seen)."""
    from coreg_ray.annotate.imageio import decode_udf

    model = actor_cls(**actor_kwargs)
    left = None if keep is None else len(keep)
    for batch in pool.iter_raw(batch_size, keep=keep, skip=skip):
        dec = decode_udf(batch, prep, skip, keep)
        if len(dec["id"]):
            yield model(dec)
            if left is not None:
                left -= len(dec["id"])
        if left is not None and left <= 0:
            return


def consume(batches, sink: ShardCollector, bar=None, timing: dict | None = None,
            pending: int | None = None) -> None:
    """Feed `batches` into `sink` (updating a tqdm `bar`; `timing` gets first_result_s/rows from
    its `t0` and the number of `batches` that reached the driver); a CoregError raised inside Ray
    comes out as itself, one line."""
    import time

    timing = {} if timing is None else timing
    t0 = timing.setdefault("t0", time.time())
    try:
        for batch in batches:
            n = sink.add(batch)
            timing["batches"] = timing.get("batches", 0) + 1
            if "first_result_s" not in timing and n:
                timing["first_result_s"] = time.time() - t0
                timing["first_result_rows"] = n
            if bar is not None:
                bar.update(n)
                if pending is not None:
                    bar.set_postfix(shards=f"{sink.written}/{pending}")
    except CoregError:
        raise
    except Exception as exc:
        cause = coreg_cause(exc)
        if cause is not None:
            raise CoregError(str(cause.args[0]) if cause.args else str(cause)) from None
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if bar is not None:
            bar.close()
    sink.finish()
