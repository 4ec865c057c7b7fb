"""Fault drill for `coreg-ray train --workers N`: kill a worker mid-run, check the run finishes
with every epoch accounted for and computes exactly what an uninterrupted run computes; then
interrupt a run for good (no restarts allowed) and launch it again with the same name. Every
worker owns a shard of the rows and checkpoints its per-sample state (one file per rank + a
manifest in each Ray Train checkpoint); "identical" compares every epoch's numbers.

    .venv/bin/python benchmarks/scripts/distributed_fault_drill.py \
        --out benchmarks/results/distributed_fault_drill.json

Digits (1,438 train / 359 test), synthetic candidates (q=0.3, eta=0.1), MLP, 8 epochs (4 warm-up),
2 CPU workers.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from coreg_ray.config import Config

CONFIG = {"model.backbone": "mlp", "data.hflip": False, "train.epochs": 8,
          "train.warmup_epochs": 4, "train.batch_size": 64, "train.warmup_batch_size": 128,
          "coreg.feature_delay": 0, "coreg.queue_size": 256, "coreg.sharpen_T": 0.1,
          "tracking.mlflow": False}


def _same(a: dict, b: dict) -> bool:
    """Every number of every epoch equal (but its seconds), and the final accuracy."""
    strip = lambda m: [{k: v for k, v in h.items() if k != "epoch_seconds"}  # noqa: E731
                       for h in m["history"]]
    return strip(a) == strip(b) and a["test_accuracy"] == b["test_accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after", type=int, default=3, help="epoch index after which rank 1 dies")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    from coreg_ray.data import load_image_table, synthetic_annotations
    from coreg_ray.distributed.train import FailOnce, train_distributed
    from coreg_ray.errors import CoregError

    train, test = load_image_table("digits:train"), load_image_table("digits:test")
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    cfg = lambda: Config.load(overrides=[f"{k}={v}" for k, v in CONFIG.items()])  # noqa: E731
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res = {"config": CONFIG}
    quiet = dict(test_images=test, workers=2, log=lambda *a: None)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        clean = train_distributed(train, ann, d / "clean", cfg(), **quiet)
        res["uninterrupted"] = {"test_accuracy": clean["test_accuracy"],
                                "wall_seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        ft = train_distributed(train, ann, d / "ft", cfg(), max_failures=2, **quiet,
                               callbacks=[FailOnce(args.kill_after, d / "marker-ft", rank=1,
                                                   delay_s=3)])
        res["worker_killed"] = {
            "killed": f"rank 1 after epoch index {args.kill_after}",
            "epochs_in_history": [h["epoch"] for h in ft["history"]],
            "restored_from_epochs": ft["restored_from_epochs"],
            "test_accuracy": ft["test_accuracy"],
            "identical_to_uninterrupted": _same(ft, clean),
            "wall_seconds": time.perf_counter() - t0}
        print(json.dumps(res["worker_killed"]), flush=True)
        t0 = time.perf_counter()
        try:
            train_distributed(train, ann, d / "int", cfg(), max_failures=0, **quiet,
                              callbacks=[FailOnce(args.kill_after, d / "marker-int", rank=0,
                                                  delay_s=3)])
            failed = None
        except CoregError as exc:
            failed = str(exc)
        t1 = time.perf_counter()
        again = train_distributed(train, ann, d / "int", cfg(), **quiet)
        res["interrupted_then_relaunched"] = {
            "first_launch_error": failed, "first_launch_seconds": t1 - t0,
            "epochs_in_history": [h["epoch"] for h in again["history"]],
            "restored_from_epochs": again["restored_from_epochs"],
            "test_accuracy": again["test_accuracy"],
            "identical_to_uninterrupted": _same(again, clean),
            "relaunch_seconds": time.perf_counter() - t1}
        print(json.dumps(res["interrupted_then_relaunched"]), flush=True)
    ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
