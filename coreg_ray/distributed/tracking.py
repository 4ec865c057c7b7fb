"""MLflow tracking for runs: resolved config as params, per-epoch metrics, final model.

Embedded default: a SQLite store `sqlite:///mlruns.db` in the working directory (MLflow 3.17's
plain file store refuses to work); `MLFLOW_TRACKING_URI` or `tracking.tracking_uri` override.
"""
from __future__ import annotations

import math
import os
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


class MLflowRun:
    """Context manager around one MLflow run; `epoch_callback` plugs into `CoReg(callbacks=...)`."""

    def __init__(self, cfg, run_name: str | None = None, tags: dict | None = None,
                 parent_run_id: str | None = None):
        self.mlflow = require("mlflow", "mlflow")
        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.tracking_uri)
        self.run_name = run_name or cfg.tracking.run_name
        self.tags = tags or {}
        self.parent = parent_run_id
        self.run = None

    def __enter__(self):
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
        self.mlflow.log_params({k: str(v) for k, v in self.cfg.flat().items()})
        return self

    def __exit__(self, exc_type, exc, tb):
        # Ctrl-C and SIGTERM (the CLI raises it as a KeyboardInterrupt) both mark the run KILLED
        killed = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        status = "FINISHED" if exc_type is None else ("KILLED" if killed else "FAILED")
        try:
            self.mlflow.end_run(status=status)
        finally:
            uri, env = self._saved
            self.mlflow.set_tracking_uri(uri)  # None: unset (it clears the variable too)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env
        return False

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict, step: int | None = None):
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def epoch_callback(self, epoch, stats, trainer=None):
        self.log_metrics(stats, step=epoch)

    def log_artifact(self, path: str | Path):
        if Path(path).exists():
            self.mlflow.log_artifact(str(path))
