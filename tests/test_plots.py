"""Pictures (coreg_ray.plots): each function writes a valid PNG of a sensible size, with and
without its optional data, and the commands' hooks put them beside their Markdown (embedded):
the annotation report, `train` (curves.png, also an MLflow artifact) and `experiment`."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from coreg_ray import plots

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_w=400, min_h=250):
    from PIL import Image

    p = Path(path)
    assert p.is_file() and p.read_bytes()[:8] == PNG, p
    assert not p.with_name(p.name + ".tmp").exists()
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert min_w <= w <= 3000 and min_h <= h <= 4000, (p, w, h)
    return w, h


def _annotations(n=600, c=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    cand = rng.random((n, c)) < 0.2
    cand[np.arange(n), labels] = rng.random(n) < 0.8
    cand[cand.sum(1) == 0, 0] = True
    return labels, cand


# ------------------------------------------------------------------ annotation report
def test_annotation_chart_full_partial_and_empty(tmp_path):
    labels, cand = _annotations()
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    per = [{"class": classes[c], "images": int((labels == c).sum()),
            "partial_accuracy": float(cand[labels == c, c].mean()),
            "avg_candidates": float(cand[labels == c].sum(1).mean())} for c in range(10)]
    counts = plots.candidate_counts(cand, labels, 10)
    assert np.asarray(counts).shape == (10, 10)
    assert counts[3][3] == int(cand[labels == 3, 3].sum())
    hist = {str(k): int(v) for k, v in zip(*np.unique(cand.sum(1), return_counts=True))}
    full = assert_png(plots.annotation_chart(tmp_path / "full.png", per, counts, classes, None,
                                             hist, title="report"))
    # no labels: only the set-size histogram; a class without images; nothing at all
    only_hist = assert_png(plots.annotation_chart(tmp_path / "hist.png", set_size_histogram=hist),
                           min_h=150)
    assert only_hist[1] < full[1]
    per[2] = {"class": "bird", "images": 0, "partial_accuracy": None, "avg_candidates": None}
    assert_png(plots.annotation_chart(tmp_path / "gap.png", per, counts))  # counts, no images
    assert_png(plots.annotation_chart(tmp_path / "none.png"), min_h=100)


def test_annotation_chart_43_long_class_names(tmp_path):
    from coreg_ray.annotate.templates import gtsrb_classes

    names = gtsrb_classes()
    assert len(names) == 43
    labels, cand = _annotations(2000, 43, seed=1)
    per = [{"class": names[c], "images": int((labels == c).sum()),
            "partial_accuracy": float(cand[labels == c, c].mean()),
            "avg_candidates": float(cand[labels == c].sum(1).mean())} for c in range(43)]
    w, h = assert_png(plots.annotation_chart(tmp_path / "g.png", per,
                                             plots.candidate_counts(cand, labels, 43), names))
    assert w >= 1200  # wide enough for 43 labelled bars
    short = plots.short_names(names)
    assert short[0] == "Speed limit 20" and all(len(s) <= 28 for s in short)


def test_report_writer_puts_the_png_beside_the_markdown(tmp_path):
    from coreg_ray.annotate.report import quality, write_report
    from coreg_ray.data import AnnotationTable

    labels, cand = _annotations(300, 5)
    classes = ["a", "b", "c", "d", "e"]
    ann = AnnotationTable(np.arange(300), cand)
    for with_labels in (True, False):
        q = quality(ann, labels if with_labels else None, classes)
        assert ("candidate_counts" in q) == with_labels
        rep = {"source": "pool.parquet", "annotators": ["clip:ViT-B-32"], "classes": classes,
               "num_classes": 5, "quality": q}
        jp, mp = write_report(rep, tmp_path / f"rep{int(with_labels)}")
        png = mp.with_suffix(".png")
        assert_png(png, min_h=150)
        md = mp.read_text()
        assert f"![annotation report]({png.name})" in md
        assert md.index(png.name) < md.index("## Candidate-set size")
        assert json.loads(jp.read_text())["quality"].get("candidate_counts") == \
            q.get("candidate_counts")


# ------------------------------------------------------------------ training curves
def _history(epochs=8, warmup=3, full=True):
    h = []
    for e in range(epochs):
        row = {"epoch": e, "phase": "warmup" if e < warmup else "coreg",
               "loss": 1.0 / (e + 1), "test_accuracy": 0.3 + 0.05 * e}
        if e >= warmup and full:
            row.update(p_fraction=0.4 + 0.01 * e, p_fraction_net1=0.4, p_fraction_net2=0.45,
                       pseudo_accuracy_p=0.9, pseudo_accuracy_u=0.3, loss_x=0.5, loss_u=0.1,
                       loss_prot=0.2 * e, loss_cont=5.0, loss_cand=0.0)
        h.append(row)
    return h


def test_training_curves_full_sparse_and_empty(tmp_path):
    assert_png(plots.training_curves(_history(), tmp_path / "full.png", title="run"))
    # no truth (no pseudo-label accuracy), no test set on some epochs, warm-up only, nothing
    sparse = [{k: v for k, v in r.items() if not k.startswith("pseudo")} for r in _history()]
    for r in sparse[::2]:
        r.pop("test_accuracy")
    assert_png(plots.training_curves(sparse, tmp_path / "sparse.png"))
    assert_png(plots.training_curves(_history(3, 3, full=False), tmp_path / "warm.png"))
    assert_png(plots.training_curves([{"epoch": 0}, {"epoch": 1, "loss": float("nan")}],
                                     tmp_path / "bare.png"))
    assert_png(plots.training_curves([], tmp_path / "empty.png"))


def test_train_writes_curves_and_logs_them_to_mlflow(tmp_path, mlflow_store):
    """`train` (train_run) writes curves.png beside metrics.json; with tracking on, the PNG is
    an artifact of the run."""
    mlflow = pytest.importorskip("mlflow")
    from coreg_ray.cli import train_run
    from coreg_ray.data import load_image_table, synthetic_annotations, write_annotations

    train = load_image_table("digits:train", None, 300)
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.2, eta=0.1, seed=0)
    ann.meta["classes"] = train.classes
    write_annotations(ann, tmp_path / "ann.parquet")
    store = mlflow_store
    over = ["model.backbone=mlp", "data.hflip=False", "train.epochs=2", "train.warmup_epochs=1",
            "train.batch_size=64", "train.warmup_batch_size=128", "coreg.queue_size=256",
            f"tracking.tracking_uri={store}"]
    m = train_run("digits:train", tmp_path / "ann.parquet", tmp_path / "run", overrides=over,
                  test_images="digits:test", limit=300, progress=False, log=lambda *a: None)
    assert_png(tmp_path / "run" / "curves.png")
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 2
    arts = [a.path for a in mlflow.MlflowClient(store).list_artifacts(m["mlflow_run_id"])]
    assert "curves.png" in arts and "metrics.json" in arts


# ------------------------------------------------------------------ experiment table
def _rec(method, setting, seed, acc=None, status="ok", shots=0, key=None):
    return {"key": key or f"{setting}|{method}|{shots}|{seed}", "method": method,
            "setting": setting, "shots": shots, "seed": seed, "status": status,
            "test_accuracy": acc}


def test_experiment_chart_bars_errors_failed_na_and_shots(tmp_path):
    recs = [_rec("cc", "A", 0, 0.40), _rec("cc", "A", 1, 0.42), _rec("coreg", "A", 0, 0.5),
            _rec("coreg", "A", 1, 0.46), _rec("cc", "B", 0, 0.7), _rec("cc", "B", 1, None, "failed"),
            _rec("coreg", "B", 0, None, "failed"), _rec("kd_unsup", "A", 0, None, "n/a"),
            _rec("kd_unsup", "B", 0, 0.3)]
    recs.append(_rec("coreg", "B", 0, 0.55))  # a rerun of the same key: the last record wins
    assert_png(plots.experiment_chart(recs, tmp_path / "t.png", labels={"coreg": "Ours"},
                                      title="exp"))
    # shots vary: groups per (setting, shots); zero_shot is shot-free
    shots = [_rec(m, "S", s, 0.3 + 0.01 * k, shots=k) for m in ("cc", "coreg") for k in (1, 4)
             for s in (0, 1)] + [_rec("zero_shot", "S", 0, 0.35)]
    assert_png(plots.experiment_chart(shots, tmp_path / "shots.png"))
    # missing optional fields (no status, no shots, no seed), nothing finished, no records
    assert_png(plots.experiment_chart([{"method": "cc", "setting": "A", "test_accuracy": 0.5}],
                                      tmp_path / "min.png"))
    assert_png(plots.experiment_chart([_rec("cc", "A", 0, None, "failed")], tmp_path / "f.png"))
    assert_png(plots.experiment_chart([], tmp_path / "empty.png"))


def test_experiment_curves_every_row_per_setting(tmp_path):
    def hist(*accs):
        return [{"epoch": i, "test_accuracy": a} for i, a in enumerate(accs)]

    recs = [dict(_rec("true_labels", "A", 0, 0.9), test_history=hist(0.5, 0.9)),
            dict(_rec("coreg", "A", 0, 0.6), test_history=hist(0.3, 0.6)),
            dict(_rec("coreg", "A", 0, 0.5, shots=4), test_history=hist(0.2, 0.5)),
            _rec("zero_shot", "A", 0, 0.4),  # no epochs: a dashed level
            _rec("cc", "A", 0, None, "failed"),
            dict(_rec("coreg", "B", 0, 0.7), test_history=hist(0.1, 0.7))]
    assert_png(plots.experiment_curves(recs, tmp_path / "c.png", methods=["true_labels", "coreg"],
                                       settings=["A", "B", "C"], labels={"coreg": "Co-Reg"},
                                       title="t"))
    from matplotlib.image import imread

    assert imread(tmp_path / "c.png").shape[0] > imread(
        plots.experiment_curves(recs[:1], tmp_path / "one.png")).shape[0]  # a panel per setting
    assert_png(plots.experiment_curves([], tmp_path / "empty.png"))


def test_experiment_writes_table_png_beside_table_md(tmp_path):
    """run_experiment's table writer (every run already in results.jsonl: no Ray needed)."""
    from coreg_ray.experiment import Experiment, run_experiment

    exp = yaml.safe_load((ROOT / "configs" / "exp-digits-smoke.yaml").read_text())
    out = tmp_path / "exp"
    out.mkdir()
    runs = Experiment.load(exp).runs()
    with open(out / "results.jsonl", "w") as f:
        for i, r in enumerate(runs):
            f.write(json.dumps({"key": r["key"], "fingerprint": r["fingerprint"],
                                "method": r["method"], "setting": r["setting"],
                                "shots": r["shots"], "seed": r["seed"], "status": "ok",
                                "test_accuracy": 0.2 + 0.1 * (i % 5)}) + "\n")
    table = run_experiment(exp, out, mlflow=False, log=lambda *a: None)
    assert table.summary["ran_now"] == 0
    assert_png(out / "table.png")
    md = (out / "table.md").read_text()
    assert "![results chart](table.png)" in md
    assert md.index("| Method |") < md.index("table.png") < md.index("Annotators:")


