"""`coreg-ray experiment`: the table arithmetic (pure), experiment-file validation (one-line
errors), and one real run of the digits smoke experiment on Ray with MLflow (plus a relaunch)."""
import json
import math
import time
from pathlib import Path

import pytest
import yaml

from coreg_ray.errors import CoregError
from coreg_ray.experiment import Experiment, format_table
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ format_table (hand-made rows)
def _row(method, setting, seed, acc=None, shots=0, failed=False):
    r = {"method": method, "setting": setting, "seed": seed, "shots": shots}
    if failed:
        r.update(status="failed", test_accuracy=None, error="RuntimeError: boom")
    else:
        r.update(status="ok", test_accuracy=acc)
    return r


def test_format_table_mean_std_bold_failed_and_missing():
    rows = [_row("cc", "A", 0, 0.40), _row("cc", "A", 1, 0.42),  # 41.0 ± 1.414
            _row("coreg", "A", 0, 0.50), _row("coreg", "A", 1, 0.46),  # 48.0 ± 2.828
            _row("cc", "B", 0, 0.70), _row("cc", "B", 1, failed=True),  # 70.0 (1 failed)
            _row("coreg", "B", 0, failed=True), _row("coreg", "B", 1, failed=True),
            _row("m3", "A", 0, 0.30)]  # m3/B: missing
    t = format_table(rows, ["cc", "coreg", "m3"], ["A", "B"], labels={"coreg": "Ours"},
                     expected_seeds=2, title="t")
    assert t.columns == ["A", "B"] and t.rows[:2] == ["CC", "Ours"]
    cc, ours = t.cells[("CC", "A")], t.cells[("Ours", "A")]
    assert cc["mean"] == pytest.approx(41.0) and cc["std"] == pytest.approx(math.sqrt(2))
    assert ours["mean"] == pytest.approx(48.0) and ours["std"] == pytest.approx(2 * math.sqrt(2))
    assert cc["text"] == "41.0 ± 1.4" and ours["text"] == "48.0 ± 2.8"
    assert t.cells[("CC", "B")]["text"] == "70.0 (1 failed)"
    assert t.cells[("Ours", "B")]["text"] == "failed"
    assert t.cells[("m3", "A")]["text"] == "30.0 (n=1)"  # fewer seeds than expected
    assert t.cells[("m3", "B")]["text"] == "–"
    assert t.best == {("Ours", "A"), ("CC", "B")}  # failed and missing cells never win
    md = t.markdown
    assert "| Ours | **48.0 ± 2.8** | failed |" in md
    assert "| CC | 41.0 ± 1.4 | **70.0 (1 failed)** |" in md
    assert "| m3 | 30.0 (n=1) | – |" in md
    assert md.startswith("# t\n")
    assert t.csv.splitlines()[0] == "method,A,B" and "Ours,48.0 ± 2.8,failed" in t.csv


def test_format_table_marks_not_applicable_cells():
    rows = [_row("kd_unsup", "VLM", 0, 0.6), _row("cc", "synthetic", 0, 0.5),
            {**_row("kd_unsup", "synthetic", 0, failed=True), "status": "n/a"}]
    t = format_table(rows, ["kd_unsup", "cc"], ["VLM", "synthetic"])
    kd = t.rows[0]
    assert t.cells[(kd, "synthetic")]["text"] == "n/a"
    assert t.cells[(kd, "synthetic")]["failed"] == 0
    assert t.best == {(kd, "VLM"), ("CC", "synthetic")}


def test_format_table_ties_bold_by_displayed_value_and_stat_rows():
    rows = [_row("a", "S", 0, 0.50001), _row("b", "S", 0, 0.49996), _row("c", "S", 0, 0.2)]
    t = format_table(rows, stats={"S": {"partial_accuracy": 0.9123, "avg_candidates": 1.5}})
    assert t.best == {("a", "S"), ("b", "S")}  # both show 50.0
    assert t.rows[:2] == ["Partial Acc. (train)", "Avg. num"] and t.stat_rows == 2
    assert t.grid[0] == ["91.2"] and t.grid[1] == ["1.50"]
    assert "| *Avg. num* | 1.50 |" in t.markdown  # statistics rows are never bold


