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

from coreg_ray.coreg.divergence import Diverged
from coreg_ray.distributed.tracking import MLflowClientRun, MLflowRun, NoTracker, Tracker
from coreg_ray.errors import CoregError, Terminated, require
from coreg_ray.outputs import check_output_dir, check_outputs_not_inputs, write_json_atomic

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
    overwrite: replace a run already in `output` (without it, and without `resume`, a folder
    holding a run's files is one line).
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
    overwrite: bool = False


def start_ray(address: str | None = None, logging_level: int | None = logging.WARNING):
    """The Ray of this process: the one already running, else `ray.init(address=...)`, which
    joins the cluster when `address` (or RAY_ADDRESS, set inside `ray job submit`) names one and
    otherwise starts a local Ray with this machine's resources. `logging_level` None leaves Ray's
    own default. A SIGTERM handler set in Python before (the CLI's) is kept. Returns (the ray
    module, whether this call started it)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        return ray, False
    kwargs = {} if logging_level is None else {"logging_level": logging_level}
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, **kwargs)
    if callable(previous):  # ray.init replaces it with sys.exit(15); the caller's (the CLI's:
        signal.signal(signal.SIGTERM, previous)  # stop like Ctrl-C, exit 143) stays in force
    return ray, True


def tracker_for(cfg, out: Path, resume: bool = False) -> Tracker:
    """The tracker of a run in folder `out`: an MLflow run (not yet started) when
    `cfg.tracking.mlflow`, else `NoTracker`. With `resume`, the MLflow run that trained into
    `out` last (its `output` tag), marked RUNNING again, so a run resumed after a kill -9 is
    continued and ended rather than left RUNNING beside a new one (a new run if none)."""
    if not cfg.tracking.mlflow:
        return NoTracker()
    tags = {"output": str(out.resolve())}
    if resume:
        return MLflowClientRun.open(cfg, cfg.tracking.run_name, tags, cfg.flat(),
                                    find_tag="output")
    return MLflowRun(cfg, tags=tags)


def resolve_config(spec: RunSpec, state: dict | None, cfg_path: Path):
    """The run's config: `spec.config` (a Config is used as is), else the checkpoint's or
    OUTPUT/config.yaml when resuming, else the defaults; overrides, seed, run name and tracking
    of the spec on top; the rule between keys checked, and a tracked run's MLflow store probed
    (`check_tracking_store`)."""
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
    check_tracking_store(cfg)  # an unreachable MLflow store: one line, within seconds
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
    inputs = {"--images": spec.images, "--annotations": spec.annotations,
              "--test-images": spec.test_images}
    for o in (out, *(out / f for f in (*OUTPUT_FILES, CHECKPOINT))):  # none is an input
        check_outputs_not_inputs({"output folder" if o is out else "output file": o}, inputs)
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
        check_resume_settings(state, cfg, out)  # a finished run: nothing trained, nothing written
    if coreg:
        check_memory(cfg, len(train), train.num_classes, checked.size, checked.device)
        build_model(cfg.model.backbone, train.num_classes, checked.size, cfg.model.proj_dim)
    stats = annotation_stats(ann, train.labels)
    if not spec.resume:
        check_no_run(out, spec.overwrite, coreg)
    elif state is None and ((out / "model.pt").exists() or (out / "metrics.json").exists()):
        raise CoregError(f"{out} holds a finished run but no {CHECKPOINT}: nothing to resume "
                         "from (--overwrite to replace the run)")
    # ---- everything checked: from here on the run writes
    tracker = start_tracker(cfg, out, state is not None)
    out.mkdir(parents=True, exist_ok=True)
    if spec.overwrite:
        for f in (*OUTPUT_FILES, CHECKPOINT):
            (out / f).unlink(missing_ok=True)
    cfg.save(cfg_path)  # the config of the run that starts now (never before it starts)
    t0 = time.perf_counter()
    try:
        res = run_method(spec.method, cfg, train, ann, test, test_ann,
                         params=None if coreg else spec.params,
                         callbacks=[tracker.epoch_callback], progress=spec.progress,
                         model_path=out / "model.pt", output_dir=out if coreg else None,
                         resume=spec.resume, initial_state=state)
    except BaseException as exc:  # Ctrl-C, or SIGTERM (Terminated): the run is KILLED
        tracker.end(exc)
        close_progress_bars()  # the line that follows starts on a line of its own
        if coreg and isinstance(exc, KeyboardInterrupt):
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            print(f"{what}: the last finished epoch is checkpointed in {out / CHECKPOINT}; "
                  f"continue with the same command plus --resume", file=sys.stderr)
        if isinstance(exc, Diverged):
            raise CoregError(f"{exc}; {kept_checkpoint(out / CHECKPOINT) if coreg else ''}"
                             .rstrip("; ")) from None
        raise
    metrics = run_metrics(cfg, train, test, ann, stats, res, time.perf_counter() - t0,
                          res.get("history") or [])
    if not coreg:  # a named method: its name first, its own keys last
        metrics["epochs"] = res.get("epochs")
        metrics = {"method": spec.method, **metrics,
                   **{k: v for k, v in res.items() if k not in metrics and k != "method"}}
    return finish_run(out, metrics, tracker, train if trained else None, spec.register,
                      run_title(spec.images, cfg))


def free_memory(device) -> int | None:
    """Bytes free on `device` (a torch.device): CUDA's free memory, else the host's
    MemAvailable (None where it cannot be told)."""
    try:
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def check_memory(cfg, rows: int, classes: int, size: int, device) -> None:
    """One line, before anything is allocated, when what a Co-Reg run allocates up front (both
    MoCo queues, the per-sample tables, the images on the device) exceeds the free memory."""
    c, d = cfg.coreg, cfg.model.proj_dim
    need = (2 * c.queue_size * (4 * d + 9) + 5 * rows * classes * 4 + rows * size * size * 3
            + classes * d * 4)
    free = free_memory(device)
    if free is None or need <= 0.9 * free:
        return
    gib = 1 << 30
    raise CoregError(f"the run would allocate {need / gib:.1f} GiB up front (coreg.queue_size="
                     f"{c.queue_size}, model.proj_dim={d}, {rows} images at {size}x{size}), more "
                     f"than the {free / gib:.1f} GiB free on {device}: lower coreg.queue_size or "
                     "model.proj_dim")


def close_progress_bars() -> None:
    """Close the progress bars a stopped run left open (tqdm ends each with a newline)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:
            pass


def kept_checkpoint(path: Path) -> str:
    """What a stopped run leaves to resume from: its checkpoint and epoch, or that it has none."""
    from coreg_ray.coreg.checkpoint import read_checkpoint

    if not path.exists():
        return "no epoch finished, so no checkpoint was written"
    try:
        epoch = read_checkpoint(path)["epoch"] + 1
    except (CoregError, KeyError, TypeError):
        return f"{path} is kept"
    return f"the last finite checkpoint, {path} (epoch {epoch}), is kept"


def start_tracker(cfg, out: Path, resume: bool = False) -> Tracker:
    """`tracker_for(cfg, out, resume).start()`, a failure to start one line (nothing written
    yet)."""
    tracker = None
    try:
        tracker = tracker_for(cfg, out, resume)
        return tracker.start()
    except (KeyboardInterrupt, CoregError):
        raise
    except Exception as exc:
        if getattr(tracker, "_saved", None) is not None:  # put the process's MLflow URI back
            try:
                tracker.end(exc)
            except Exception:
                pass
        from coreg_ray.distributed.tracking import tracking_uri

        first = " ".join(str(exc).split())[:300]
        raise CoregError(f"MLflow tracking store {tracking_uri(cfg.tracking.tracking_uri)}: the "
                         f"run could not be started ({type(exc).__name__}: {first}); "
                         "--no-mlflow trains without it") from None


def check_no_run(out: Path, overwrite: bool, resumable: bool = True) -> None:
    """One line when folder `out` already holds a run (its model.pt / metrics.json, or a
    checkpoint) and neither --resume nor --overwrite says what to do with it."""
    from coreg_ray.coreg.checkpoint import CHECKPOINT

    if overwrite or not out.is_dir():
        return
    cont = "--resume to continue it or " if resumable else ""
    if (out / "model.pt").exists() or (out / "metrics.json").exists():
        raise CoregError(f"{out} holds a finished run; {cont}--overwrite to replace it")
    if (out / CHECKPOINT).exists():
        raise CoregError(f"{out} holds an unfinished run ({CHECKPOINT}); {cont}--overwrite to "
                         "start it over")


# the keys a resume may change without making config.yaml lie about model.pt
_RESUME_FREE = ("train.epochs", "train.eval_every", "train.checkpoint_every", "train.device",
                "train.eval_batch_size")


def check_resume_settings(state: dict, cfg, out: Path) -> None:
    """A --resume of a finished run trains nothing: with other settings (`--config`/`--set`)
    it would leave a config.yaml that no longer describes model.pt, so it is one line; so is a
    resume with nothing left to train. A run with epochs left continues with the settings
    given (they are what config.yaml records from then on)."""
    from coreg_ray.config import Config

    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) \
            or not isinstance(state.get("config"), dict):
        return  # check_checkpoint says what is wrong with it
    done = state["epoch"] + 1
    if done < cfg.train.epochs:
        return
    try:
        made = Config.from_dict(state["config"]).flat()
    except CoregError:
        made = {}
    now = cfg.flat()
    diff = [k for k in now if not k.startswith("tracking.") and k not in _RESUME_FREE
            and k in made and made[k] != now[k]]
    if diff:
        shown = ", ".join(f"{k}={now[k]}" for k in diff[:3]) + (", ..." if len(diff) > 3 else "")
        raise CoregError(f"{out} holds a finished run ({done} epochs): --resume with other "
                         f"settings ({shown}) would train nothing; train into a new --output "
                         "(or raise train.epochs to train on)")
    raise CoregError(f"{out} holds a finished run ({done} epochs; train.epochs="
                     f"{cfg.train.epochs}): nothing to resume (raise train.epochs to train on)")


def check_tracking_store(cfg, timeout: float = 5.0) -> None:
    """One line within `timeout` seconds when the MLflow store of a tracked run cannot be
    reached (an http(s) server that does not answer, a SQLite file in a folder that does not
    exist), before the run touches its folder; MLflow itself would retry for minutes."""
    if not cfg.tracking.mlflow:
        return
    from coreg_ray.distributed.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking.tracking_uri)
    hint = "start it, point tracking.tracking_uri / MLFLOW_TRACKING_URI elsewhere, or --no-mlflow"
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # it answered, and wants credentials (MLflow's own client has them)
            raise CoregError(f"MLflow tracking store {uri} does not answer as an MLflow server "
                             f"(GET /health: HTTP {exc.code}); {hint}") from None
        except (OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise CoregError(f"MLflow tracking store {uri} cannot be reached ({why}); "
                             f"{hint}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise CoregError(f"MLflow tracking store {uri}: folder {folder} does not exist; "
                             f"{hint}")


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
