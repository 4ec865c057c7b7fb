"""Why Co-Reg trails on the CPU-sized CIFAR table: the same problem as exp-cifar-cpu.yaml's
simulated-VLM column (1,000 images, small_cnn, 20 epochs, warm-up 5, seed 0), one switch at a
time. One JSON line per variant (final test accuracy, |P|, pseudo-label accuracy on P and U).

    OMP_NUM_THREADS=1 python benchmarks/scripts/diagnose_coreg_cifar_cpu.py --variants base balanced ...
"""
import argparse
import json
import time
from pathlib import Path

from coreg_ray.config import Config
from coreg_ray.data import load_image_table
from coreg_ray.data.noise import SimulatedVLM
from coreg_ray.methods import run_method

REPO = Path(__file__).resolve().parents[2]  # the repository root
VARIANTS = {
    "base": [],
    "balanced": ["coreg.class_balanced_split=true"],
    "warmup10": ["train.warmup_epochs=10"],
    "no_da": ["coreg.distribution_alignment=false"],
    "T0.1": ["coreg.sharpen_T=0.1"],
    "no_features": ["coreg.prototypes=false", "coreg.contrastive=false"],
    "lambda_u25": ["coreg.lambda_u=25", "coreg.prior_penalty=true"],
}
ap = argparse.ArgumentParser()
ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
ap.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10-jpeg"))
ap.add_argument("--out", default=str(REPO / "benchmarks/results/diagnose_coreg_cifar_cpu.jsonl"))
args = ap.parse_args()
train = load_image_table(f"{args.data}/train.parquet", limit=1000)
test = load_image_table(f"{args.data}/test.parquet", limit=1000)
vlm = SimulatedVLM(8, 10, 0.5, seed=0).fit(train.images, train.labels, 10)
ann = vlm.annotate(train.images, train.ids)
base = ["model.backbone=small_cnn", "train.epochs=20", "train.warmup_epochs=5", "train.batch_size=64",
        "train.warmup_batch_size=128", "train.eval_every=5", "coreg.feature_delay=2",
        "coreg.queue_size=1024", "tracking.mlflow=false", "train.seed=0"]
for name in args.variants:
    t0 = time.time()
    cfg = Config.load(overrides=base + VARIANTS[name])
    out = run_method("coreg", cfg, train, ann, test)
    last = out["history"][-1]
    row = {"variant": name, "overrides": VARIANTS[name], "test_accuracy": round(out["test_accuracy"], 4),
           "p_fraction": round(last.get("p_fraction", 0), 3),
           "pseudo_accuracy_p": round(last.get("pseudo_accuracy_p", 0), 3),
           "pseudo_accuracy_u": round(last.get("pseudo_accuracy_u", 0), 3),
           "curve": [round(h["test_accuracy"], 3) for h in out["history"] if "test_accuracy" in h],
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
