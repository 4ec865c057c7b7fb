"""Ray Tune sweeps over Co-Reg (`coreg-ray tune --config configs/sweep-*.yaml`).

Each trial runs Co-Reg in one process (`coreg_ray.methods.run_method`, as every run does) inside
a Tune function (one trial = the `resources` of the sweep file, e.g. 1 CPU or 1 GPU; as many
trials run at once as the cluster holds) and reports every epoch with `ray.tune.report` from
its epoch callback; ASHA stops the weak ones early.

The metric is configurable:
- `test_accuracy` (the sweep's labelled test table) or `val_accuracy` (true labels of the
  held-out split) when labels exist;
- label-free proxies computed on a held-out *annotated* split of the training images
  (`data.holdout`, default 10%; those images are not trained on):
  `val_candidate_agreement` = fraction of held-out images whose predicted class lies inside their
  candidate set, and `val_candidate_mass` = mean predicted probability on the candidate set.
  Users without clean labels optimise these; `sweep.json` reports the Spearman rank correlation
  of each proxy with the true accuracy across trials whenever labels exist.

MLflow: one parent run for the sweep (search space, best trial's metrics, config and model) and
one child run per trial (its full resolved config as params, per-epoch metrics), all written by
the driver through a Tune callback (one writer; trials may run on other nodes).

Sweep file (YAML):

    data: {images: digits:train, test_images: digits:test, holdout: 0.1,
           annotations: ann.parquet | {synthetic: {q, eta, seed}} | {simulate: {templates, ...}}}
    base: configs/quickstart.yaml | {model: {...}, train: {...}, coreg: {...}}
    search: {train.lr: {loguniform: [0.003, 0.05]}, coreg.sharpen_T: {choice: [0.1, 0.5]}, ...}
    num_samples: 8
    metric: val_candidate_agreement
    mode: max
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # or {type: fifo}
    resources: {cpu: 1, gpu: 0}
    max_concurrent_trials: null
    seed: 0
    output: runs/sweep
    storage_path: null        # default OUTPUT/ray (a shared path or s3:// on a multi-node cluster)
    name: null                # default tune-<time>
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from coreg_ray.config import load_yaml_mapping
from coreg_ray.distributed.tracking import MLflowClientRun, NoTracker
from coreg_ray.errors import CoregError
from coreg_ray.outputs import check_output_dir, write_json_atomic

SEARCHABLE = ("train.warmup_epochs", "coreg.beta1", "coreg.beta2", "coreg.sharpen_T",
              "coreg.proto_temp", "coreg.cont_temp", "train.lr")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform", "qloguniform")
LABEL_FREE = ("val_candidate_agreement", "val_candidate_mass")
METRICS = LABEL_FREE + ("val_accuracy", "test_accuracy")


@dataclass
class Sweep:
    data: dict
    base: dict
    search: dict
    num_samples: int = 8
    metric: str = "val_candidate_agreement"
    mode: str = "max"
    scheduler: dict = field(default_factory=lambda: {"type": "asha"})
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent_trials: int | None = None
    seed: int = 0
    output: str = "runs/sweep"
    storage_path: str | None = None
    name: str | None = None
    checkpoint_every: int = 0  # trials save model.pt every N epochs (0: only the last)

    @classmethod
    def load(cls, path, overrides=()) -> "Sweep":
        p = Path(path)
        raw = load_yaml_mapping(p, "sweep file")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CoregError(f"sweep file {p}: unknown key(s) {', '.join(unknown)} "
                             f"(keys: {', '.join(sorted(known))})")
        for key in ("data", "search"):
            if not isinstance(raw.get(key), dict) or not raw[key]:
                raise CoregError(f"sweep file {p}: '{key}' must be a non-empty mapping")
        base = raw.get("base") or {}
        if isinstance(base, str):  # a config file, relative to the sweep file or the cwd
            bp = Path(base) if Path(base).is_file() else p.parent / base
            if not bp.is_file():
                raise CoregError(f"sweep file {p}: base config not found: {base}")
            base = load_yaml_mapping(bp, "base config", "a mapping of sections")
        raw["base"] = base
        sweep = cls(**raw)
        sweep.overrides = list(overrides)
        sweep.validate()
        return sweep

    def base_config(self):
        from coreg_ray.config import Config

        return Config.from_dict(self.base).apply_overrides(getattr(self, "overrides", []))

    def validate(self):
        cfg = self.base_config()
        if self.mode not in ("max", "min"):
            raise CoregError(f"sweep: mode must be max or min, got {self.mode!r}")
        if self.metric not in METRICS:
            raise CoregError(f"sweep: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.metric == "test_accuracy" and not self.data.get("test_images"):
            raise CoregError("sweep: metric test_accuracy needs data.test_images")
        h = self.data.get("holdout", 0.1)
        if not (isinstance(h, (int, float)) and 0 <= h < 1):
            raise CoregError(f"sweep: data.holdout must be in [0, 1), got {h!r}")
        if h == 0 and self.metric != "test_accuracy":
            raise CoregError(f"sweep: metric {self.metric} needs a held-out split (data.holdout > 0)")
        from coreg_ray.config import Config

        for key, spec in self.search.items():
            example = _example(key, spec)  # the form of the spec
            for value in _edges(spec):  # unknown keys, wrong types, values out of range
                try:
                    Config().set(key, value)
                except CoregError as exc:
                    raise CoregError(f"sweep: search.{key} = {spec!r}: {exc}") from None
            cfg.set(key, example)
            if key == "train.warmup_epochs":
                hi = _upper(spec)
                if hi is not None and hi >= cfg.train.epochs:
                    raise CoregError(f"sweep: train.warmup_epochs can reach {hi}, but "
                                     f"train.epochs is {cfg.train.epochs}: keep it below")
        kind = (self.scheduler or {}).get("type", "asha")
        if kind not in ("asha", "fifo"):
            raise CoregError(f"sweep: scheduler.type must be asha or fifo, got {kind!r}")
        if self.num_samples < 1:
            raise CoregError("sweep: num_samples must be >= 1")


def _example(key, spec):
    if not isinstance(spec, dict):
        return spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise CoregError(f"sweep: search.{key} must be a value or one of "
                         f"{{{'|'.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if not isinstance(args, list) or not args:
        raise CoregError(f"sweep: search.{key}.{kind} needs a list, got {args!r}")
    if kind in ("choice", "grid"):
        return args[0]
    if len(args) < 2 or not all(isinstance(a, (int, float)) for a in args):
        raise CoregError(f"sweep: search.{key}.{kind} needs [low, high{', q' if 'q' in kind else ''}]")
    return int(args[0]) if kind == "randint" else float(args[0])


def _edges(spec) -> list:
    """The values a search space can reach at its edges (all of them for choice/grid)."""
    if not isinstance(spec, dict):
        return [spec]
    (kind, args), = spec.items()
    if kind in ("choice", "grid"):
        return list(args)
    lo, hi = args[0], args[1]
    if kind == "randint":
        return [int(lo), int(hi) - 1]  # randint's upper bound is exclusive
    return [float(lo), float(hi)]


def _upper(spec):
    if not isinstance(spec, dict):
        return spec
    (kind, args), = spec.items()
    if kind in ("choice", "grid"):
        return max(args)
    return args[1] - 1 if kind == "randint" else args[1]  # randint's upper bound is exclusive


def search_space(search: dict) -> dict:
    from ray import tune

    out = {}
    for key, spec in search.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        (kind, args), = spec.items()
        out[key] = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
                    "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                    "randint": lambda a: tune.randint(*a), "quniform": lambda a: tune.quniform(*a),
                    "qloguniform": lambda a: tune.qloguniform(*a)}[kind](args)
    return out


# ---------------------------------------------------------------------------- data
def load_sweep_data(sweep: Sweep, image_size=None):
    """(train, annotations, test, held-out index) from the sweep's `data` section."""
    from coreg_ray.data import (SimulatedVLM, load_image_table, read_annotations,
                                synthetic_annotations)

    d = sweep.data
    if "images" not in d or "annotations" not in d:
        raise CoregError("sweep: data needs images and annotations")
    size = image_size or sweep.base_config().data.image_size
    train = load_image_table(d["images"], size, d.get("limit"))
    test = load_image_table(d["test_images"], size) if d.get("test_images") else None
    spec = d["annotations"]
    if isinstance(spec, dict) and "synthetic" in spec:
        s = spec["synthetic"] or {}
        if train.labels is None:
            raise CoregError("sweep: synthetic annotations need labelled images")
        ann = synthetic_annotations(train.ids, train.labels, train.num_classes, s.get("q", 0.3),
                                    s.get("eta", 0.1), s.get("seed", 0))
    elif isinstance(spec, dict) and "simulate" in spec:
        s = spec["simulate"] or {}
        vlm = SimulatedVLM(s.get("templates", 6), s.get("per_class", 3),
                           s.get("feature_fraction", 0.5), s.get("seed", 0),
                           s.get("features", "pixels"))
        ann = vlm.fit(train.images, train.labels, train.num_classes).annotate(train.images, train.ids)
    elif isinstance(spec, (str, os.PathLike)):
        ann = read_annotations(spec, train.num_classes).align_to(train.ids, str(spec))
    else:
        raise CoregError("sweep: data.annotations must be a path, {synthetic: {...}} or "
                         f"{{simulate: {{...}}}}, got {spec!r}")
    frac = float(d.get("holdout", 0.1))
    rng = np.random.default_rng(int(d.get("holdout_seed", 0)))
    held = np.sort(rng.permutation(len(train))[:int(round(frac * len(train)))])
    return train, ann, test, held


