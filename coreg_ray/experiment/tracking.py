"""MLflow tracking of an experiment (driver side): one parent run per experiment output, a
child run per (setting, method, shots, seed) run; a run's model.pt is its child run's MLflow
model (`runs:/<child>/model`), optionally a version of a registered model. Both are
`MLflowClientRun`s, the `Tracker` every run logs through (`coreg_ray.distributed.tracking`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from coreg_ray.experiment.schema import Experiment

OUTPUT_TAG = "coreg.experiment_output"  # the parent run's tag: the experiment's output folder


# ============================================================================ MLflow (driver)
class _Tracker:
    """One parent run per experiment output (reused on relaunch) and a child run per run."""

    def __init__(self, exp: Experiment, cfg, out: Path, resume: bool, log):
        from coreg_ray.distributed.tracking import MLflowClientRun

        self.log, self.warned = log, False
        key = self.key = str(out.resolve())
        params = {"experiment.name": exp.name, "experiment.source": exp.source or "(dict)",
                  "experiment.settings": json.dumps([s.name for s in exp.settings],
                                                    ensure_ascii=False),
                  "experiment.methods": json.dumps(exp.methods),
                  "experiment.seeds": json.dumps(exp.seeds),
                  "experiment.shots": json.dumps(exp.shots),
                  "experiment.overrides": json.dumps(exp.overrides),
                  "experiment.resources": json.dumps(exp.resources)}
        # a relaunch (resume) continues the latest parent run of this output, RUNNING again
        self.run = MLflowClientRun.open(cfg, exp.name,
                                        {OUTPUT_TAG: key, "coreg.experiment": exp.name}, params,
                                        find_tag=OUTPUT_TAG if resume else None)
        self.parent, self.uri = self.run.run_id, self.run.uri

    def log_run(self, run: dict, rec: dict, history: list[dict], annotator: str,
                model: Path | None = None, train=None, register: str | None = None) -> str | None:
        """The child run of `run` (its id; None if logging failed); with `model` (model.pt) and
        `train` (its training table, for the input example) also its MLflow model, registered
        under `register` if given: `rec` gets `mlflow_model_uri` (and `registered_version`)."""
        try:
            return self._log_run(run, rec, history, annotator, model, train, register)
        except Exception as exc:  # tracking must not stop the experiment
            if not self.warned:
                self.log(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); "
                         "results.jsonl still has every run")
                self.warned = True
            return None

    def _log_run(self, run, rec, history, annotator, model=None, train=None, register=None):
        name = f"{rec['method']} · {rec['setting']} · seed {rec['seed']}" + \
            (f" · {rec['shots']}-shot" if rec["shots"] else "")
        flat = {"method": rec["method"], "setting": rec["setting"], "seed": rec["seed"],
                "shots": rec["shots"], "annotator": annotator,
                **{f"{s}.{k}": v for s, sec in run["config"].items() if s != "tracking"
                   for k, v in sec.items()},
                **{f"params.{k}": v for k, v in (run["params"] or {}).items()}}
        child = self.run.child(name, {"coreg.run_key": rec["key"],
                                      "coreg.fingerprint": rec["fingerprint"],
                                      "coreg.status": rec["status"]}, params=flat)
        child.log_history(history or [])
        final = {"test_accuracy": rec.get("test_accuracy"), "seconds": rec.get("seconds"),
                 "wall_seconds": rec.get("wall_seconds")}
        child.log_metrics({f"final_{k}" if k == "test_accuracy" and history else k: v
                           for k, v in final.items()}, step=int(rec.get("epochs") or 0))
        if rec["status"] in ("failed", "n/a"):
            child.set_tag("error" if rec["status"] == "failed" else "not_applicable",
                          str(rec.get("error"))[:5000])
        if model is not None:
            self._log_model(child, rec, model, train, register)
        # n/a is a finished answer (the method cannot apply), not a failure
        child.end(Exception if rec["status"] == "failed" else None)
        return child.run_id

    def _log_model(self, child, rec: dict, model: Path, train, register: str | None):
        from coreg_ray.mlflow_model import encode_png

        tags = {OUTPUT_TAG: self.key, "coreg.run_key": rec["key"],
                "method": rec["method"], "setting": rec["setting"], "seed": rec["seed"],
                "shots": rec["shots"], "test_accuracy": rec.get("test_accuracy")}
        try:
            logged = child.log_model(
                model, encode_png(train.images) if train is not None else None, register, tags)
        except Exception as exc:  # the run is still recorded (and its file kept): say which
            detail = " ".join(str(exc).split())[:300]
            self.log(f"warning: logging the MLflow model of {rec['key']} failed "
                     f"({type(exc).__name__}: {detail}); its file: {model}")
            return
        rec["mlflow_model_uri"] = logged["model_uri"]
        if "version" in logged:
            rec["registered_version"] = logged["version"]

    def mark_best(self, name: str) -> None:
        """Alias `best` of registered model `name`: this experiment's version (tag
        coreg.experiment_output) of highest test accuracy; nothing if it has none."""
        from coreg_ray.mlflow_model import registry_client

        try:
            client = registry_client(self.uri)
            versions = [v for v in client.search_model_versions(f"name = '{name}'")
                        if v.tags.get(OUTPUT_TAG) == self.key
                        and _finite(_float(v.tags.get("test_accuracy")))]
            if versions:
                best = max(versions, key=lambda v: (_float(v.tags["test_accuracy"]),
                                                    int(v.version)))
                client.set_registered_model_alias(name, "best", best.version)
                self.log(f"registered model {name}: alias best -> version {best.version} "
                         f"({best.tags.get('method')} · {best.tags.get('setting')} · seed "
                         f"{best.tags.get('seed')}, test accuracy "
                         f"{100 * _float(best.tags['test_accuracy']):.1f}%)")
        except Exception as exc:  # tracking must not stop the experiment
            self.log(f"warning: setting alias best of {name} failed ({type(exc).__name__}: {exc})")

    def finish(self, exc: BaseException | None, summary: dict, files: list[Path]):
        """The parent run's summary metrics and files; it ends FINISHED, or KILLED / FAILED
        for the exception that stopped the experiment."""
        try:
            self.run.log_metrics(summary, step=0)
            for f in files:
                self.run.log_artifact(f)
        finally:
            self.run.end(exc)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
