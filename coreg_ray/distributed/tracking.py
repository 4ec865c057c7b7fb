"""Tracking for runs: one `Tracker` interface, MLflow or nothing.

- `NoTracker`: tracking off; every call does nothing.
- `MLflowRun`: a run of this process through MLflow's fluent API (`coreg-ray train`, the
  quickstart): resolved config as params, per-epoch metrics, final metrics and files.
- `MLflowClientRun`: a run written through `MlflowClient` by its id, so that other processes
  (Ray Train's rank 0, a Tune callback, a relaunch that finds the run again by a tag) log into it
  and no process-global MLflow setting is touched; `child(...)` makes a nested run.

Every tracker's `log_model(model_path, examples, register, tags)` logs a trained `model.pt` as
the run's MLflow model at artifact path `model` (`coreg_ray.mlflow_model`: a pyfunc taking
encoded images), and with `register` adds it to the Model Registry of the same store.

Embedded default: a SQLite store `sqlite:///mlruns.db` in the working directory (MLflow 3.17's
plain file store refuses to work); `MLFLOW_TRACKING_URI` or `tracking.tracking_uri` override.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from coreg_ray.errors import require

DEFAULT_URI = "sqlite:///mlruns.db"


def tracking_uri(configured: str | None = None) -> str:
    """The store to log to. A relative SQLite path is made absolute against the current
    directory: MLflow caches stores by URI string, so `sqlite:///mlruns.db` would otherwise keep
    pointing at the first directory it was opened in after a chdir (notebooks, tests)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _global_uri() -> str | None:
    """The URI set by `mlflow.set_tracking_uri` in this process (None if none was set). MLflow
    keeps it in a private module variable; read it defensively."""
    try:
        from mlflow.tracking._tracking_service import utils
        return getattr(utils, "_tracking_uri", None)
    except ImportError:  # pragma: no cover - layout changed: fall back to not restoring
        return None


def finite_metrics(metrics: dict) -> dict:
    """The numbers of `metrics` that can be logged: ints and floats (not bools), finite."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def end_status(exc: BaseException | type | None) -> str:
    """FINISHED; KILLED for Ctrl-C and SIGTERM (the CLI raises it as a KeyboardInterrupt);
    FAILED for any other exception (an instance or its type)."""
    if exc is None:
        return "FINISHED"
    kind = exc if isinstance(exc, type) else type(exc)
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"


class Tracker:
    """Where a run's metrics and files go. `start()` (returns the tracker) and `end(exc)`, or a
    `with` block: the run ends FINISHED, or KILLED / FAILED for the exception that stopped it.
    `epoch_callback` plugs into a trainer's `callbacks`. A missing file is not logged."""

    run_id: str | None = None
    uri: str | None = None  # the MLflow store

    def start(self) -> "Tracker":
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.end(exc_type)
        return False

    def end(self, exc: BaseException | type | None = None) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        raise NotImplementedError

    def set_tag(self, key: str, value: str) -> None:
        raise NotImplementedError

    def log_model(self, model_path: str | Path, examples: list[bytes] | None = None,
                  register: str | None = None, tags: dict | None = None) -> dict | None:
        """`model_path` (a coreg-ray model.pt) as this run's MLflow model `runs:/<id>/model`,
        `examples` (encoded images) its input example; `register`: also a new version of that
        registered model, `tags` on the version. Returns {"model_uri", "registered_model",
        "version"} (None when nothing is tracked)."""
        if self.run_id is None:
            return None
        from coreg_ray.mlflow_model import log_student

        return log_student(self.uri, self.run_id, model_path, examples, register, tags)

    def epoch_callback(self, epoch, stats, trainer=None) -> None:
        self.log_metrics(stats, step=epoch)

    def log_history(self, history: list[dict]) -> None:
        """A finished run's per-epoch stats (`trainer.history`) at once, each row at its
        `epoch` as the step: what `epoch_callback` logs as the run goes."""
        for row in history:
            self.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                             step=int(row.get("epoch", 0)))


class NoTracker(Tracker):
    """Tracking off: nothing is logged (`run_id` is None)."""

    def end(self, exc=None) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_tag(self, key, value) -> None:
        pass

    def log_model(self, model_path, examples=None, register=None, tags=None) -> None:
        return None


