"""The run layer: a run is described once (`RunSpec`) and executed by one function (`execute`).

    from coreg_ray.runs import RunSpec, execute
    metrics = execute(RunSpec("digits:train", "ann.parquet", "runs/a", test_images="digits:test"))

`execute` checks everything first: the output folder, the config, a checkpoint to resume
(complete, made with this model on these data), the tables against each other; only then writes,
atomically: OUTPUT/config.yaml, checkpoints (Co-Reg), model.pt, metrics.json, curves.png. Every
method (any name of `coreg_ray.methods`) runs through `coreg_ray.methods.run_method`, what a run
is once its inputs are loaded; the default, `coreg`, is the Co-Reg trainer with per-epoch
checkpoints and `--resume`. Tracking goes through one `Tracker` (`coreg_ray.distributed.tracking`:
MLflow or `NoTracker`): a tracked run that trained a student also logs it as the run's MLflow
model (`runs:/<id>/model`, `coreg_ray.mlflow_model`), and `register` adds it to the Model
Registry. `finish_run` is the end of every run that writes OUTPUT. Ray is started in one place,
`start_ray`.

Callers: `coreg-ray train` (`cli.train_run`), the quickstart. Ray Train's driver shares
`resolve_config`, `run_metrics` and `finish_run`; its workers, Tune's trials and the experiment's
tasks call `run_method` with their own epoch callbacks; all of them, and the annotation
pipeline, start Ray with `start_ray`.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from coreg_ray.distributed.tracking import MLflowClientRun, MLflowRun, NoTracker, Tracker
from coreg_ray.errors import CoregError, Terminated, require
from coreg_ray.outputs import check_output_dir, write_json_atomic

__all__ = ["RunSpec", "execute", "start_ray", "Tracker", "NoTracker", "MLflowRun",
           "MLflowClientRun", "tracker_for"]

DEFAULT_METHOD = "coreg"
OUTPUT_FILES = ("metrics.json", "config.yaml", "model.pt", "curves.png")


@dataclass
class RunSpec:
    """One training run.

    images / test_images: an image table or its source (path, folder, 'digits:train', ...).
    annotations: an `AnnotationTable` or the path of one (aligned to the images by id).
    output: the run's folder. config: a `Config`, a YAML path, or None (the defaults; with
    `resume`, the run's own config); `overrides` (`section.key=value`) apply on top.
    method: `coreg` (default: checkpoints, resume) or any name of `coreg_ray.methods`
    (`params`: its parameters, for Co-Reg and its variants dotted config keys applied after
    the overrides; `test_annotations`: the test split's table, for zero_shot).
    seed: sets `train.seed` (None: the config's). run_name: the tracked run's name.
    tracking: False turns MLflow off whatever the config says.
    register: a registered model name: the run's MLflow model becomes a new version of it
    (needs tracking).
    """

    images: Any
    annotations: Any
    output: str | Path
    config: Any = None
    overrides: Sequence[str] = ()
    test_images: Any = None
    method: str = DEFAULT_METHOD
    params: dict | None = None
    test_annotations: Any = None
    seed: int | None = None
    resume: bool = False
    image_size: int | None = None
    limit: int | None = None
    run_name: str | None = None
    tracking: bool = True
    progress: bool = True
    register: str | None = None


def start_ray(address: str | None = None, logging_level: int | None = logging.WARNING):
    """The Ray of this process: the one already running, else `ray.init(address=...)`, which
    joins the cluster when `address` (or RAY_ADDRESS, set inside `ray job submit`) names one and
    otherwise starts a local Ray with this machine's resources. `logging_level` None leaves Ray's
    own default. Returns (the ray module, whether this call started it)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        return ray, False
    kwargs = {} if logging_level is None else {"logging_level": logging_level}
    ray.init(address=address, **kwargs)
    return ray, True


def tracker_for(cfg, out: Path) -> Tracker:
    """The tracker of a run in folder `out`: an MLflow run (not yet started) when
    `cfg.tracking.mlflow`, else `NoTracker`."""
    if cfg.tracking.mlflow:
        return MLflowRun(cfg, tags={"output": str(out.resolve())})
    return NoTracker()


def resolve_config(spec: RunSpec, state: dict | None, cfg_path: Path):
    """The run's config: `spec.config` (a Config is used as is), else the checkpoint's or
    OUTPUT/config.yaml when resuming, else the defaults; overrides, seed, run name and tracking
    of the spec on top; the rule between keys checked."""
    from coreg_ray.config import Config

    config, overrides = spec.config, list(spec.overrides)
    if isinstance(config, Config):
        cfg = config
    elif config is None and state is not None:  # the config the run was training with
        cfg = Config.load(None, overrides, base=state["config"])
    elif config is None and spec.resume and cfg_path.exists():
        cfg = Config.load(cfg_path, overrides)
    else:
        cfg = Config.load(config, overrides)
    if spec.seed is not None:
        cfg.train.seed = spec.seed
    if spec.run_name:
        cfg.tracking.run_name = spec.run_name
    if not spec.tracking:
        cfg.tracking.mlflow = False
    if spec.method == DEFAULT_METHOD and spec.params:  # Co-Reg's params are dotted config keys:
        from coreg_ray.methods import apply_variant_params  # set here, so config.yaml and the

        apply_variant_params(cfg, spec.params, DEFAULT_METHOD)  # checkpoint record them
    cfg.check_schedule()  # each key was range-checked as it was set; this is the rule between keys
    check_register(spec.register, cfg.tracking.mlflow)
    return cfg


def check_register(name: str | None, tracked: bool) -> None:
    """One line unless `name` (None: nothing to register) can be registered: tracking on,
    MLflow installed, a valid registered model name."""
    if name is None:
        return
    if not tracked:
        raise CoregError("--register puts the run's model in MLflow's Model Registry: it needs "
                         "MLflow tracking (drop --no-mlflow; tracking.mlflow=true)")
    require("mlflow", "mlflow")
    from coreg_ray.mlflow_model import check_model_name

    check_model_name(name)


def execute(spec: RunSpec) -> dict:
    """Run `spec` (module doc); returns the metrics written to OUTPUT/metrics.json (plus
    `mlflow_run_id` when tracked)."""
    from coreg_ray.coreg.checkpoint import CHECKPOINT, check_checkpoint, read_checkpoint
    from coreg_ray.coreg.models import build_model
    from coreg_ray.coreg.trainer import check_training_inputs
    from coreg_ray.data import AnnotationTable, annotation_stats, load_run_inputs, read_annotations
    from coreg_ray.methods import FEWSHOT, method_info, run_method

    coreg = spec.method == DEFAULT_METHOD  # the one method with checkpoints and --resume
    trained = method_info(spec.method).kind == "coreg"  # unknown: one line, nothing read yet
    if not coreg and spec.resume:
        raise CoregError(f"--resume continues Co-Reg training only, not method {spec.method}")
    if spec.register and not trained:
        raise CoregError(f"--register: method {spec.method} writes no model.pt (only Co-Reg and "
                         "its variants do): nothing to register")
    out = check_output_dir(spec.output, "output folder")
    cfg_path, ckpt_path = out / "config.yaml", out / CHECKPOINT
    state = read_checkpoint(ckpt_path) if spec.resume and ckpt_path.exists() else None
    cfg = resolve_config(spec, state, cfg_path)
    train, test, ann = load_run_inputs(spec.images, spec.annotations, spec.test_images,
                                       spec.image_size or cfg.data.image_size, spec.limit)
    test_ann = None if coreg else spec.test_annotations  # zero_shot measures the test table
    if test_ann is not None and not isinstance(test_ann, AnnotationTable):
        test_ann = read_annotations(test_ann, train.num_classes)
    if spec.method != "zero_shot" and spec.method not in FEWSHOT:  # it trains a student
        checked = check_training_inputs(cfg, train, ann, test)
    if state is not None:
        check_checkpoint(state, str(ckpt_path), checked.fingerprint, cfg)
    if coreg:
        build_model(cfg.model.backbone, train.num_classes, checked.size, cfg.model.proj_dim)
    stats = annotation_stats(ann, train.labels)
    # ---- everything checked: from here on the run writes
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg_path)
    tracker = tracker_for(cfg, out).start()
    t0 = time.perf_counter()
    try:
        res = run_method(spec.method, cfg, train, ann, test, test_ann,
                         params=None if coreg else spec.params,
                         callbacks=[tracker.epoch_callback], progress=spec.progress,
                         model_path=out / "model.pt", output_dir=out if coreg else None,
                         resume=spec.resume, initial_state=state)
    except BaseException as exc:  # Ctrl-C, or SIGTERM (Terminated): the run is KILLED
        tracker.end(exc)
        if coreg and isinstance(exc, KeyboardInterrupt):
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            print(f"{what}: the last finished epoch is checkpointed in {out / CHECKPOINT}; "
                  f"continue with the same command plus --resume", file=sys.stderr)
        raise
    metrics = run_metrics(cfg, train, test, ann, stats, res, time.perf_counter() - t0,
                          res.get("history") or [])
    if not coreg:  # a named method: its name first, its own keys last
        metrics["epochs"] = res.get("epochs")
        metrics = {"method": spec.method, **metrics,
                   **{k: v for k, v in res.items() if k not in metrics and k != "method"}}
    return finish_run(out, metrics, tracker, train if trained else None, spec.register,
                      run_title(spec.images, cfg))


def run_title(images, cfg, *extra: str) -> str:
    """The title of a run's curves.png: its images (a path, or "images" for a table in memory),
    backbone and seed, then `extra` parts."""
    from coreg_ray.data.location import redact

    name = redact(images) if isinstance(images, (str, Path)) else "images"
    return " · ".join([name, cfg.model.backbone, f"seed {cfg.train.seed}", *extra])


def run_metrics(cfg, train, test, ann, stats: dict, final: dict, wall: float,
                history: list) -> dict:
    """The contents of metrics.json (Ray Train adds its own keys before `history`)."""
    return {
        "test_accuracy": final.get("test_accuracy"),
        "annotator_accuracy": stats.get("ensemble_accuracy"),
        "partial_accuracy": stats.get("partial_accuracy"),
        "avg_candidates": stats["avg_candidates"],
        "epochs": cfg.train.epochs, "warmup_epochs": cfg.train.warmup_epochs,
        "seconds": final.get("seconds"), "wall_seconds": wall,
        "train_images": len(train), "test_images": len(test) if test is not None else 0,
        "backbone": cfg.model.backbone, "seed": cfg.train.seed,
        "annotator": ann.meta.get("annotator"),
        "history": history,
    }


def finish_run(out: Path, metrics: dict, tracker: Tracker, train=None,
               register: str | None = None, curves_title: str | None = None) -> dict:
    """The end of every run that writes OUTPUT (`execute`, Ray Train's driver):
    metrics.json, curves.png beside it (with `curves_title`), the tracker's final metrics and
    files, and with `train` (the training table: a student was trained) model.pt as the run's
    MLflow model (`register`: a Model Registry version too); then the tracker ends."""
    write_json_atomic(out / "metrics.json", metrics)
    files = OUTPUT_FILES
    if curves_title is not None:
        from coreg_ray.plots import training_curves, write_beside  # curves.png by metrics.json

        write_beside(training_curves, metrics["history"], out / "curves.png", title=curves_title)
    else:
        files = tuple(f for f in OUTPUT_FILES if f != "curves.png")
    tracker.log_metrics({k: v for k, v in metrics.items() if k != "history" and v is not None})
    for f in files:
        tracker.log_artifact(out / f)
    if tracker.run_id is not None:
        metrics["mlflow_run_id"] = tracker.run_id
        if train is not None:
            metrics.update(log_run_model(tracker, out / "model.pt", train, register,
                                         {"coreg.output": str(out.resolve()),
                                          "test_accuracy": metrics.get("test_accuracy")}))
    tracker.end()
    return metrics


def log_run_model(tracker: Tracker, model_path: Path, train, register: str | None,
                  tags: dict) -> dict:
    """`tracker.log_model` of a finished run's model.pt (two training images as its input
    example): {"mlflow_model_uri", and "registered_model", "registered_version"}. A failure ends
    the run FAILED and is one line (the run's files are all written by then)."""
    from coreg_ray.mlflow_model import encode_png

    try:
        logged = tracker.log_model(model_path, encode_png(train.images), register, tags)
    except BaseException as exc:
        tracker.end(exc)
        if isinstance(exc, (KeyboardInterrupt, CoregError)):
            raise
        first = " ".join(str(exc).split())[:300]
        raise CoregError(f"{model_path.parent}: the run finished, but logging its model to MLflow "
                         f"failed ({type(exc).__name__}: {first})") from exc
    if not logged:
        return {}
    out = {"mlflow_model_uri": logged["model_uri"]}
    if "version" in logged:
        out.update(registered_model=logged["registered_model"],
                   registered_version=logged["version"])
    return out
