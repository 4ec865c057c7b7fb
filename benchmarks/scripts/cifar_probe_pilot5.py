"""CIFAR-10 probe, the first K classes (benchmarks/accuracy_cifar_cpu.md, session 4): one method
on the first N training images of those classes, annotated by the patch-feature simulated VLM
(8 templates, 5 images per class, half the features), small_cnn, batch 64, lr 0.05, EPOCHS
epochs (warm-up WARMUP), config overrides last; one JSON line (accuracy, curve, P).

    OMP_NUM_THREADS=1 python benchmarks/scripts/cifar_probe_pilot5.py coreg 3000 24 8 5 [key=value ...]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coreg_ray.config import Config
from coreg_ray.data import annotation_stats, load_image_table
from coreg_ray.data.noise import SimulatedVLM
from coreg_ray.data.tables import ImageTable
from coreg_ray.methods import run_method

REPO = Path(__file__).resolve().parents[2]  # the repository root
DATA = REPO.parent / "shared/data/cifar10-jpeg"  # the CIFAR-10 copy the configs name
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("method")
ap.add_argument("n", type=int, help="training images (the first N of the K classes)")
ap.add_argument("epochs", type=int)
ap.add_argument("warmup", type=int)
ap.add_argument("k", type=int, help="classes (the first K)")
ap.add_argument("overrides", nargs="*", help="config key=value, applied last")
ap.add_argument("--data", default=str(DATA))
args = ap.parse_args()
method, n, ep, wu, k, extra = args.method, args.n, args.epochs, args.warmup, args.k, args.overrides
def sub(t, lim):
    keep = np.flatnonzero(t.labels < k)[:lim]
    return ImageTable(t.images[torch.as_tensor(keep)], t.ids[keep], t.labels[keep], t.classes[:k], t.source)
tr = sub(load_image_table(f"{args.data}/train.parquet"), n)
te = sub(load_image_table(f"{args.data}/test.parquet"), 2000)
v = SimulatedVLM(8, 5, 0.5, 0, "patches").fit(tr.images, tr.labels, k)
ann = v.annotate(tr.images, tr.ids); tann = v.annotate(te.images, te.ids)
print("ann", {a: b for a, b in annotation_stats(ann, tr.labels).items() if a in ("avg_candidates","partial_accuracy","ensemble_accuracy")},
      "test", {a: b for a, b in annotation_stats(tann, te.labels).items() if a in ("avg_candidates","partial_accuracy","ensemble_accuracy")}, flush=True)
cfg = Config.load(overrides=["model.backbone=small_cnn", f"train.epochs={ep}", f"train.warmup_epochs={wu}", "train.batch_size=64",
   "train.warmup_batch_size=64", "train.lr=0.05", "train.eval_every=2", "tracking.mlflow=false", "train.seed=0", "train.compile=true",
   "coreg.feature_delay=3", "coreg.rampup_epochs=8", "coreg.queue_size=2048"] + extra)
t0=time.time()
out = run_method(method, cfg, tr, ann, te)
last = out["history"][-1]
print(json.dumps({"method": method, "extra": extra, "acc": out["test_accuracy"], "curve": [round(h["test_accuracy"],3) for h in out["history"] if "test_accuracy" in h],
  "p": last.get("p_fraction"), "pa_p": last.get("pseudo_accuracy_p"), "pa_u": last.get("pseudo_accuracy_u"), "s": round(time.time()-t0)}), flush=True)
