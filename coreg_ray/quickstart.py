"""The README's main job: embedded digits -> simulated annotator -> Co-Reg -> a short table.

Four rows, same data, backbone and epochs: the annotator's own template-ensemble accuracy on
the test split, a student trained with the warm-up loss alone, Co-Reg, and the ceiling: the
warm-up-only student trained on the TRUE labels (what these images, this student and this
schedule allow; the other rows show how much of it the annotator's labels let them reach).
"""
from __future__ import annotations

import time
from pathlib import Path

from coreg_ray.config import Config, load_yaml_mapping

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def quickstart_config(epochs: int | None = None, seed: int = 0) -> Config:
    from importlib.resources import as_file, files

    with as_file(files("coreg_ray").joinpath("quickstart.yaml")) as path:  # package data
        cfg = Config.from_dict(load_yaml_mapping(path, "quickstart config", "a mapping of sections"))
    if epochs is not None:
        cfg.train.epochs = epochs
        cfg.train.warmup_epochs = min(cfg.train.warmup_epochs, max(1, epochs // 3))
    cfg.train.seed = seed
    return cfg


def run_quickstart(output="runs/quickstart", epochs=None, seed=0, mlflow=True, log=print) -> dict:
    from coreg_ray.data import (SimulatedVLM, annotation_stats, load_image_table,
                                true_label_annotations)
    from coreg_ray.outputs import check_output_dir, check_output_file, write_json_atomic, \
        write_text_atomic
    from coreg_ray.runs import RunSpec, execute

    out = check_output_dir(output)  # before any work: a bad output is one line, nothing written
    for sub in ("warmup", "coreg", "true_labels"):
        check_output_dir(out / sub)
    for name in ("summary.md", "summary.json"):
        check_output_file(out / name)
    quickstart_config(epochs, seed)  # a bad --epochs / --seed is one line before any work
    t0 = time.perf_counter()
    train = load_image_table("digits:train")
    test = load_image_table("digits:test")
    log(f"data: scikit-learn digits, {len(train)} train / {len(test)} test images, 8x8")
    # A deliberately weak stand-in annotator (3 templates, 1 labelled image per class each):
    # ~0.66 ensemble accuracy, ~0.83 partial accuracy, like the paper's harder datasets.
    vlm = SimulatedVLM(n_templates=3, per_class=1, feature_fraction=0.5, seed=seed)
    vlm.fit(train.images, train.labels, train.num_classes)
    ann = vlm.annotate(train.images, train.ids)
    test_ann = vlm.annotate(test.images, test.ids)
    s_train = annotation_stats(ann, train.labels)
    s_test = annotation_stats(test_ann, test.labels)
    log(f"annotator: {vlm.spec} (a stand-in for a VLM, not a VLM)")
    log(f"  train: avg {s_train['avg_candidates']:.2f} candidates, partial acc "
        f"{s_train['partial_accuracy']:.3f}, ensemble acc {s_train['ensemble_accuracy']:.3f}")
    rows = [("annotator (template ensemble)", s_test["ensemble_accuracy"], 0.0)]
    base = quickstart_config(epochs, seed)
    if not mlflow:
        base.tracking.mlflow = False
    true_ann = true_label_annotations(train.ids, train.labels, train.num_classes, train.source)
    for name, tweak in (("warm-up loss only", "warmup"), ("Co-Reg", "coreg"),
                        ("true labels (ceiling)", "true_labels")):
        cfg = quickstart_config(epochs, seed)
        cfg.tracking = base.tracking
        if tweak != "coreg":
            cfg.train.warmup_epochs = cfg.train.epochs
        log(f"training: {name} ({cfg.model.backbone}, {cfg.train.epochs} epochs)")
        m = execute(RunSpec(train, true_ann if tweak == "true_labels" else ann, out / tweak,
                            config=cfg, test_images=test, run_name=f"quickstart-{tweak}",
                            tracking=mlflow, overwrite=True))  # a rerun replaces the demo's runs
        rows.append((name, m["test_accuracy"], m["seconds"]))
    table = ["| method | test accuracy | train seconds |", "| --- | ---: | ---: |"]
    table += [f"| {n} | {a:.4f} | {s:.1f} |" for n, a, s in rows]
    text = "\n".join(table)
    log("\n" + text + f"\n\ntotal {time.perf_counter() - t0:.0f} s; runs in {out}/")
    result = {"rows": [{"method": n, "test_accuracy": a, "seconds": s} for n, a, s in rows],
              "annotator_train": s_train, "annotator_test": s_test}
    write_text_atomic(out / "summary.md", text + "\n")
    write_json_atomic(out / "summary.json", result)
    return result
