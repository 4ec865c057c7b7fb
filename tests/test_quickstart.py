"""The README's main job, shortened: every row is produced, runs land in MLflow."""
import json

import pytest


@pytest.mark.slow
def test_quickstart_short(tmp_path, monkeypatch, mlflow_store):
    from coreg_ray.quickstart import run_quickstart

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = []
    res = run_quickstart(tmp_path / "qs", epochs=3, seed=0, mlflow=True, log=lines.append)
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["annotator (template ensemble)", "warm-up loss only", "Co-Reg",
                       "true labels (ceiling)"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in res["rows"])
    # the annotator row is the simulated annotator's own test-split ensemble accuracy
    assert res["rows"][0]["test_accuracy"] == pytest.approx(res["annotator_test"]["ensemble_accuracy"])
    assert "| Co-Reg |" in (tmp_path / "qs" / "summary.md").read_text()
    assert json.loads((tmp_path / "qs" / "summary.json").read_text())["rows"][2]["method"] == "Co-Reg"
    assert any("stand-in" in line for line in lines)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)  # the default store: mlruns.db here
    exp = client.get_experiment_by_name("coreg-ray")
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id]))
    assert names == ["quickstart-coreg", "quickstart-true_labels", "quickstart-warmup"]
    # the ceiling trained on the true labels: its MLflow run and folder are its own
    assert (tmp_path / "qs" / "true_labels" / "model.pt").is_file()
