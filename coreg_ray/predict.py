"""Batch inference with a trained student: an image pool -> predictions table.

    summary = run_predict("runs/cifar/model.pt", "pool/", "pool-predictions.parquet")

The pool is any form `coreg_ray.data.sources` reads (Parquet, a folder of image files whose ids
are their relative paths, a built-in source, an s3:// / gs:// URI); OUTPUT may be a URI too.
The same stream as annotation (`coreg_ray.streaming`): Ray Data reads the pool, decodes on CPU
tasks and runs `StudentPredictor` on an actor pool (one GPU per actor when the cluster has GPUs;
on CPU one actor per core, at most 8, the cores shared out as torch threads). ``engine="local"``
runs it in this process.

Output columns: ``id``; ``label`` (the predicted class index, -1 where the image could not be
decoded); ``class_name``; ``confidence`` (softmax probability of the label); ``top_k_labels`` /
``top_k_probs`` (the k most probable classes, best first); ``error`` (empty, or why the image
could not be decoded: such rows stay in the table, counted in the summary — an id is never
silently missing). Rows are in the pool's order.

Images are decoded to RGB and, where not already at the model's size, letterboxed to it as
`load_image_table` does, so on a table of the model's size the predictions are those of
``coreg-ray evaluate`` exactly.

Resumable like annotation: finished shards are written to ``OUTPUT.parts/`` at once,
atomically; a re-run (after a kill) computes only the missing ones and then writes OUTPUT with
every id exactly once. Other settings (model file, pool ids, top-k, shard size) are refused
unless ``restart=True``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from coreg_ray.coreg.classifier import pool_prep
from coreg_ray.errors import CoregError
from coreg_ray.data.ids import arrow_ids, as_ids, concat_ids, ids_digest, json_ids
from coreg_ray.data.location import read_table, rmtree
from coreg_ray.streaming import (ShardCollector, ShardPlan, actor_resources, consume,
                                 fingerprint, has_shards, local_stream, open_input,
                                 pending_shards, ray_stream, shard_path)

PLAN_FILE = "plan.json"
COLUMNS = ("id", "label", "confidence", "top_k_labels", "top_k_probs", "error")


# Images per call on CPU. The bare model is faster per image at 64 (PreAct ResNet-18 at 32 px,
# 2 threads: 89 vs 76 images/s at 256), but through Ray Data 64 was slower end to end (10,000
# images, 1 / 2 actors: 57.5 / 73.6 vs 69.4 / 77.6 images/s at 256; benchmarks/predict.md):
# four times the blocks and actor calls. GPUs take 1024.
CPU_BATCH = 256


class StudentPredictor:
    """One per Ray Data actor: a trained student (`model.pt` contents) -> top-k predictions for
    decoded uint8 [B, H, W, 3] batches."""

    def __init__(self, state: dict, top_k: int = 5, device: str | None = None,
                 num_threads: int | None = None, source: str = "model"):
        import torch

        from coreg_ray.coreg.classifier import Classifier

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.clf = Classifier(state, device or "auto", source)
        self.top_k = min(int(top_k), len(self.clf.classes))

    def __call__(self, batch: dict) -> dict:
        import torch

        ids = as_ids(batch["id"], "predict")
        n, k = len(ids), self.top_k
        errors = np.asarray([("" if e is None else str(e)) for e in batch["error"]], dtype=object)
        out = {"id": ids, "label": np.full(n, -1, np.int64), "confidence": np.zeros(n, np.float32),
               "top_k_labels": np.full((n, k), -1, np.int64),
               "top_k_probs": np.zeros((n, k), np.float32), "error": errors}
        ok = np.flatnonzero(errors == "")
        if len(ok):
            pixels = torch.as_tensor(np.ascontiguousarray(np.asarray(batch["pixels"])[ok]))
            p, c = self.clf.top_k(pixels.permute(0, 3, 1, 2), k)
            out["label"][ok] = c[:, 0].numpy()
            out["confidence"][ok] = p[:, 0].numpy()
            out["top_k_labels"][ok] = c.numpy()
            out["top_k_probs"][ok] = p.numpy()
        return out


def _write_shard(parts: Path, meta: dict, classes: list[str]):
    def write(s: int, cols: dict) -> None:
        write_predictions(cols, shard_path(parts, s), classes, dict(meta, shard=s))
    return write


def write_predictions(cols: dict, path: Path, classes: list[str], meta: dict) -> None:
    """One shard of predictions (NumPy columns as `StudentPredictor` returns them)."""
    import pyarrow as pa

    label = np.asarray(cols["label"], np.int64)
    names = np.asarray(classes + [""], dtype=object)[np.where(label < 0, len(classes), label)]
    table = pa.table({
        "id": arrow_ids(cols["id"]),
        "label": pa.array(label, pa.int32()),
        "class_name": pa.array(names.tolist(), pa.string()),
        "confidence": pa.array(np.asarray(cols["confidence"], np.float32)),
        "top_k_labels": pa.array(np.asarray(cols["top_k_labels"]).astype(np.int32).tolist(),
                                 pa.list_(pa.int32())),
        "top_k_probs": pa.array(np.asarray(cols["top_k_probs"], np.float32).tolist(),
                                pa.list_(pa.float32())),
        "error": pa.array([str(e) for e in cols["error"]], pa.string()),
    })
    _write_table(table, path, meta)


def _write_table(table, path: Path, meta: dict) -> None:
    """A Parquet file with our metadata block, atomically (temp file + rename)."""
    import pyarrow.parquet as pq

    from coreg_ray.data.annotations import META_KEY
    from coreg_ray.outputs import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), tmp)


def _read_shards(parts: Path, plan: ShardPlan, source: str):
    import pyarrow as pa

    table = pa.concat_tables([read_table(shard_path(parts, s)) for s in range(plan.num_shards)])
    ids = as_ids(table.column("id"), source)
    if not plan.covers(ids):
        raise CoregError(f"{source}: the shards in {parts} do not cover every id exactly once; "
                         "delete the folder (or pass restart=True) and run again")
    order = np.argsort(plan.position(ids), kind="stable")
    return table.take(pa.array(order)).replace_schema_metadata(None)


def run_predict(model, images, output, *, batch_size: int | None = None,
                num_actors: int | None = None, actor_cpus: float | None = None,
                use_gpu: bool | None = None, top_k: int = 5, limit: int | None = None,
                shard_size: int = 4096, restart: bool = False, engine: str = "ray",
                ray_address: str | None = None, progress: bool = True) -> dict:
    """Predict every image of a Parquet pool with a trained student (module doc). Returns the
    summary (also written to OUTPUT with ``.summary.json`` appended)."""
    t_start = time.time()
    from coreg_ray import safeload
    from coreg_ray.coreg.classifier import check_model_state
    from coreg_ray.outputs import (check_output_dir, check_output_file, write_json_atomic,
                                   write_text_atomic)

    if engine not in ("ray", "local"):
        raise CoregError(f"engine {engine!r}: use 'ray' or 'local'")
    for name, v, lo in (("top_k", top_k, 1), ("limit", limit, 1), ("batch_size", batch_size, 1),
                        ("shard_size", shard_size, 1), ("num_actors", num_actors, 1)):
        if v is not None and (not isinstance(v, int) or v < lo):
            raise CoregError(f"{name} must be an integer >= {lo}, got {v!r}")
    output = check_output_file(output, "--output", " (give the predictions table's file name, "
                               "e.g. DIR/predictions.parquet)", uri_ok=True)
    summary_path = output.with_name(output.name + ".summary.json")
    check_output_file(summary_path, "summary file", uri_ok=True)
    parts = check_output_dir(output.with_name(output.name + ".parts"), "shard folder", uri_ok=True)
    state = safeload.load_state(model, "cpu", "model")  # one line for any unreadable file
    check_model_state(state, str(model))
    classes, size = list(state["classes"]), int(state["image_size"])
    top_k = min(top_k, len(classes))

    pool = open_input(images, "predict", classes)
    ids, labels = pool.ids, pool.labels_for(classes)
    if limit is not None:
        ids, labels = ids[:limit], (None if labels is None else labels[:limit])
    plan = ShardPlan(ids, shard_size)
    model_sha1 = hashlib.sha1(Path(model).read_bytes()).hexdigest()
    settings = {"ids_sha1": ids_digest(ids), "num_rows": int(len(ids)),
                "shard_size": plan.shard_size, "model_sha1": model_sha1, "top_k": top_k}
    tag = fingerprint(settings)
    if restart and parts.exists():
        rmtree(parts)
    plan_file = parts / PLAN_FILE
    if plan_file.exists() and has_shards(parts):
        try:
            old = json.loads(plan_file.read_text())
        except json.JSONDecodeError:
            old = {}
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise CoregError(f"{parts} holds shards made with other settings ({', '.join(diff)});"
                             " use the same settings to resume, or --restart to start over")
    created = not parts.exists()
    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_file, json.dumps(dict(settings, model=str(model),
                                                 files=pool.files), indent=1))

    pending = pending_shards(parts, plan, tag)
    prep = pool_prep(size)  # as load_image_table decodes, so labels are evaluate's
    meta = {"model": str(model), "model_sha1": model_sha1, "classes": classes, "top_k": top_k,
            "plan": tag}
    clock, res, started_ray, ray_mod = {}, None, False, None
    sink = ShardCollector(plan, pending, COLUMNS, _write_shard(parts, meta, classes),
                          source=pool.spec)
    try:
        if pending:
            kwargs = {"state": state, "top_k": top_k, "source": str(model)}
            keep = concat_ids([plan.shard_ids(s) for s in pending], ids) \
                if limit is not None or len(pending) < plan.num_shards else None
            if engine == "ray":
                from coreg_ray.runs import start_ray

                ray_mod, started_ray = start_ray(ray_address, logging_level=None)
                res = actor_resources(ray_mod, num_actors, actor_cpus, use_gpu)
                bs = batch_size or (1024 if res["gpu"] else CPU_BATCH)
                batches = ray_stream(pool, None, prep, StudentPredictor, kwargs, bs, res, keep)
            else:
                bs = batch_size or CPU_BATCH
                batches = local_stream(pool, None, prep, StudentPredictor,
                                       dict(kwargs, num_threads=None), bs, keep)
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=sum(len(plan.shard_ids(s)) for s in pending), unit="img",
                           desc="predict", dynamic_ncols=True)
            clock["t0"] = time.time()
            consume(batches, sink, bar, clock, len(pending))
    except BaseException:
        if not has_shards(parts) and created:  # nothing finished: leave nothing behind
            rmtree(parts)
        raise
    finally:
        if started_ray:
            ray_mod.shutdown()
    compute_s = time.time() - clock["t0"] if "t0" in clock else 0.0

    table = _read_shards(parts, plan, pool.spec)
    _write_table(table, output, {k: v for k, v in meta.items() if k != "plan"} |
                 {"source": pool.spec})
    pred = table.column("label").to_numpy()
    bad = table.column("error").to_numpy(zero_copy_only=False) != ""
    hist = np.bincount(pred[~bad], minlength=len(classes))
    summary = {
        "model": str(model), "images": pool.spec, "output": str(output),
        "rows": int(len(ids)), "predicted": int((~bad).sum()), "errors": int(bad.sum()),
        "error_ids": json_ids(as_ids(table.column("id"), pool.spec)[bad][:20]),
        "class_histogram": {classes[c]: int(hist[c]) for c in range(len(classes))},
        "shards_computed": sink.written, "shards_reused": plan.num_shards - len(pending),
        "images_computed": sink.rows, "batches": clock.get("batches", 0),
        "seconds": round(compute_s, 3),
        "images_per_s": round(sink.rows / compute_s, 2) if compute_s else 0.0,
        "total_seconds": round(time.time() - t_start, 3), "engine": engine, "resources": res,
    }
    if "first_result_s" in clock:
        summary["first_result_s"] = round(clock["first_result_s"], 3)
        if compute_s > clock["first_result_s"]:
            summary["steady_images_per_s"] = round(
                (sink.rows - clock["first_result_rows"]) / (compute_s - clock["first_result_s"]), 2)
    from coreg_ray.data.tables import describe_classes

    if labels is None and pool.labels is not None:  # labelled, but with other classes
        from coreg_ray.errors import note

        pool_classes = pool.classes or [str(i) for i in range(len(classes))]
        summary["accuracy_note"] = (f"no accuracy: the pool's labels are of other classes "
                                    f"({describe_classes(pool_classes)}) than the model's "
                                    f"({describe_classes(classes)})")
        note(summary["accuracy_note"])
    if labels is not None:  # the pool's own labels, for these classes (Pool.labels_for)
        scored = ~bad & (labels < len(classes))
        summary["accuracy"] = float((pred[scored] == labels[scored]).mean()) if scored.any() else None
        summary["accuracy_images"] = int(scored.sum())
    write_json_atomic(summary_path, summary)
    return summary
