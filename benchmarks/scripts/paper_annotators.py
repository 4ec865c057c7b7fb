"""The simulated paper annotators against their targets (coreg_ray/annotate/simulated.py):
statistics of the produced train and test tables, the share of wrong votes that name a
look-alike class (GTSRB sign families), and the time to fit and annotate. One JSON line each.

    python benchmarks/scripts/paper_annotators.py [--limit N]   (default: every image)
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coreg_ray.annotate.simulated import GTSRB_GROUPS, PaperLikeAnnotator, lookalike_share
from coreg_ray.data import annotation_stats, load_image_table

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
CASES = [("gtsrb", "gtsrb32", "clip-vitb32"), ("gtsrb", "gtsrb32", "llava-1.5"),
         ("cifar10", "cifar10-jpeg", "clip-vitb32")]
ap = argparse.ArgumentParser()
ap.add_argument("--limit", type=int, default=None)
ap.add_argument("--data", default=str(ROOT), help="folder holding gtsrb32/ and cifar10-jpeg/")
args = ap.parse_args()
torch.set_num_threads(2)
for dataset, folder, like in CASES:
    train = load_image_table(f"{args.data}/{folder}/train.parquet", None, args.limit)
    test = load_image_table(f"{args.data}/{folder}/test.parquet", None, args.limit)
    t0 = time.time()
    sim = PaperLikeAnnotator.like(like, dataset).fit(train.images, train.labels, train.num_classes)
    ann = sim.annotate(train.images, train.labels, train.ids)
    test_ann = sim.annotate(test.images, test.labels, test.ids)
    seconds = time.time() - t0
    keep = ("partial_accuracy", "avg_candidates", "ensemble_accuracy")
    row = {"dataset": dataset, "like": like, "train_images": len(train), "test_images": len(test),
           "targets": dict(zip(keep, sim.targets)),
           "train": {k: round(annotation_stats(ann, train.labels)[k], 4) for k in keep},
           "test": {k: round(annotation_stats(test_ann, test.labels)[k], 4) for k in keep},
           "calibrated": {k: round(v, 4) for k, v in zip(("a", "s", "tau"), sim.params)},
           "seconds": round(seconds, 1)}
    if dataset == "gtsrb":
        row["lookalike"] = {k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in lookalike_share(ann, train.labels, GTSRB_GROUPS).items()}
    print(json.dumps(row), flush=True)
