"""MLflow tracking of an experiment (driver side): one parent run per experiment output, a
child run per (setting, method, shots, seed) run; a run's model.pt is its child run's MLflow
model (`runs:/<child>/model`), optionally a version of a registered model."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from coreg_ray.experiment.schema import Experiment


# ============================================================================ MLflow (driver)
class _Tracker:
    """One parent run per experiment output (reused on relaunch) and a child run per run."""

    def __init__(self, exp: Experiment, cfg, out: Path, resume: bool, log):
        from coreg_ray.distributed.tracking import tracking_uri
        from coreg_ray.errors import require

        require("mlflow", "mlflow")
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.log, self.warned = log, False
        self.uri = tracking_uri(cfg.tracking.tracking_uri)
        self.client = MlflowClient(self.uri)
        exp_obj = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.exp_id = exp_obj.experiment_id if exp_obj else \
            self.client.create_experiment(cfg.tracking.experiment)
        key = self.key = str(out.resolve())
        found = []
        if resume:
            found = self.client.search_runs(
                [self.exp_id], filter_string=f"tags.`coreg.experiment_output` = '{key}'",
                max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.parent = found[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            from mlflow.entities import Param

            run = self.client.create_run(self.exp_id, run_name=exp.name,
                                         tags={"coreg.experiment_output": key,
                                               "coreg.experiment": exp.name})
            self.parent = run.info.run_id
            ps = {"experiment.name": exp.name, "experiment.source": exp.source or "(dict)",
                  "experiment.settings": json.dumps([s.name for s in exp.settings], ensure_ascii=False),
                  "experiment.methods": json.dumps(exp.methods), "experiment.seeds": json.dumps(exp.seeds),
                  "experiment.shots": json.dumps(exp.shots),
                  "experiment.overrides": json.dumps(exp.overrides),
                  "experiment.resources": json.dumps(exp.resources)}
            self.client.log_batch(self.parent, params=[Param(k, v[:6000]) for k, v in ps.items()])

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
        from mlflow.entities import Metric, Param

        name = f"{rec['method']} · {rec['setting']} · seed {rec['seed']}" + \
            (f" · {rec['shots']}-shot" if rec["shots"] else "")
        child = self.client.create_run(self.exp_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent, "coreg.run_key": rec["key"],
            "coreg.fingerprint": rec["fingerprint"], "coreg.status": rec["status"]})
        cid = child.info.run_id
        flat = {"method": rec["method"], "setting": rec["setting"], "seed": rec["seed"],
                "shots": rec["shots"], "annotator": annotator,
                **{f"{s}.{k}": v for s, sec in run["config"].items() if s != "tracking"
                   for k, v in sec.items()},
                **{f"params.{k}": v for k, v in (run["params"] or {}).items()}}
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(cid, params=params[i:i + 100])
        ts = int(time.time() * 1000)
        ms = []
        for h in history or []:
            step = int(h.get("epoch", 0))
            ms += [Metric(k, float(v), ts, step) for k, v in h.items()
                   if k != "epoch" and _finite(v)]
        final = {"test_accuracy": rec.get("test_accuracy"), "seconds": rec.get("seconds"),
                 "wall_seconds": rec.get("wall_seconds")}
        ms += [Metric(f"final_{k}" if k == "test_accuracy" and history else k, float(v), ts,
                      int(rec.get("epochs") or 0)) for k, v in final.items() if _finite(v)]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(cid, metrics=ms[i:i + 1000])
        if rec["status"] in ("failed", "n/a"):
            self.client.set_tag(cid, "error" if rec["status"] == "failed" else "not_applicable",
                                str(rec.get("error"))[:5000])
        if model is not None:
            self._log_model(cid, rec, model, train, register)
        # n/a is a finished answer (the method cannot apply), not a failure
        self.client.set_terminated(cid, "FAILED" if rec["status"] == "failed" else "FINISHED")
        return cid

    def _log_model(self, cid: str, rec: dict, model: Path, train, register: str | None):
        from coreg_ray.distributed.tracking import MLflowClientRun
        from coreg_ray.mlflow_model import encode_png

        tags = {"coreg.experiment_output": self.key, "coreg.run_key": rec["key"],
                "method": rec["method"], "setting": rec["setting"], "seed": rec["seed"],
                "shots": rec["shots"], "test_accuracy": rec.get("test_accuracy")}
        try:
            logged = MLflowClientRun(self.client, cid, self.uri, self.exp_id).log_model(
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
                        if v.tags.get("coreg.experiment_output") == self.key
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

    def finish(self, status: str, summary: dict, files: list[Path]):
        from mlflow.entities import Metric

        try:
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, 0) for k, v in summary.items() if _finite(v)]
            if ms:
                self.client.log_batch(self.parent, metrics=ms)
            for f in files:
                if f.exists():
                    self.client.log_artifact(self.parent, str(f))
        finally:
            self.client.set_terminated(self.parent, status)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
