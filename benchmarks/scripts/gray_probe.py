"""Grayscale probe (issue 24): scikit-learn digits upscaled to 28x28 (a grayscale problem of the
size of the held-out set where Co-Reg fell below its annotator), a simulated annotator of the
same strength (94 % partial accuracy, 2.4 candidates, 80 % ensemble accuracy), the quickstart
config with small_cnn and no flips, 40 epochs; one run per (seed, method, overrides), one JSON
line each. Resumable: rows already in --out are skipped.

    python benchmarks/scripts/gray_probe.py --out ROWS.jsonl --seeds 0 1 2 \
        --methods coreg warmup_only [--set data.strong_view=color ...]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from coreg_ray.annotate.simulated import PaperLikeAnnotator
from coreg_ray.data import annotation_stats, load_image_table
from coreg_ray.methods import run_method
from coreg_ray.quickstart import quickstart_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--methods", nargs="+", default=["coreg", "warmup_only"])
ap.add_argument("--epochs", type=int, default=40)
ap.add_argument("--set", dest="overrides", action="append", default=[])
args = ap.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
done = set()
if out.exists():
    for line in out.read_text().splitlines():
        r = json.loads(line)
        done.add((r["seed"], r["method"], tuple(r["overrides"])))
train = load_image_table("digits:train", image_size=28)
test = load_image_table("digits:test", image_size=28)
for seed in args.seeds:
    sim = PaperLikeAnnotator(0.94, 2.4, 0.80, seed=seed).fit(train.images, train.labels, 10)
    ann = sim.annotate(train.images, train.labels, train.ids)
    test_ann = sim.annotate(test.images, test.labels, test.ids)
    st, st_test = annotation_stats(ann, train.labels), annotation_stats(test_ann, test.labels)
    for method in args.methods:
        key = (seed, method, tuple(args.overrides))
        if key in done:
            continue
        cfg = quickstart_config(args.epochs, seed)
        cfg.train.warmup_epochs = 10 * args.epochs // 40
        cfg.model.backbone = "small_cnn"
        cfg.tracking.mlflow = False
        cfg.apply_overrides(args.overrides)
        t0 = time.time()
        res = run_method(method, cfg, train, ann, test)
        curve = [round(h["test_accuracy"], 4) for h in res["history"] if "test_accuracy" in h]
        row = {"seed": seed, "method": method, "overrides": args.overrides,
               "acc": res["test_accuracy"], "curve": curve, "epochs": args.epochs,
               "annotator": {"partial_acc": round(st["partial_accuracy"], 4),
                             "avg_candidates": round(st["avg_candidates"], 3),
                             "ensemble_acc_test": round(st_test["ensemble_accuracy"], 4)},
               "seconds": round(time.time() - t0)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
