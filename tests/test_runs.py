"""The run layer (issue 13, "one run layer"): every caller runs a method through
`coreg_ray.methods.run_method`, restoring is an argument (`initial_state`), not a subclass, and
the experiment's MLflow tracker is built on `MLflowClientRun`. No Ray here: the Ray Train, Tune
and experiment paths end to end are in test_distributed.py / test_experiment.py."""
import copy
import json

import numpy as np
import pytest
import torch

from coreg_ray.errors import CoregError
from coreg_ray.methods import run_method
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def small(digits_synthetic):
    train, ann, test = digits_synthetic
    sub = np.arange(300)
    return train.subset(sub), ann.subset(sub), test


def _same_nets(a, b):
    for x, y in zip(a.raw_nets, b.raw_nets):
        for (k, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
            assert torch.equal(p, q), k


def test_initial_state_replays_exactly_without_a_folder(small):
    """What a Ray Train worker does: a state taken in memory after epoch 1 (a reported
    checkpoint) continues to the same networks as a straight run; a state of the last epoch
    trains nothing."""
    train, ann, _ = small
    cfg = lambda: tiny_config(**{"train.epochs": 4, "train.warmup_epochs": 2,  # noqa: E731
                                 "coreg.feature_delay": 0})
    seen = {}

    def keep(epoch, stats, trainer):  # a copy, as a reported (saved) checkpoint is
        seen[epoch] = trainer
        if epoch in (1, 3):
            seen["state" if epoch == 1 else "last"] = copy.deepcopy(trainer.checkpoint_state(epoch))

    straight = run_method("coreg", cfg(), train, ann, callbacks=[keep])
    trainer = seen[3]
    epochs = []
    resumed = run_method("coreg", cfg(), train, ann, initial_state=seen["state"],
                         callbacks=[lambda e, s, t: epochs.append((e, t))])
    assert [e for e, _ in epochs] == [2, 3]
    untimed = lambda hs: [{k: v for k, v in h.items() if k != "epoch_seconds"}  # noqa: E731
                          for h in hs]
    assert untimed(resumed["history"]) == untimed(straight["history"])  # every epoch, once
    _same_nets(trainer, epochs[-1][1])
    assert torch.equal(trainer.prototypes, epochs[-1][1].prototypes)
    calls = []
    done = run_method("coreg", cfg(), train, ann, initial_state=seen["last"],
                      callbacks=[lambda *a: calls.append(a)])
    assert calls == [] and done["history"] == seen["last"]["history"]


def test_a_restored_state_is_checked_and_others_refuse_it(small):
    train, ann, _ = small
    cfg = tiny_config(**{"train.epochs": 2, "train.warmup_epochs": 1})
    state = {}
    run_method("coreg", cfg, train, ann,
               callbacks=[lambda e, s, t: state.update(t.checkpoint_state(e))])
    with pytest.raises(CoregError, match="checkpoint was made on other data"):
        run_method("coreg", cfg, train.subset(np.arange(200)), ann.subset(np.arange(200)),
                   initial_state=state)
    with pytest.raises(CoregError, match="baselines do not resume"):
        run_method("cc", cfg, train, ann, initial_state=state)
    with pytest.raises(CoregError, match="nothing to resume"):
        run_method("zero_shot", cfg, train, ann, initial_state=state)


def test_execute_runs_coreg_and_named_methods_through_one_path(small, tmp_path):
    """`execute`: Co-Reg keeps its checkpoint and metrics.json without a method key; a named
    method's metrics.json starts with its name and ends with its own keys."""
    from coreg_ray.runs import RunSpec, execute

    train, ann, test = small
    cfg = tiny_config(**{"train.epochs": 1, "train.warmup_epochs": 1})
    m = execute(RunSpec(train, ann, tmp_path / "c", config=cfg, test_images=test,
                        progress=False))
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["checkpoint.pt", "config.yaml", "curves.png", "metrics.json", "model.pt"]
    assert list(m)[0] == "test_accuracy" and "method" not in m and m["epochs"] == 1
    assert json.loads((tmp_path / "c" / "metrics.json").read_text()) == m
    b = execute(RunSpec(train, ann, tmp_path / "b", config=cfg, test_images=test, method="cc",
                        progress=False))
    assert list(b)[:2] == ["method", "test_accuracy"] and b["method"] == "cc"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.yaml", "curves.png", "metrics.json"]
    with pytest.raises(CoregError, match="--resume continues Co-Reg training only"):
        execute(RunSpec(train, ann, tmp_path / "b", method="cc", resume=True))


def test_execute_applies_coreg_params_and_records_them(small, tmp_path):
    """Co-Reg's `params` (dotted config keys) reach the run and its config.yaml, as a
    variant's do (they were dropped for method coreg); a key that is not one is one line."""
    from coreg_ray.config import Config
    from coreg_ray.runs import RunSpec, execute

    train, ann, test = small
    cfg = tiny_config(**{"train.epochs": 2, "train.warmup_epochs": 1})
    m = execute(RunSpec(train, ann, tmp_path / "p", config=cfg, test_images=test,
                        params={"train.epochs": 1, "coreg.lambda_u": 7.5}, progress=False))
    assert m["epochs"] == 1
    saved = Config.load(tmp_path / "p" / "config.yaml")
    assert saved.train.epochs == 1 and saved.coreg.lambda_u == 7.5
    with pytest.raises(CoregError, match="coreg: Co-Reg variants take dotted config keys"):
        execute(RunSpec(train, ann, tmp_path / "q", config=tiny_config(), params={"lr": 1},
                        progress=False))
    assert not (tmp_path / "q").exists()


def test_experiment_tracker_logs_through_client_runs(tmp_path, mlflow_store):
    """The experiment's parent and child runs: names, tags, params, per-epoch and final
    metrics, FAILED / FINISHED; a relaunch continues the same parent."""
    from mlflow.tracking import MlflowClient

    from coreg_ray.experiment import Experiment
    from coreg_ray.experiment.tracking import _Tracker

    exp = Experiment.load({
        "name": "t", "data": {"images": "digits:train", "test_images": "digits:test"},
        "settings": [{"name": "s", "synthetic": {"q": 0.3, "eta": 0.1, "seed": 0}}],
        "methods": ["cc"], "seeds": [0], "config": {"tracking": {"tracking_uri": mlflow_store}}})
    cfg = exp.run_config(exp.settings[0])
    run = exp.runs()[0]
    tracker = _Tracker(exp, cfg, tmp_path / "out", resume=True, log=print)
    history = [{"epoch": 0, "phase": "cc", "loss": 1.5, "lr": 0.1},
               {"epoch": 1, "phase": "cc", "loss": 1.0, "lr": 0.05, "test_accuracy": 0.5}]
    rec = {"key": run["key"], "fingerprint": run["fingerprint"], "method": "cc", "setting": "s",
           "seed": 0, "shots": 0, "status": "ok", "test_accuracy": 0.5, "seconds": 2.0,
           "wall_seconds": 3.0, "epochs": 2}
    cid = tracker.log_run(run, rec, history, "synthetic")
    failed = tracker.log_run(run, {**rec, "status": "failed", "test_accuracy": None,
                                   "error": "RuntimeError: boom"}, [], "synthetic")
    tracker.finish(None, {"runs": 1, "ran_now": 1}, [])
    client = MlflowClient(mlflow_store)
    parent = client.get_run(tracker.parent)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "t"
    assert parent.data.tags["coreg.experiment_output"] == str((tmp_path / "out").resolve())
    assert parent.data.params["experiment.methods"] == '["cc"]'
    assert parent.data.metrics == {"runs": 1.0, "ran_now": 1.0}
    child = client.get_run(cid)
    assert child.info.run_name == "cc · s · seed 0" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == tracker.parent
    assert child.data.tags["coreg.status"] == "ok"
    assert child.data.params["method"] == "cc" and child.data.params["annotator"] == "synthetic"
    assert "tracking.tracking_uri" not in child.data.params
    assert [(m.step, m.value) for m in client.get_metric_history(cid, "loss")] == [(0, 1.5),
                                                                                  (1, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(cid, "final_test_accuracy")] \
        == [(2, 0.5)]
    assert "test_accuracy" in child.data.metrics and "phase" not in child.data.metrics
    bad = client.get_run(failed)
    assert bad.info.status == "FAILED" and bad.data.tags["error"] == "RuntimeError: boom"
    assert set(bad.data.metrics) == {"seconds", "wall_seconds"}
    again = _Tracker(exp, cfg, tmp_path / "out", resume=True, log=print)
    assert again.parent == tracker.parent
    assert client.get_run(tracker.parent).info.status == "RUNNING"
    again.finish(KeyboardInterrupt(), {}, [])
    assert client.get_run(tracker.parent).info.status == "KILLED"