# ------------------------------------------------------------------ hooks never fail a command
def test_hooks_skip_the_picture_with_a_note_when_matplotlib_is_missing(tmp_path, monkeypatch,
                                                                         capsys):
    from coreg_ray.errors import CoregError

    def missing(*a, **k):
        raise CoregError("'matplotlib' is not installed: pip install 'coreg-ray[plots]'")

    monkeypatch.setattr(plots, "_figure", missing)
    monkeypatch.setattr(plots, "_warned", set())
    md = "# t\n\n| a |\n| --- |\n| 1 |\n"
    assert plots.with_picture(md, tmp_path / "t.md", plots.experiment_chart, []) == md
    assert plots.write_beside(plots.training_curves, [], tmp_path / "c.png") is None
    err = capsys.readouterr().err
    assert err.count("note: picture skipped") == 1 and "coreg-ray[plots]" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(CoregError, match="plots"):
        plots.training_curves([], tmp_path / "c.png")


def test_embed_places_the_image():
    md = "# T\n\nintro\n\n| a |\n| --- |\n| 1 |\n\nfooter\n"
    out = plots.embed(md, "t.png", "chart")
    assert out.index("| 1 |") < out.index("![chart](t.png)") < out.index("footer")
    out = plots.embed("# R\n\n## Sizes\n", "r.png", "r", before="## Sizes")
    assert out == "# R\n\n![r](r.png)\n\n## Sizes\n"
    assert plots.embed("# only\n", "x.png", "x").endswith("![x](x.png)\n")
    assert math.isnan(plots._num(None)) and plots._num("0.5") == 0.5
