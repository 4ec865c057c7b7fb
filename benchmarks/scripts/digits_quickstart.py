"""The quickstart problem (scikit-learn digits, SimulatedVLM 3 templates x 1 image per class,
MLP, configs/quickstart.yaml: 40 epochs, warm-up 10) for several seeds, warm-up-only and Co-Reg,
with optional config overrides applied to both. One JSON line per (seed, method) on stdout.

    python benchmarks/scripts/digits_quickstart.py --seeds 0 1 2 [--set key=value ...]

Used to record the quickstart before/after a change to Co-Reg (benchmarks/README.md).
"""
import argparse
import json
import time

import torch

from coreg_ray.data import SimulatedVLM, annotation_stats, load_image_table
from coreg_ray.methods import run_method
from coreg_ray.quickstart import quickstart_config

ap = argparse.ArgumentParser()
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--methods", nargs="+", default=["warmup_only", "coreg"])
ap.add_argument("--set", dest="overrides", action="append", default=[],
                help="config key=value, applied to every run (repeatable)")
args = ap.parse_args()
torch.set_num_threads(1)
train, test = load_image_table("digits:train"), load_image_table("digits:test")
for seed in args.seeds:
    vlm = SimulatedVLM(n_templates=3, per_class=1, feature_fraction=0.5, seed=seed)
    vlm.fit(train.images, train.labels, train.num_classes)
    ann, test_ann = vlm.annotate(train.images, train.ids), vlm.annotate(test.images, test.ids)
    print(json.dumps({"seed": seed, "method": "annotator",
                      "acc": annotation_stats(test_ann, test.labels)["ensemble_accuracy"]}), flush=True)
    for method in args.methods:
        cfg = quickstart_config(None, seed)
        cfg.tracking.mlflow = False
        cfg.apply_overrides(args.overrides)
        t0 = time.time()
        out = run_method(method, cfg, train, ann, test)
        hist = [round(h["test_accuracy"], 4) for h in out["history"] if "test_accuracy" in h]
        print(json.dumps({"seed": seed, "method": method, "overrides": args.overrides,
                          "acc": out["test_accuracy"], "curve": hist,
                          "seconds": round(time.time() - t0)}), flush=True)