# ---------------------------------------------------------------------------- trial side
def heldout_metrics(trainer, images, candidates, labels=None) -> dict:
    """Label-free proxies (and true accuracy when labels are given) on held-out images."""
    import torch

    from coreg_ray.coreg.trainer import resize_images

    x = resize_images(images, trainer.image_size).to(trainer.device)
    logits = sum(trainer._predict_all(n, x, weak=False) for n in trainer.raw_nets)
    pred = logits.argmax(1).cpu()
    cand = torch.as_tensor(candidates, dtype=torch.bool)
    probs = torch.softmax(logits.float(), 1).cpu()
    out = {"val_candidate_agreement": cand[torch.arange(len(pred)), pred].float().mean().item(),
           "val_candidate_mass": (probs * cand).sum(1).mean().item()}
    if labels is not None:
        out["val_accuracy"] = (pred.numpy() == np.asarray(labels)).mean().item()
    return out


def _trial(params, *, base, data, checkpoint_every):
    import ray
    import torch
    from ray import tune

    from coreg_ray.config import Config
    from coreg_ray.methods import run_method

    import warnings

    # ray.get returns read-only NumPy arrays (zero copy); the trainer only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    train, ann, test, held = (ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in data)
    held = np.array(held)
    cfg = Config.from_dict(base)
    for k, v in params.items():
        cfg.set(k, v.item() if hasattr(v, "item") else v)
    cfg.tracking.mlflow = False
    cfg.train.eval_every = 1
    keep = np.setdiff1d(np.arange(len(train)), held)
    fit_train, fit_ann = train.subset(keep), ann.subset(keep)
    held_img = train.images[torch.as_tensor(held)] if len(held) else None
    held_cand = ann.candidates[held]
    held_lab = train.labels[held] if train.labels is not None else None
    epochs = cfg.train.epochs

    def report(epoch, stats, trainer):
        metrics = {k: float(v) for k, v in stats.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if held_img is not None:
            metrics.update(heldout_metrics(trainer, held_img, held_cand, held_lab))
        metrics["epoch"] = epoch
        last = epoch == epochs - 1
        if last or (checkpoint_every and (epoch + 1) % checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as d:
                trainer.save_model(Path(d) / "model.pt")
                Path(d, "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)

    # the run a trial makes: Co-Reg on the training images minus the held-out ones; Tune's
    # per-epoch report (held-out metrics, model.pt checkpoints) is the callback
    run_method("coreg", cfg, fit_train, fit_ann, test, callbacks=[report])


# ---------------------------------------------------------------------------- MLflow (driver)
def _mlflow_callback(parent, base_cfg):
    from ray import tune

    class MLflowChildRuns(tune.Callback):
        """Each trial = an MLflow child run of the sweep's parent run (logged by the driver)."""

        def __init__(self):
            self.runs = {}  # trial id -> its MLflowClientRun

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.runs:
                return
            cfg = _resolved(base_cfg, trial.config)
            self.runs[trial.trial_id] = parent.child(f"trial-{trial.trial_id}",
                                                     {"tune.trial_id": trial.trial_id},
                                                     params=cfg.flat())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run = self.runs.get(trial.trial_id)
            if run is None:
                return
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            run.log_metrics({k: v for k, v in result.items()
                             if k in _LOGGED or k.startswith(("loss", "p_", "pseudo_", "val_"))},
                            step=step)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.trial_id in self.runs:
                self.runs[trial.trial_id].end()

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.runs:
                self.runs[trial.trial_id].end(Exception)  # FAILED

    return MLflowChildRuns()


_LOGGED = {"test_accuracy", "lr", "epoch_seconds"}


def _resolved(base_cfg, params):
    import copy

    cfg = copy.deepcopy(base_cfg)
    for k, v in params.items():
        cfg.set(k, v.item() if hasattr(v, "item") else v)
    return cfg


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a[ok], b[ok]).statistic)


# ---------------------------------------------------------------------------- driver
def run_sweep(sweep: Sweep | str | os.PathLike, output=None, overrides=(), num_samples=None,
              mlflow=True, ray_address=None, image_size=None, log=print,
              overwrite=False) -> dict:
    """Run a sweep; writes OUTPUT/sweep.json and OUTPUT/best/{config.yaml,model.pt}. A
    finished sweep in OUTPUT (its sweep.json) is one line unless `overwrite`."""
    sweep = sweep if isinstance(sweep, Sweep) else Sweep.load(sweep, overrides)
    if num_samples:
        sweep.num_samples = num_samples
    base_cfg = sweep.base_config()
    out = check_output_dir(output or sweep.output)  # before the data is read: nothing written
    if (out / "sweep.json").exists() and not overwrite:  # a relaunch would rerun every trial
        raise CoregError(f"{out} holds a finished sweep (sweep.json); give another --output, or "
                         "--overwrite to run it again")
    train, ann, test, held = load_sweep_data(sweep, image_size)
    out.mkdir(parents=True, exist_ok=True)
    truth_key = "test_accuracy" if test is not None else ("val_accuracy" if train.labels is not None and len(held) else None)
    log(f"sweep: {sweep.num_samples} trials, {len(train) - len(held)} train / {len(held)} held-out "
        f"images, metric {sweep.metric} ({sweep.mode}), {base_cfg.train.epochs} epochs each")

    from coreg_ray.runs import start_ray

    ray, _ = start_ray(ray_address)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    sched = dict(sweep.scheduler or {})
    kind = sched.pop("type", "asha")
    epochs = base_cfg.train.epochs
    scheduler = FIFOScheduler() if kind == "fifo" else ASHAScheduler(
        time_attr="training_iteration", max_t=epochs, grace_period=sched.get("grace_period", 1),
        reduction_factor=sched.get("reduction_factor", 2))
    storage = sweep.storage_path or str((out / "ray").resolve())
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    name = sweep.name or time.strftime("tune-%Y%m%d-%H%M%S")

    tracker, callbacks = NoTracker(), []
    if mlflow and base_cfg.tracking.mlflow:  # a parent run for the sweep, a child per trial
        tracker = MLflowClientRun.open(
            base_cfg, name, tags={"coreg.sweep": "true", "output": str(out.resolve())},
            params={"sweep.metric": sweep.metric, "sweep.mode": sweep.mode,
                    "sweep.num_samples": sweep.num_samples,
                    "sweep.scheduler": json.dumps(sweep.scheduler),
                    "sweep.search": json.dumps(sweep.search)})
        callbacks.append(_mlflow_callback(tracker, base_cfg))

    res = {k.lower(): v for k, v in (sweep.resources or {}).items()}
    resources = {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)}
    data = [ray.put(train), ray.put(ann), ray.put(test) if test is not None else None, held]
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base_cfg.to_dict(), data=data,
                             checkpoint_every=sweep.checkpoint_every), resources)
    tuner = tune.Tuner(
        trainable, param_space=search_space(sweep.search),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials,
                                    search_alg=BasicVariantGenerator(random_state=sweep.seed)),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                  # trials checkpoint model.pt at the end (or every N epochs)
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=1 if sweep.checkpoint_every else None),
                                  verbose=0))
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException as exc:
        tracker.end(exc)
        raise
    wall = time.perf_counter() - t0

    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append({
            "trial_id": m.get("trial_id"), "params": {k: _plain(v) for k, v in (r.config or {}).items()},
            "epochs_run": int(m.get("training_iteration", 0)),
            "completed": int(m.get("training_iteration", 0)) >= epochs,
            "error": None if r.error is None else str(r.error).splitlines()[0][:300],
            **{k: m.get(k) for k in METRICS if k in m},
            "checkpoint": r.checkpoint, "path": r.path})
    ok = [t for t in trials if t["error"] is None and t.get(sweep.metric) is not None]
    if not ok:
        errs = [t["error"] for t in trials if t["error"]]
        err = CoregError(f"sweep: no trial reported {sweep.metric}"
                         + (f" (first error: {errs[0]})" if errs else ""))
        tracker.end(err)
        raise err
    pool = [t for t in ok if t["completed"]] or ok
    sign = 1 if sweep.mode == "max" else -1
    best = max(pool, key=lambda t: sign * t[sweep.metric])
    best_dir = out / "best"
    best_dir.mkdir(exist_ok=True)
    cfg_best = _resolved(base_cfg, best["params"])
    cfg_best.save(best_dir / "config.yaml")
    have_model = False
    if best["checkpoint"] is not None:
        with best["checkpoint"].as_directory() as d:
            if (Path(d) / "model.pt").exists():
                shutil.copyfile(Path(d) / "model.pt", best_dir / "model.pt")
                have_model = True
    ranking = {}
    if truth_key:
        for proxy in LABEL_FREE:
            pairs = [(t.get(proxy), t.get(truth_key)) for t in ok]
            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
            ranking[f"spearman_{proxy}_vs_{truth_key}"] = spearman(*zip(*pairs)) if pairs else None
        done = [t for t in ok if t["completed"]]
        for proxy in LABEL_FREE:
            pairs = [(t.get(proxy), t.get(truth_key)) for t in done if t.get(proxy) is not None]
            ranking[f"spearman_{proxy}_vs_{truth_key}_completed"] = \
                spearman(*zip(*pairs)) if len(pairs) >= 3 else None
    summary = {
        "metric": sweep.metric, "mode": sweep.mode, "num_samples": sweep.num_samples,
        "scheduler": sweep.scheduler, "resources": resources, "epochs": epochs,
        "wall_seconds": wall, "storage": f"{storage}/{name}", "truth": truth_key,
        "trials_completed": sum(t["completed"] for t in trials),
        "trials_stopped_early": sum((not t["completed"]) and t["error"] is None for t in trials),
        "trials_failed": sum(t["error"] is not None for t in trials),
        "best": {k: v for k, v in best.items() if k not in ("checkpoint",)},
        "best_model": str(best_dir / "model.pt") if have_model else None,
        "ranking": ranking,
        "trials": [{k: v for k, v in t.items() if k != "checkpoint"} for t in trials],
    }
    write_json_atomic(out / "sweep.json", summary)
    ms = {f"best_{k}": best[k] for k in METRICS if best.get(k) is not None}
    ms.update({k: v for k, v in ranking.items() if v is not None})
    ms.update(wall_seconds=wall, trials_completed=summary["trials_completed"],
              trials_stopped_early=summary["trials_stopped_early"])
    tracker.log_metrics(ms, step=0)
    tracker.set_tag("best_trial_id", str(best["trial_id"]))
    for f in (out / "sweep.json", best_dir / "config.yaml", best_dir / "model.pt"):
        tracker.log_artifact(f, "best" if f.parent == best_dir else None)
    child = callbacks[0].runs.get(best["trial_id"]) if callbacks else None
    if child:
        child.set_tag("best_trial", "true")
    if have_model:  # the best trial's student as an MLflow model on its run, as `train` logs one
        from coreg_ray.runs import log_run_model

        try:
            logged = log_run_model(child or tracker, best_dir / "model.pt", train, None,
                                   {"coreg.output": str(best_dir.resolve()),
                                    "trial_id": str(best["trial_id"])})
        except BaseException as exc:
            tracker.end(exc)
            raise
        if logged:
            summary.update(logged)
            write_json_atomic(out / "sweep.json", summary)
    tracker.end()
    if tracker.run_id is not None:
        summary["mlflow_parent_run_id"] = tracker.run_id
    return summary


def _plain(v):
    return v.item() if hasattr(v, "item") else v
