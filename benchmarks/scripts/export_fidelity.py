"""Max |delta logit| of `coreg-ray export` (ONNX, TorchScript) against the PyTorch model.

Trains a small student (small_cnn, 2 epochs: 1 warm-up + 1 Co-Reg) on the first 2,000 CIFAR-10
training images with synthetic candidate sets (q=0.3; batch 32, lr 0.05), exports it in both formats through the CLI, then
runs each export in a fresh process (onnxruntime / torch.jit.load, one thread) on the first
1,000 CIFAR-10 test images, in batches of 1 (first 16 images) and 250, and compares with
`Classifier.logits` in this process (fp32, CPU). Prints one JSON line; results for
benchmarks/export.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scripts/export_fidelity.py --output runs/export-bench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # the repository root
FRESH = r"""
import sys, numpy as np
fmt, model, images, out = sys.argv[1:]
x = np.load(images)
if fmt == "onnx":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    run = lambda a: sess.run(["logits"], {"images": np.ascontiguousarray(a)})[0]
else:
    import torch
    torch.set_num_threads(1)
    mod = torch.jit.load(model, map_location="cpu").eval()
    run = lambda a: mod(torch.from_numpy(np.ascontiguousarray(a))).detach().numpy()
big = np.concatenate([run(x[i:i + 250]) for i in range(0, len(x), 250)])
one = np.concatenate([run(x[i:i + 1]) for i in range(16)])
np.savez(out, big=big, one=one)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10-jpeg"))
    ap.add_argument("--output", default=str(REPO / "runs/export-bench"))
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()

    import torch

    from coreg_ray.cli import main as cli
    from coreg_ray.config import Config
    from coreg_ray.coreg.trainer import Classifier, CoReg
    from coreg_ray.data import load_image_table, synthetic_annotations

    torch.set_num_threads(1)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    train = load_image_table(f"{a.data}/train.parquet", None, a.train_images)
    test = load_image_table(f"{a.data}/test.parquet", None, a.test_images)
    ann = synthetic_annotations(train.ids, train.labels, train.num_classes, q=0.3, eta=0.0, seed=0)
    cfg = Config.load(overrides=["model.backbone=small_cnn", f"train.epochs={a.epochs}",
                                 "train.warmup_epochs=1", "tracking.mlflow=False",
                                 "train.device=cpu", "train.batch_size=32",
                                 "train.warmup_batch_size=32", "train.lr=0.05"])
    t0 = time.perf_counter()
    trainer = CoReg(cfg, progress=False)
    final = trainer.fit(train, ann, test)
    train_s = time.perf_counter() - t0
    trainer.save_model(out / "model.pt")
    clf = Classifier.load(out / "model.pt", "cpu")
    ref = clf.logits(test.images).numpy()
    np.save(out / "images.npy", np.ascontiguousarray(test.images.numpy()))
    res = {"train_images": len(train), "test_images": len(test), "backbone": "small_cnn",
           "epochs": a.epochs, "train_seconds": round(train_s, 1),
           "test_accuracy": final.get("test_accuracy"),
           "logit_abs_max": float(np.abs(ref).max()), "logit_std": float(ref.std())}
    for fmt, name in (("onnx", "student.onnx"), ("torchscript", "student.pt")):
        path = out / name
        assert cli(["export", "--model", str(out / "model.pt"), "--format", fmt,
                    "--output", str(path)]) == 0
        npz = out / f"{fmt}.npz"
        subprocess.run([sys.executable, "-c", FRESH, fmt, str(path), str(out / "images.npy"),
                        str(npz)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got = np.load(npz)
        res[fmt] = {"max_abs_diff_batch250": float(np.abs(got["big"] - ref).max()),
                    "max_abs_diff_batch1": float(np.abs(got["one"] - ref[:16]).max()),
                    "argmax_agreement": float((got["big"].argmax(1) == ref.argmax(1)).mean()),
                    "bytes": path.stat().st_size}
    import onnxruntime

    res["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                       "python": platform.python_version()}
    res["cpu"] = platform.processor() or platform.machine()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
