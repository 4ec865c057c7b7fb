"""MLflowRun must not redirect the caller's later mlflow calls (a process-global setting)."""
import os

import pytest

from coreg_ray.config import Config
from coreg_ray.distributed.tracking import MLflowRun, _global_uri

mlflow = pytest.importorskip("mlflow")


def test_mlflow_run_restores_the_tracking_uri_and_env(tmp_path, monkeypatch):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    # nothing set in-process (an earlier test may have set it; unsetting also clears the
    # variable, so set the variable after), the env variable decides
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    cfg = Config.load(overrides=[f"tracking.tracking_uri=sqlite:///{tmp_path / 'run.db'}"])
    with pytest.raises(RuntimeError):
        with MLflowRun(cfg, run_name="fails") as run:
            assert mlflow.get_tracking_uri().endswith("run.db")
            run.log_metrics({"x": 1.0}, step=0)
            raise RuntimeError("boom")
    assert _global_uri() is None
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert mlflow.get_tracking_uri() == elsewhere
    # the run itself went to the configured store, marked as failed
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["x"] == 1.0
