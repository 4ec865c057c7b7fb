"""CIFAR-10 probe, 10 classes (benchmarks/accuracy_cifar_cpu.md, sessions 4-5): one method on the
first N training images, annotated by 8 logistic-regression templates on the patch features of
`cifar_probe_features.py` (20 images per class of rows 5,000+, half the features each), small_cnn
for EPOCHS epochs (warm-up WARMUP), config overrides last; one JSON line (accuracy, curve, P).

    OMP_NUM_THREADS=1 python benchmarks/scripts/cifar_probe_pilot.py coreg 3000 24 8 [key=value ...]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from coreg_ray.config import Config
from coreg_ray.data import load_image_table
from coreg_ray.data.annotations import AnnotationTable
from coreg_ray.methods import run_method

REPO = Path(__file__).resolve().parents[2]  # the repository root
DATA = REPO.parent / "shared/data/cifar10-jpeg"  # the CIFAR-10 copy the configs name
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("method")
ap.add_argument("n", type=int, help="training images (the first N)")
ap.add_argument("epochs", type=int)
ap.add_argument("warmup", type=int)
ap.add_argument("overrides", nargs="*", help="config key=value, applied last")
ap.add_argument("--data", default=str(DATA))
ap.add_argument("--features", default=str(REPO / "runs/cifar-probe/feat256.npz"))
args = ap.parse_args()
method, n, ep, wu, extra = args.method, args.n, args.epochs, args.warmup, args.overrides
d = np.load(args.features); ftr=d["tr"].astype(np.float32); fte=d["te"].astype(np.float32); y=d["ytr"]
rng = np.random.default_rng(0); pool = np.arange(5000, 50000)
def ann_for(F, ids):
    V=[];P=[]
    for cols, clf in T:
        p=clf.predict_proba(F[:,cols]); V.append(p.argmax(1)); P.append(p)
    V=np.stack(V,1); m=len(F); cand=np.zeros((m,10),bool); cand[np.repeat(np.arange(m),8), V.ravel()]=True
    return AnnotationTable(np.asarray(ids), cand, V, np.mean(P,0).astype(np.float32), {"annotator":"probe","num_classes":10})
T=[]
for t in range(8):
    rows=np.concatenate([rng.choice(pool[y[pool]==c], 20, replace=False) for c in range(10)])
    cols=rng.choice(1024, 512, replace=False)
    T.append((cols, LogisticRegression(max_iter=200, C=0.01).fit(ftr[rows][:,cols], y[rows])))
tr = load_image_table(f"{args.data}/train.parquet", limit=n)
te = load_image_table(f"{args.data}/test.parquet", limit=2000)
ann = ann_for(ftr[:n], tr.ids); tann = ann_for(fte, te.ids)
c = ann.candidates
print("ann", c.sum(1).mean(), c[np.arange(n), tr.labels].mean(), "test-ens", (tann.probs.argmax(1)==te.labels).mean(), flush=True)
cfg = Config.load(overrides=["model.backbone=small_cnn", f"train.epochs={ep}", f"train.warmup_epochs={wu}", "train.batch_size=128",
   "train.warmup_batch_size=256", "train.eval_every=2", "tracking.mlflow=false", "train.seed=0", "train.compile=true",
   "coreg.feature_delay=3", "coreg.rampup_epochs=8", "coreg.queue_size=2048"] + extra)
t0=time.time()
out = run_method(method, cfg, tr, ann, te)
last = out["history"][-1]
print(json.dumps({"method": method, "warmup_epochs": wu, "extra": extra, "acc": out["test_accuracy"], "curve": [round(h["test_accuracy"],3) for h in out["history"] if "test_accuracy" in h],
  "p": last.get("p_fraction"), "pa_p": last.get("pseudo_accuracy_p"), "pa_u": last.get("pseudo_accuracy_u"), "s": round(time.time()-t0)}), flush=True)