def test_format_table_few_shot_layouts():
    rows = [_row("zero_shot", "S", 0, 0.6)]
    for k, acc in ((1, 0.7), (4, 0.8)):
        rows += [_row("coreg", "S", s, acc + 0.01 * s, shots=k) for s in (0, 1)]
        rows += [_row("cc", "S", s, acc - 0.1, shots=k) for s in (0, 1)]
    # one setting, several shots: the shots are the columns; zero_shot fills every column
    t = format_table(rows, ["zero_shot", "cc", "coreg"], ["S"], [1, 4])
    assert t.columns == ["1-shot", "4-shot"]
    assert [t.cells[("Co-Reg", c)]["text"] for c in t.columns] == ["70.5 ± 0.7", "80.5 ± 0.7"]
    assert t.cells[("Zero-shot (annotator, test)", "4-shot")]["text"] == "60.0"
    assert t.best == {("Co-Reg", "1-shot"), ("Co-Reg", "4-shot")}
    # the paper's Table I layout: settings as columns, "method k-shot" rows
    t = format_table(rows, ["zero_shot", "cc", "coreg"], ["S"], [1, 4], columns="settings")
    assert t.rows == ["Zero-shot (annotator, test)", "CC 1-shot", "Co-Reg 1-shot",
                      "CC 4-shot", "Co-Reg 4-shot"]
    assert t.best == {("Co-Reg 4-shot", "S")}


