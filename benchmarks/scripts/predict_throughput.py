"""`coreg-ray predict` throughput and fidelity on the CIFAR-10 test set (10,000 JPEG images).

Trains a student for --epochs on the first --train-images CIFAR-10 training images with
synthetic candidate sets (q=0.3; seconds to minutes on CPU: the point is a real model.pt, not
its accuracy), then in the same process:
  - raw: `Classifier.logits` on the already-decoded test images (all threads) at --raw-batch
    sizes — the model's own speed; `vs_raw` compares with the fastest of them;
  - evaluate: `coreg-ray evaluate`'s accuracy on the test table;
  - predict through Ray Data with 1 and 2 actors (Ray started once, all local CPUs) on the
    whole test set and on its first 1,024 images: images/s end to end (from the stream's start
    to the last row), first result, steady rate, and the accuracy / labels against evaluate.
Prints one JSON line per measurement and appends them to --out.

    .venv/bin/python benchmarks/scripts/predict_throughput.py \
        --data ../shared/data/cifar10-jpeg --backbone preact_resnet18
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with train.parquet / test.parquet")
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="predict's batch size (default: predict's own)")
    ap.add_argument("--raw-batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default=None, help="use this model.pt instead of training one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/predict_throughput.jsonl"))
    a = ap.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch

    from coreg_ray.config import Config
    from coreg_ray.coreg.classifier import Classifier
    from coreg_ray.data import load_image_table, synthetic_annotations
    from coreg_ray.predict import run_predict

    data = Path(a.data)
    work = Path(tempfile.mkdtemp(prefix="predbench"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    hw = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
          "torch": torch.__version__, "python": platform.python_version(),
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    rows = []

    def emit(row):
        row = dict(row, backbone=a.backbone, when=when, hardware=hw)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "hardware"}), flush=True)

    model = Path(a.model) if a.model else work / "model.pt"
    if not a.model:
        from coreg_ray.coreg.trainer import CoReg

        train = load_image_table(data / "train.parquet", None, a.train_images)
        ann = synthetic_annotations(train.ids, train.labels, train.num_classes, q=0.3, eta=0.0,
                                    seed=0)
        cfg = Config.load(overrides=[f"model.backbone={a.backbone}", f"train.epochs={a.epochs}",
                                     f"train.warmup_epochs={a.epochs}", "tracking.mlflow=False",
                                     "train.device=cpu", "train.batch_size=64",
                                     "train.warmup_batch_size=64", "train.lr=0.05"])
        t = time.time()
        trainer = CoReg(cfg, progress=False)
        trainer.fit(train, ann)
        trainer.save_model(model)
        emit({"step": "train", "images": len(train), "epochs": a.epochs,
              "seconds": round(time.time() - t, 1)})

    test = load_image_table(data / "test.parquet")
    clf = Classifier.load(model, "cpu")
    raw = 0.0
    for bs in a.raw_batch:
        with torch.inference_mode():
            clf.logits(test.images[:bs], bs)  # warm-up
            t = time.time()
            ref = clf.logits(test.images, bs).argmax(1).numpy()
            raw_s = time.time() - t
        raw = max(raw, len(test) / raw_s)
        emit({"step": "raw", "images": len(test), "threads": torch.get_num_threads(),
              "batch_size": bs, "seconds": round(raw_s, 2),
              "images_per_s": round(len(test) / raw_s, 1)})
    evaluated = clf.evaluate(test)["accuracy"]
    emit({"step": "evaluate", "images": len(test), "accuracy": evaluated})

    pool = work / "pool"
    pool.mkdir()
    shutil.copy(data / "test.parquet", pool / "train.parquet")
    if (data / "classes.json").exists():
        shutil.copy(data / "classes.json", pool / "classes.json")
    t = time.time()
    ray.init(include_dashboard=False, log_to_driver=False)
    emit({"step": "ray.init", "seconds": round(time.time() - t, 1),
          "cpus": ray.cluster_resources().get("CPU")})
    try:
        for limit in (None, 1024):
            for n in a.actors:
                out = work / f"pred-{n}-{limit}.parquet"
                s = run_predict(model, pool, out, num_actors=n, batch_size=a.batch_size,
                                limit=limit, progress=False)
                labels = pq.read_table(out, columns=["label"]).column("label").to_numpy()
                k = len(labels)
                emit({"step": "predict", "actors": n, "images": k,
                      "batch_size": a.batch_size or "predict's default",
                      "seconds": s["seconds"], "images_per_s": s["images_per_s"],
                      "vs_raw": round(s["images_per_s"] / raw, 3),
                      "first_result_s": s.get("first_result_s"),
                      "steady_images_per_s": s.get("steady_images_per_s"),
                      "total_seconds": s["total_seconds"], "accuracy": s.get("accuracy"),
                      "accuracy_equals_evaluate": (s.get("accuracy") == evaluated
                                                   if limit is None else None),
                      "labels_equal_classifier": bool((labels == ref[:k]).all()),
                      "resources": s["resources"]})
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
