"""Co-Reg on Ray Train: the same `CoReg` loop inside a `TorchTrainer` (DDP on both networks).

`train_distributed(...)` is `coreg-ray train --workers N [--gpus-per-worker G]`:

- The driver never decodes the pool and never reads the candidate sets: it reads the tables'
  id and label columns (class names; one image header for the working size) through a row
  source (`coreg_ray.data.shards`) and the annotation file's id column
  (`coreg_ray.data.annotation_rows`), and checks them against each other (ids both ways,
  classes, few-shot rows): its memory does not grow with the candidate sets. Rank r of W owns
  rows [r N / W, (r + 1) N / W) of the training table (and of the test table), reads and
  decodes only those, and reads their annotation rows (by id) from the annotation file itself
  (`coreg_ray.distributed.shard_data`: the ranks also sum the annotation statistics and the
  candidate sets' fingerprint). An annotation table handed over in memory is put in the object
  store, aligned, as before.
- Every worker runs Co-Reg (`coreg_ray.methods.run_method`, as every run does) with a
  `TorchDistComm` (gloo on CPU, NCCL on GPU), its `Shard` and its report as the epoch callback.
  The trainer does the distributed parts itself: each rank trains on batches of its own rows
  (`train.batch_size` is the global batch; equal step counts), per-sample state stays with the
  rows' owner, the divide pass gathers only the N scalar losses for the GMM (every rank fits the
  same one), MoCo keys and prototype features are all_gathered, metrics are all_reduced.
- After every `train.checkpoint_every` epochs (and the last) every rank reports into one Ray
  Train checkpoint: rank 0 `checkpoint.pt` (`CoReg.checkpoint_state` without per-sample state),
  `manifest.json` (and `model.pt` at the end), each rank its `shard-RRRRR.pt`
  (`coreg_ray.coreg.persist`). On start, a worker group restores from
  `ray.train.get_checkpoint()` (`CoReg.fit(initial_state=...)`, re-sharded when the world size
  changed): after a worker failure (`FailureConfig(max_failures)`) and when a run with the same
  `storage_path/name` is launched again (Train V2 reloads the run's checkpoint list from
  storage), so a finished or interrupted run resumes instead of restarting; a relaunch on
  another pool is refused by the driver in one line.
- The driver resolves the config (`runs.resolve_config`) and writes OUTPUT/metrics.json, model.pt
  and config.yaml like `coreg_ray.runs.execute` (`runs.finish_run`), from the last checkpoint (so
  workers may live on other nodes: only `storage_path` must be shared).
- MLflow: one run per (storage_path, name), created by the driver and found again on relaunch;
  rank 0 logs per-epoch metrics into it, the driver the final metrics, artifacts and model.pt as
  the run's MLflow model (`runs:/<id>/model`; `register`: a Model Registry version too).

With no cluster, `ray.init()` starts a local Ray; inside `ray job submit` it joins the cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from coreg_ray import safeload
from coreg_ray.distributed.tracking import MLflowClientRun, NoTracker, finite_metrics
from coreg_ray.errors import CoregError
from coreg_ray.outputs import atomic_path, check_output_dir
from coreg_ray.runs import (RunSpec, finish_run, resolve_config, run_metrics, run_title,
                            start_ray)

RUN_TAG = "coreg.ray_run"  # MLflow tag: absolute storage_path/name of the Ray Train run


# ---------------------------------------------------------------------------- fault injection
class FailOnce:
    """Epoch callback that kills this worker process (`os._exit`) on `rank` after `epoch` has
    been reported, once: the marker file makes the restarted attempt pass. For tests and drills.

    The Ray Train controller collects reports when it polls the workers (every 2 s): a process
    that dies right after reporting may lose that last checkpoint, and the group restarts from
    the one before (every epoch is still run, exactly). `delay_s` waits before dying."""

    def __init__(self, epoch: int, marker: str | os.PathLike, rank: int = 1, code: int = 1,
                 delay_s: float = 0.0):
        self.epoch, self.marker, self.rank, self.code = epoch, str(marker), rank, code
        self.delay_s = delay_s

    def __call__(self, epoch, stats, trainer):
        if epoch == self.epoch and trainer.comm.rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed rank {self.rank} after epoch {epoch}\n")
            time.sleep(self.delay_s)
            os._exit(self.code)


# ---------------------------------------------------------------------------- helpers
def _tracker(cfg, storage: str, name: str, out: Path, run_name: str | None, workers: int):
    """The MLflow run of this Ray run, found again on relaunch (tag RUN_TAG) or created; or
    `NoTracker` when tracking is off."""
    if not cfg.tracking.mlflow:
        return NoTracker()
    key = f"{storage.rstrip('/')}/{name}"
    return MLflowClientRun.open(cfg, run_name or cfg.tracking.run_name or name,
                                tags={RUN_TAG: key, "output": str(out.resolve()),
                                      "ray.workers": str(workers)},
                                params=cfg.flat(), find_tag=RUN_TAG)


# ---------------------------------------------------------------------------- worker side
def _say(line: str):
    # Train V2 patches print() into its logger (each line shows twice); write directly.
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _worker_loop(loop: dict):
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch

    from coreg_ray.config import Config
    from coreg_ray.coreg.comm import TorchDistComm
    from coreg_ray.coreg.trainer import CHECKPOINT
    from coreg_ray.methods import run_method

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(loop["config"])
    if loop["gpus_per_worker"] > 0:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        cfg.train.device = str(dev)
    else:
        cfg.train.device = "cpu"
    import warnings

    from coreg_ray.coreg.persist import MANIFEST
    from coreg_ray.data.shards import Shard, shard_bounds
    from coreg_ray.coreg.checkpoint import check_checkpoint
    from coreg_ray.distributed.shard_data import AgreedError, agree_on, shard_annotations

    def stop(exc):  # every rank alike: no retry; the driver raises the line
        if rank == 0:
            ray.get(loop["errors"].put.remote(str(exc)))

    # ray.get returns read-only NumPy arrays (zero copy); the trainer only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    src, test_src = (ray.get(r) if r is not None else None for r in loop["data"])
    ann = loop["annotations"]  # AnnotationRows (read here, by id) or an object-store reference
    ann = ray.get(ann) if isinstance(ann, ray.ObjectRef) else ann
    lo, hi = Shard(rank, world, loop["rows"]).bounds
    train = src.read_rows(lo, hi, loop["size"])  # this rank's rows only, decoded here
    try:
        ann, ann_stats, cand_key = shard_annotations(ann, train, lo, hi)  # its annotation rows
    except AgreedError as exc:
        return stop(exc)
    shard = Shard(rank, world, loop["rows"], tuple(loop["trusted"]),
                  dict(loop["fingerprint"], candidate_sets=cand_key))
    test = None
    if test_src is not None:
        tlo, thi = shard_bounds(loop["test_rows"], world)[rank]
        test = test_src.read_rows(tlo, thi, loop["size"])

    state, restored_from = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = safeload.load_state(Path(d) / CHECKPOINT, "cpu", "checkpoint")
            if (Path(d) / MANIFEST).exists():  # the shard files overlapping this rank's rows
                manifest = json.loads((Path(d) / MANIFEST).read_text())
                at, files = 0, {}
                for file, count in zip(manifest["files"], manifest["counts"]):
                    if at < hi and at + count > lo:
                        files[file] = safeload.load_state(Path(d) / file, "cpu", "checkpoint")
                    at += count
                state["shard_states"] = (manifest, files)
        restored_from = state["epoch"]
        try:  # on other data (other candidate sets: the workers' key)? every rank finds it
            agree_on(check_checkpoint, state, f"{ckpt.path}", shard.fingerprint, cfg)
        except AgreedError as exc:
            return stop(exc)
    ray_info = dict((state or {}).get("ray") or {"restores": []})
    if restored_from is not None:
        ray_info["restores"] = list(ray_info.get("restores", [])) + [restored_from]
        if rank == 0:
            _say(f"[coreg-ray] resuming after epoch {restored_from + 1} "
                 f"({len(ray_info['restores'])} restore(s) so far)")

    tracker = NoTracker()  # rank 0 logs the epochs into the driver's MLflow run
    if rank == 0 and loop.get("mlflow_run_id"):
        tracker = MLflowClientRun.attach(loop["mlflow_run_id"], loop["mlflow_uri"])

    epochs = cfg.train.epochs
    every = max(1, cfg.train.checkpoint_every)

    def report(epoch, stats, trainer):
        metrics = finite_metrics(stats)
        metrics["epoch"] = epoch
        last = epoch == epochs - 1
        tmp, checkpoint = None, None
        if last or (epoch + 1) % every == 0:  # every rank: its shard; rank 0 the rest
            from coreg_ray.coreg.persist import shard_file

            tmp = Path(tempfile.mkdtemp(prefix="coreg-ckpt-"))
            torch.save(trainer.shard_state(), tmp / shard_file(rank))
            if rank == 0:
                st = trainer.checkpoint_state(epoch, per_sample=False)
                st["ray"] = ray_info
                st["annotation_stats"] = ann_stats  # the whole table's, summed over the ranks
                torch.save(st, tmp / CHECKPOINT)
                (tmp / MANIFEST).write_text(json.dumps(trainer.manifest(epoch)))
                if last:
                    trainer.save_model(tmp / "model.pt")
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if rank == 0:
            show = " ".join(f"{k}={metrics[k]:.4f}" for k in ("loss", "test_accuracy", "p_fraction")
                            if k in metrics)
            _say(f"[coreg-ray] epoch {epoch + 1}/{epochs} {stats.get('phase', '')} {show} "
                 f"({metrics.get('epoch_seconds', 0):.1f} s, {world} workers)")
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:05d}" if checkpoint else None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    # The run every worker makes: Co-Reg over DDP, from the restored state if there is one (a
    # relaunched finished run restores its last epoch and trains nothing); Ray Train's per-epoch
    # report and checkpoint is the callback.
    run_method("coreg", cfg, train, ann, test, callbacks=[report, *loop["callbacks"]],
               comm=TorchDistComm(), initial_state=state, shard=shard)


# ---------------------------------------------------------------------------- driver side
def train_distributed(images, annotations, output, config=None, overrides=(), test_images=None,
                      workers: int = 2, gpus_per_worker: float = 0, storage_path: str | None = None,
                      name: str | None = None, max_failures: int = 3,
                      cpus_per_worker: float | None = None, image_size=None, limit=None,
                      mlflow: bool = True, run_name: str | None = None, callbacks=(),
                      num_to_keep: int | None = 2, ray_address: str | None = None,
                      register: str | None = None, log=print, plan_only: bool = False,
                      gpu_memory_gb: float = 80.0) -> dict:
    """`coreg-ray train --workers N`: Co-Reg in a Ray Train `TorchTrainer` (module doc).

    storage_path: where Ray Train keeps checkpoints (default OUTPUT/ray; on a multi-node cluster
    a shared path or s3://...). name: the run's name under it (default: OUTPUT's folder name).
    Launching again with the same storage_path and name resumes that run.
    callbacks: extra picklable epoch callbacks run on every worker (e.g. `FailOnce`).
    register: a registered model name for the run's MLflow model (needs tracking).
    plan_only: log the memory plan (`coreg_ray.distributed.plan`) and return {"plan": ...}
    without writing or training anything. Every run is checked against it first: one that
    cannot fit GPUs of `gpu_memory_gb` is refused in one line before any worker starts.
    """
    from coreg_ray.coreg.trainer import CHECKPOINT
    from coreg_ray.data import AnnotationTable, annotation_stats, read_annotations
    from coreg_ray.data.annotation_rows import AnnotationRows
    from coreg_ray.data.location import for_workers
    from coreg_ray.distributed.shard_data import error_box

    if workers < 1:
        raise CoregError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise CoregError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    out = check_output_dir(output)  # nothing is written before every input is checked
    # the config as `train` resolves it (a Config as is, else the file plus overrides; run name,
    # tracking, the rule between keys, --register checked)
    cfg = resolve_config(RunSpec(images, annotations, out, config, overrides, run_name=run_name,
                                 tracking=mlflow, register=register), None, out / "config.yaml")
    size = image_size or cfg.data.image_size
    # the workers read the files themselves, from their own working folder: absolute paths
    images, annotations, test_images = map(for_workers, (images, annotations, test_images))
    inputs = check_sharded_inputs(cfg, images, annotations, test_images, size, limit, workers)
    src, test_src, train, test, ann, checked = inputs
    storage = storage_path or str((out / "ray").resolve())
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    name = name or out.resolve().name
    check_previous_run(storage, name, checked.fingerprint, cfg)
    from coreg_ray.distributed.plan import describe, plan_run

    plan = plan_run(cfg, len(train), len(test) if test is not None else 0, checked.size,
                    train.num_classes, workers, gpus_per_worker, gpu_memory_gb)
    if plan_only:
        for line in describe(plan):
            log(line)
        return {"plan": plan}
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")

    ray, _ = start_ray(ray_address)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tracker = _tracker(cfg, storage, name, out, run_name, workers)
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else 1}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    loop = {"config": cfg.to_dict(), "gpus_per_worker": gpus_per_worker,
            "data": [ray.put(src), ray.put(test_src) if test_src is not None else None],
            # a file's AnnotationRows (each worker reads its rows) or a table in memory
            "annotations": ann if isinstance(ann, AnnotationRows) else ray.put(ann),
            "rows": len(train), "test_rows": len(test) if test is not None else 0,
            "size": checked.size, "trusted": [int(i) for i in checked.trusted_index],
            "fingerprint": checked.fingerprint,
            "callbacks": list(callbacks), "mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri,
            "errors": error_box()}  # where the workers leave a line they all stopped on
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             logging_config=LoggingConfig(log_level="WARNING")))
    log(f"ray train: {workers} worker(s) x {resources}, storage {storage}/{name}")
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException as exc:
        ray.kill(loop["errors"])
        tracker.end(exc)
        if isinstance(exc, KeyboardInterrupt):
            log(f"interrupted: checkpoints are in {storage}/{name}; the same command resumes")
            raise
        detail = " ".join(str(exc).split())  # one line: the worker's error, abridged
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise CoregError(f"distributed training failed ({type(exc).__name__}: {detail}); "
                         f"checkpoints in {storage}/{name}; the same command resumes") from exc
    wall = time.perf_counter() - t0
    stopped = ray.get(loop["errors"].get.remote())  # the workers' inputs failed a check
    ray.kill(loop["errors"])
    if stopped is not None:
        tracker.end(CoregError(stopped))
        raise CoregError(stopped)
    if result.checkpoint is None:
        raise CoregError(f"distributed training reported no checkpoint (see {storage}/{name})")
    with result.checkpoint.as_directory() as d:
        state = safeload.load_state(Path(d) / CHECKPOINT, "cpu", "checkpoint")
        if state["epoch"] != cfg.train.epochs - 1 or not (Path(d) / "model.pt").exists():
            raise CoregError(f"{storage}/{name}: the last checkpoint is epoch {state['epoch'] + 1}, "
                             f"config has {cfg.train.epochs} epochs (changed config on relaunch?)")
        with atomic_path(out / "model.pt") as tmp:
            shutil.copyfile(Path(d) / "model.pt", tmp)
    history = state["history"]
    ray_info = state.get("ray") or {}
    stats = state.get("annotation_stats")  # the workers' (a checkpoint made before: computed here)
    if stats is None:
        table = ann if isinstance(ann, AnnotationTable) else read_annotations(ann.path,
                                                                              ann.num_classes)
        stats = annotation_stats(table.align_to(train.ids), train.labels)
    final = {"test_accuracy": history[-1].get("test_accuracy") if history else None,
             "seconds": state.get("elapsed")}
    metrics = run_metrics(cfg, train, test, ann, stats, final, wall, history)
    del metrics["history"]  # the Ray keys come before it, as they always did
    metrics.update(workers=workers, gpus_per_worker=gpus_per_worker,
                   restored_from_epochs=ray_info.get("restores", []),
                   ray_storage=f"{storage}/{name}", history=history)
    # metrics.json, curves.png, the tracker's final metrics, files and model as `execute` ends
    example = None  # the MLflow model's input example: two images (the only ones decoded here)
    if tracker.run_id is not None:
        example = src.read_rows(0, min(2, len(train)), checked.size)
    return finish_run(out, metrics, tracker, example, register,
                      run_title(images, cfg, f"{workers} workers"))


def check_sharded_inputs(cfg, images, annotations, test_images, size, limit, workers: int):
    """The driver's checks from the tables' id and label columns alone (no image decoded, no
    candidate set read): (row source, test row source or None, training columns, test columns
    or None, annotations, `CheckedInputs`). The annotations: an annotation file's
    `AnnotationRows` (its id column checked against the pool's; each worker reads its own
    rows), or a table given in memory aligned to the training ids. One line for annotation ids
    missing from the pool or the reverse, other classes, more workers than rows."""
    import copy

    from coreg_ray.coreg.models import build_model
    from coreg_ray.coreg.trainer import check_training_inputs
    from coreg_ray.data import AnnotationTable
    from coreg_ray.data.annotation_rows import annotation_ids, candidate_key
    from coreg_ray.data.shards import check_world, row_source

    src = row_source(images, size, limit)
    train = src.columns()
    check_world(len(train), workers)
    test_src = test = None
    if test_images is not None:
        test_src = row_source(test_images, size)
        test = test_src.columns()
        if test.labels is None:
            raise CoregError("test table has no labels: nothing to measure accuracy against")
        check_world(len(test), workers, "test table")
    if isinstance(annotations, AnnotationTable):
        ann = annotations.align_to(train.ids, "annotations")
    else:  # the id column only
        ann = annotation_ids(annotations, train.ids, train.num_classes, str(annotations))
    # Fail here, once, on what would otherwise fail on every worker and every restart.
    driver_cfg = copy.deepcopy(cfg)
    driver_cfg.train.device = "cpu"  # the workers pick their own devices
    checked = check_training_inputs(driver_cfg, train, ann, test)
    # the candidate sets' key (a file's: summed by the workers, compared when they restore)
    checked.fingerprint["candidate_sets"] = candidate_key(ann.ids, ann.candidates) \
        if isinstance(ann, AnnotationTable) else None
    build_model(cfg.model.backbone, train.num_classes, checked.size, cfg.model.proj_dim)
    return src, test_src, train, test, ann, checked


def check_previous_run(storage: str, name: str, fingerprint: dict, cfg) -> None:
    """A relaunch resumes the run's last checkpoint: one line, before any worker starts, if that
    checkpoint was made on another pool (rows, ids, classes, candidate sets) or model."""
    if "://" in storage:
        return  # remote storage: the workers check it when they restore
    from coreg_ray.coreg.checkpoint import check_checkpoint
    from coreg_ray.coreg.trainer import CHECKPOINT

    found = sorted((Path(storage) / name).glob(f"checkpoint_epoch_*/{CHECKPOINT}"))
    if found:
        state = safeload.load_state(found[-1], "cpu", "checkpoint")
        check_checkpoint(state, str(found[-1].parent), fingerprint, cfg)


def summarize(metrics: dict) -> str:
    keys = ("test_accuracy", "annotator_accuracy", "partial_accuracy", "avg_candidates", "epochs",
            "seconds", "workers", "restored_from_epochs")
    return json.dumps({k: metrics[k] for k in keys if k in metrics}, default=float)