# ------------------------------------------------------------------ experiment-file validation
def _smoke() -> dict:
    return yaml.safe_load((ROOT / "configs" / "exp-digits-smoke.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(methods=["cc", "no_such_method"]), "unknown method(s) no_such_method"),
    (lambda e: e["data"].update(images="/nope/train.parquet"), "data.images: not found: /nope"),
    (lambda e: e["settings"].append({"name": "x"}), "setting 'x': give exactly one of"),
    (lambda e: e["settings"].append({"name": "y", "synthetic": {"q": 2, "eta": 0}}),
     "synthetic.q must be a number in [0, 1]"),
    (lambda e: e["settings"].append({"name": "z", "annotations": "/nope/ann.parquet"}),
     "annotations: not found"),
    (lambda e: e["settings"].append({"name": "q=0.3, η=0.1", "synthetic": {"q": 0, "eta": 0}}),
     "duplicate name"),
    (lambda e: e["settings"][0].update(bogus=1), "unknown key(s) bogus"),
    (lambda e: e["settings"].append({"name": "v", "simulated_vlm": {"features": "edges"}}),
     "simulated_vlm.features must be pixels or patches"),
    (lambda e: e.update(settings=[]), "settings must be a non-empty list"),
    (lambda e: e.update(seeds=[0, "one"]), "seeds must be a non-empty list of integers"),
    (lambda e: e["config"]["train"].update(epochz=3), "train.epochz' does not exist"),
    (lambda e: e.update(params={"dividemix": {"x": 1}}), "'dividemix' is not in methods"),
    (lambda e: e.update(params={"coreg": {"beta1": 1}}), "take dotted config keys"),
    (lambda e: e.update(params={"coreg": {"coreg.beta9": 1}}), "params.coreg: config key 'coreg.beta9' does not exist"),
    (lambda e: e.update(resources={"gpus": 1}), "resources: keys are"),
    (lambda e: e.update(extra=1), "unknown key(s) extra"),
])
def test_experiment_errors_are_one_line(change, message):
    exp = _smoke()
    change(exp)
    with pytest.raises(CoregError) as info:
        Experiment.load(exp)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_a_bad_experiment_in_one_line(tmp_path, capsys):
    from coreg_ray.cli import main

    exp = _smoke()
    exp["methods"] = ["zero_shot", "dividemixx"]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp, allow_unicode=True))
    assert main(["experiment", "--config", str(tmp_path / "e.yaml"), "--output",
                 str(tmp_path / "o"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coreg-ray: error:") and "dividemixx" in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing started, nothing written
    assert main(["experiment", "--config", str(tmp_path / "missing.yaml"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_every_shipped_experiment_file_parses():
    """The paper templates point at placeholder data and may name baselines still being
    written: check their structure only (strict=False)."""
    files = sorted((ROOT / "configs").glob("exp-*.yaml"))
    assert len(files) >= 5
    for f in files:
        exp = Experiment.load(f, strict=False)
        runs = exp.runs()
        assert runs and len({r["key"] for r in runs}) == len(runs), f
    smoke = Experiment.load(ROOT / "configs" / "exp-digits-smoke.yaml")  # strict: runs here
    assert len(smoke.runs()) == 12


def test_a_config_key_added_later_does_not_rerun_recorded_runs():
    """Runs recorded before data.strong_view existed still match while it holds "auto"
    (the behaviour they were run with); another value is a different run."""
    from coreg_ray.experiment.schema import _fingerprint

    def legacy(run, exp):
        cfg = {k: v for k, v in run["config"].items() if k != "tracking"}
        cfg["data"] = {k: v for k, v in cfg["data"].items()
                       if k not in ("strong_view", "placement")}  # both added later
        cfg["train"] = {k: v for k, v in cfg["train"].items() if k != "sync_batchnorm"}  # too
        s = next(s for s in exp.settings if s.name == run["setting"])
        return _fingerprint(run["method"], [s.kind, s.spec, s.test_annotations, s.data], cfg,
                            run["params"])

    exp = Experiment.load(_smoke())
    run = next(r for r in exp.runs() if r["method"] == "coreg")
    old = legacy(run, exp)
    assert old != run["fingerprint"] and old in run["accepts"] and run["fingerprint"] in run["accepts"]
    changed = _smoke()
    changed["config"].setdefault("data", {})["strong_view"] = "grayscale"
    exp2 = Experiment.load(changed)
    run2 = next(r for r in exp2.runs() if r["method"] == "coreg")
    assert legacy(run2, exp2) == old and old not in run2["accepts"]


def test_the_recorded_100_epoch_rows_still_count_as_done():
    """benchmarks/scripts/gtsrb_cpu_100.sh resumes its table across sessions (1.5 h a Co-Reg row
    on 2 cores): a config key added since its rows were recorded must be in ADDED_KEYS, or every
    row reruns (train.sync_batchnorm once did that)."""
    res = ROOT / "benchmarks" / "results" / "gtsrb-cpu-100" / "results.jsonl"
    runs = {r["key"]: r for r in
            Experiment.load(ROOT / "configs" / "exp-gtsrb-cpu-100.yaml", strict=False).runs()}
    recs = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
    done = [r for r in recs if r["key"] in runs and r["status"] == "ok"]
    assert len(done) >= 12
    stale = [r["key"] for r in done if r["fingerprint"] not in runs[r["key"]]["accepts"]]
    assert not stale, f"would rerun: {stale}"


# ------------------------------------------------------------------ a real run on Ray + MLflow
@pytest.mark.slow
@pytest.mark.ray
def test_digits_smoke_experiment_on_ray_with_mlflow_and_relaunch(ray_runtime, mlflow_store,
                                                                 tmp_path, monkeypatch):
    import mlflow

    from coreg_ray.experiment import run_experiment

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = _smoke()
    exp["data"]["limit"] = 300
    out = tmp_path / "exp"
    lines = []
    t0 = time.perf_counter()
    table = run_experiment(exp, out, overrides=["train.epochs=1", "train.warmup_epochs=1"],
                           parallel=2, log=lines.append)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and {r["status"] for r in recs} == {"ok", "n/a"}
    # synthetic sets have no annotator to measure: zero_shot is n/a there, not failed
    assert {(r["setting"], r["method"]) for r in recs if r["status"] == "n/a"} == {
        ("q=0.3, η=0.1", "zero_shot")}
    assert {(r["setting"], r["method"], r["seed"]) for r in recs} == {
        (s, m, seed) for s in ("q=0.3, η=0.1", "simulated VLM")
        for m in ("zero_shot", "cc", "coreg") for seed in (0, 1)}
    for r in recs:
        if r["status"] == "n/a":
            assert r["test_accuracy"] is None and "candidate sets only" in r["error"]
            continue
        assert 0 <= r["test_accuracy"] <= 1 and r["device"].startswith("CPU")
        assert r["mlflow_run_id"] and r["fingerprint"]
        if r["method"] != "zero_shot":
            assert [h["epoch"] for h in r["test_history"]] == [0] and r["epochs"] == 1
    # one progress line per finished run
    progress = [x for x in lines if x.startswith("[")]
    assert len(progress) == 12 and progress[-1].startswith("[12/12]")
    # the table: each column's best in bold, zero-shot = the annotator itself
    md = (out / "table.md").read_text()
    # table.md is the table's Markdown with its bar chart (table.png) and the per-epoch test
    # accuracy of every row (curves.png) embedded under the table, in that order
    from coreg_ray.plots import embed
    for png in ("table.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md == embed(embed(table.markdown, "curves.png", "per-epoch test accuracy"),
                       "table.png", "results chart")
    assert md.index("(table.png)") < md.index("(curves.png)")
    assert "backbone: mlp; 1 epoch (warm-up 1)" in md
    assert "simulated VLM annotator — a stand-in, not a VLM" in md
    assert "| Method | q=0.3, η=0.1 | simulated VLM |" in md
    assert "| Zero-shot (annotator, test) | n/a |" in md
    for col in table.columns:
        best = max(c["mean"] for (row, cc), c in table.cells.items()
                   if cc == col and c["mean"] is not None)
        bold = [row for row, cc in table.best if cc == col]
        assert bold and all(round(table.cells[(r, col)]["mean"], 1) == round(best, 1) for r in bold)
        assert f"**{table.cells[(bold[0], col)]['text']}**" in md
    zs = [r["test_accuracy"] for r in recs if r["method"] == "zero_shot"
          and r["setting"] == "simulated VLM"]
    assert zs[0] == zs[1]  # the annotator does not depend on the run's seed
    assert (out / "table.csv").read_text().startswith("method,")
    assert not (out / "checkpoints").exists()  # every run recorded: no checkpoint kept
    # MLflow: one parent, a child per run with the per-epoch test accuracy
    # an earlier test may have called mlflow.set_tracking_uri, which beats the env variable
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["coreg-ray"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parent) == 1 and len(children) == 12
    assert parent.iloc[0]["status"] == "FINISHED" and set(children["status"]) == {"FINISHED"}
    assert set(children["params.method"]) == {"zero_shot", "cc", "coreg"}
    assert set(children["params.train.epochs"]) == {"1"}
    cc = children[children["params.method"] == "cc"].iloc[0]
    hist = mlflow.tracking.MlflowClient(uri).get_metric_history(cc["run_id"], "test_accuracy")
    assert [h.step for h in hist] == [0]
    print(f"\nsmoke experiment: 12 runs in {wall:.1f} s\n{md}")

    # relaunch: every run is skipped, nothing new is logged
    lines.clear()
    again = run_experiment(exp, out, overrides=["train.epochs=1", "train.warmup_epochs=1"],
                           log=lines.append)
    assert again.summary["ran_now"] == 0 and again.summary["skipped"] == 12
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    assert again.cells == table.cells
    assert len(mlflow.search_runs(experiment_names=["coreg-ray"])) == 13
    # a changed config is a different run: only those rerun (zero_shot does not depend on
    # it); a run that fails at run time is recorded, its cell reads "failed", the rest go on
    exp["methods"] = ["zero_shot", "cc"]
    exp["settings"] = exp["settings"][1:]
    # (a device no run has: a valid config value that fails in the run)
    third = run_experiment(exp, out, overrides=["train.epochs=1", "train.warmup_epochs=1",
                                                "train.device=cuda:99"],
                           log=lines.append, mlflow=False)
    s = third.summary
    assert (s["skipped"], s["ran_now"], s["runs_failed"]) == (2, 2, 2)
    assert third.cells[("CC", "simulated VLM")]["text"] == "failed"
    assert third.best == {("Zero-shot (annotator, test)", "simulated VLM")}
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(recs) == 14 and len(failed) == 2
    assert all("device" in r["error"].lower() and "\n" not in r["error"] for r in failed)
    assert sum("FAILED (" in x for x in lines) == 2


def test_a_killed_coreg_run_continues_from_its_checkpoint(digits_synthetic, tmp_path, monkeypatch):
    """A Co-Reg run of an experiment keeps OUTPUT/checkpoints/<run>/checkpoint.pt after every
    epoch: run again (the relaunch of a killed experiment), it trains only the epochs after the
    last one saved and ends as an uninterrupted run does."""
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.experiment.driver import _checkpoint_dir, execute_run

    train, ann, test = digits_synthetic
    cfg = tiny_config(**{"train.epochs": 4, "train.warmup_epochs": 2})
    run = {"method": "coreg", "setting": "q=0.3, η=0.1", "seed": 0, "shots": 0,
           "fingerprint": "abc123", "config": cfg.to_dict(), "params": None}
    ck = _checkpoint_dir(tmp_path, run)
    assert ck.parent == tmp_path / "checkpoints" and "abc123" in ck.name and "=" not in ck.name
    assert _checkpoint_dir(tmp_path, {**run, "method": "cc"}) is None  # baselines: nothing

    whole = execute_run(dict(run), train, test, ann, None)
    assert whole["status"] == "ok"

    real = CoReg.coreg_epoch

    def killed_in_epoch_3(self, epoch):
        if epoch == 2:
            raise RuntimeError("worker killed")
        return real(self, epoch)

    monkeypatch.setattr(CoReg, "coreg_epoch", killed_in_epoch_3)
    first = execute_run({**run, "checkpoint_dir": str(ck)}, train, test, ann, None)
    assert first["status"] == "failed" and "worker killed" in first["error"]
    assert (ck / "checkpoint.pt").is_file()
    monkeypatch.setattr(CoReg, "coreg_epoch", real)
    ran = []
    monkeypatch.setattr(CoReg, "divide", lambda self, epoch, _d=CoReg.divide:
                        ran.append(epoch) or _d(self, epoch))
    again = execute_run({**run, "checkpoint_dir": str(ck)}, train, test, ann, None)
    assert again["status"] == "ok" and ran == [2, 3]  # only the epochs after the checkpoint
    assert again["test_accuracy"] == whole["test_accuracy"]
    assert [h["test_accuracy"] for h in again["history"]] == \
        [h["test_accuracy"] for h in whole["history"]]
