import json, time, sys
import numpy as np, torch
from coreg_ray.config import Config
from coreg_ray.data import load_image_table, annotation_stats
from coreg_ray.data.tables import ImageTable
from coreg_ray.data.noise import SimulatedVLM
from coreg_ray.methods import run_method
method, n, ep, wu, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
extra = sys.argv[6:]
def sub(t, lim):
    keep = np.flatnonzero(t.labels < k)[:lim]
    return ImageTable(t.images[torch.as_tensor(keep)], t.ids[keep], t.labels[keep], t.classes[:k], t.source)
tr = sub(load_image_table("/work/main/.devdata/cifar10-jpeg/train.parquet"), n)
te = sub(load_image_table("/work/main/.devdata/cifar10-jpeg/test.parquet"), 2000)
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
