"""2 Ray Train workers vs 1 worker vs the plain single process, same data, config and seeds.

    .venv/bin/python benchmarks/scripts/distributed_parity.py --seeds 0 1 \
        --out benchmarks/results/distributed_parity.json

Digits (scikit-learn, 1,438 train / 359 test), synthetic candidates (q=0.3, eta=0.1), MLP,
no flips. `train.batch_size` is the global batch, so every setting takes the same number of
optimizer steps per epoch.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from coreg_ray.config import Config

CONFIG = {"model.backbone": "mlp", "data.hflip": False, "train.epochs": 8,
          "train.warmup_epochs": 4, "train.batch_size": 64, "train.warmup_batch_size": 128,
          "coreg.feature_delay": 0, "coreg.queue_size": 256, "coreg.sharpen_T": 0.1,
          "tracking.mlflow": False}


def config(seed: int, **over) -> Config:
    items = dict(CONFIG, **{"train.seed": seed}, **over)
    return Config.load(overrides=[f"{k}={v}" for k, v in items.items()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=["local", "ray1", "ray2"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data import load_image_table, synthetic_annotations
    from coreg_ray.distributed.train import train_distributed

    over = {"train.epochs": args.epochs} if args.epochs else {}
    train, test = load_image_table("digits:train"), load_image_table("digits:test")
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            t0 = time.perf_counter()
            if setting == "local":
                tr = CoReg(config(seed, **over), progress=False)
                final = tr.fit(train, ann, test)
                acc, hist = final["test_accuracy"], tr.history
            else:
                with tempfile.TemporaryDirectory() as d:
                    m = train_distributed(train, ann, d, config(seed, **over), test_images=test,
                                          workers=int(setting[3:]), mlflow=False,
                                          log=lambda *a: None)
                acc, hist = m["test_accuracy"], m["history"]
            row = {"setting": setting, "seed": seed, "test_accuracy": acc,
                   "curve": [round(h.get("test_accuracy", float("nan")), 4) for h in hist],
                   "wall_seconds": time.perf_counter() - t0}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": dict(CONFIG, **over), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