class MLflowRun(Tracker):
    """One MLflow run of this process (MLflow's fluent API), begun by `start()`."""

    def __init__(self, cfg, run_name: str | None = None, tags: dict | None = None,
                 parent_run_id: str | None = None):
        self.mlflow = require("mlflow", "mlflow")
        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.tracking_uri)
        self.run_name = run_name or cfg.tracking.run_name
        self.tags = tags or {}
        self.parent = parent_run_id
        self.run = None

    def start(self) -> "MLflowRun":
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # set_tracking_uri is process-global and also writes MLFLOW_TRACKING_URI into the
        # environment: remember both and put them back on exit, so a run never redirects the
        # caller's later mlflow calls (or subprocesses) to its store.
        self._saved = (_global_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
        self.mlflow.set_tracking_uri(self.uri)
        self.mlflow.set_experiment(self.cfg.tracking.experiment)
        kwargs = {"run_name": self.run_name, "tags": self.tags}
        if self.parent:
            kwargs["parent_run_id"] = self.parent
            kwargs["nested"] = True
        self.run = self.mlflow.start_run(**kwargs)
        from coreg_ray.data.location import redact  # a URI's user:secret@ never reaches MLflow

        self.mlflow.log_params({k: redact(v) for k, v in self.cfg.flat().items()})
        return self

    def end(self, exc=None) -> None:
        try:
            self.mlflow.end_run(status=end_status(exc))
        finally:
            uri, env = self._saved
            self.mlflow.set_tracking_uri(uri)  # None: unset (it clears the variable too)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict, step: int | None = None):
        clean = finite_metrics(metrics)
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        if Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.mlflow.set_tag(key, value)


class MLflowClientRun(Tracker):
    """One MLflow run written through `MlflowClient` by id; it is RUNNING until `end`.

    `open(cfg, ...)` creates it in `cfg.tracking.experiment` (or, with `find_tag`, first looks
    for the latest run whose tag `find_tag` has the value given in `tags`, and marks it RUNNING
    again: a relaunch continues its run); `attach(run_id, uri)` logs into an existing run from
    another process; `child(...)` creates a nested run in the same experiment."""

    def __init__(self, client, run_id: str, uri: str, experiment_id: str | None = None):
        self.client, self.run_id, self.uri, self.experiment_id = client, run_id, uri, experiment_id

    @classmethod
    def open(cls, cfg, run_name: str | None, tags: dict, params: dict | None = None,
             find_tag: str | None = None) -> "MLflowClientRun":
        require("mlflow", "mlflow")
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        uri = tracking_uri(cfg.tracking.tracking_uri)  # absolute: workers have another cwd
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        if find_tag is not None:
            found = client.search_runs([exp_id], filter_string=f"tags.`{find_tag}` = '{tags[find_tag]}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id, uri, exp_id)
        run = cls(client, client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id,
                  uri, exp_id)
        if params:
            run.log_params(params)
        return run

    @classmethod
    def attach(cls, run_id: str, uri: str) -> "MLflowClientRun":
        from mlflow.tracking import MlflowClient

        return cls(MlflowClient(uri), run_id, uri)

    def child(self, run_name: str, tags: dict, params: dict | None = None) -> "MLflowClientRun":
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"mlflow.parentRunId": self.run_id, **tags})
        child = MLflowClientRun(self.client, run.info.run_id, self.uri, self.experiment_id)
        if params:
            child.log_params(params)
        return child

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        from coreg_ray.data.location import redact  # a URI's user:secret@ never reaches MLflow

        ps = [Param(k, redact(v)[:6000]) for k, v in params.items()]  # MLflow's length limit
        for i in range(0, len(ps), 100):
            self.client.log_batch(self.run_id, params=ps[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._log_steps([(step or 0, metrics)])

    def log_history(self, history: list[dict]) -> None:
        self._log_steps([(int(row.get("epoch", 0)),
                          {k: v for k, v in row.items() if k != "epoch"}) for row in history])

    def _log_steps(self, rows: list[tuple[int, dict]]) -> None:
        """(step, metrics) rows in as few requests as MLflow allows (1,000 metrics each)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, v, ts, step) for step, metrics in rows
              for k, v in finite_metrics(metrics).items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, exc=None) -> None:
        self.client.set_terminated(self.run_id, end_status(exc))
