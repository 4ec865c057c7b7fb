"""Seconds per epoch of Co-Reg (warm-up and full post-warm-up epochs, both networks).

    python benchmarks/scripts/epoch_speed.py [--images TRAIN.parquet] \
        --backbone preact_resnet18 --batch-size 256

--images defaults to the CIFAR-10 training table the configs name (a path from the repository
root, wherever this runs from).

Uses synthetic candidates (q=0.1, eta=0.1) so no annotator is needed; prototypes and the
contrastive term are on from the first post-warm-up epoch. Prints one JSON line per epoch.
Goal on one H200: < 8 s per 50k-image Co-Reg epoch (the authors' code: ~135 s).
"""
import argparse
import json
from pathlib import Path

import torch

from coreg_ray.config import Config
from coreg_ray.coreg.trainer import CoReg
from coreg_ray.data import load_image_table, synthetic_annotations

REPO = Path(__file__).resolve().parents[2]  # the repository root
ap = argparse.ArgumentParser()
ap.add_argument("--images", default=str(REPO.parent / "shared/data/cifar10-jpeg/train.parquet"))
ap.add_argument("--limit", type=int, default=None)
ap.add_argument("--backbone", default="preact_resnet18")
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--coreg", type=int, default=3)
ap.add_argument("overrides", nargs="*")
args = ap.parse_args()
table = load_image_table(args.images, limit=args.limit)
ann = synthetic_annotations(table.ids, table.labels, table.num_classes, 0.1, 0.1)
cfg = Config.load(overrides=[
    f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
    f"train.warmup_batch_size={2 * args.batch_size}", f"train.warmup_epochs={args.warmup}",
    f"train.epochs={args.warmup + args.coreg}", "coreg.feature_delay=-1", "tracking.mlflow=false",
    "train.eval_every=1000"] + args.overrides)
dev = "cuda" if torch.cuda.is_available() else "cpu"
name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"


def show(epoch, stats, trainer):
    print(json.dumps({"epoch": epoch, "phase": stats["phase"], "seconds": round(stats["epoch_seconds"], 2),
                      "images": len(table), "device": name, "backbone": args.backbone,
                      "batch": args.batch_size, "bf16": trainer.bf16}), flush=True)


CoReg(cfg, callbacks=[show], progress=False).fit(table, ann)
