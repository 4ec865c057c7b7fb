"""CLIP annotation throughput: images/s of `run_annotation` on a slice of the CIFAR-10 copy.

    .venv/bin/python benchmarks/scripts/annotate_throughput.py \
        --spec clip:ViT-B-32/random --images 256 --actors 1 2 [--local] [--image-size 224]

For every actor count it runs the Ray Data pipeline once on a fresh output (Ray started once,
with all local CPUs/GPUs) and prints end-to-end images/s (actor start-up included) and the
steady rate after the first result; --local adds the in-process engine (no Ray) as a
reference. Results are appended as JSON lines to --out (default benchmarks/results/annotate_results.jsonl).
Random weights cost the same compute as real ones, so the numbers hold for pretrained models.
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

DEFAULT_DATA = ROOT.parent / "shared/data/cifar10-jpeg/train.parquet"


def hardware() -> dict:
    info = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def raw_encoder(args, hw) -> list[dict]:
    """Images/s of model.encode_image alone on random pixels (an upper bound for the CPU)."""
    import torch

    from coreg_ray.annotate.clip import load_clip_model

    model, _, prep = load_clip_model(args.spec, image_size=args.image_size)
    bs = args.batch_size or 32
    x = torch.randn(bs, 3, prep["size"], prep["size"])
    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model.encode_image(x)  # warm-up
            t = time.time()
            reps = max(1, args.images // bs)
            for _ in range(reps):
                model.encode_image(x)
            dt = time.time() - t
        row = {"spec": args.spec, "engine": "raw-encoder", "threads": threads, "images": reps * bs,
               "image_size": prep["size"], "batch_size": bs, "seconds": round(dt, 2),
               "images_per_s": round(reps * bs / dt, 2), "hardware": hw,
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "hardware"}), flush=True)
    torch.set_num_threads(default_threads)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="clip:ViT-B-32/random")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--templates", default="small")
    ap.add_argument("--local", action="store_true", help="also time the in-process engine")
    ap.add_argument("--raw", action="store_true",
                    help="also time the bare image encoder (no decode, no Ray) at 1 and all threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/annotate_results.jsonl"))
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq
    import ray

    from coreg_ray.annotate.pipeline import run_annotation

    work = Path(tempfile.mkdtemp(prefix="annbench"))
    src = Path(args.data)
    pq.write_table(pq.read_table(src).slice(0, args.images), work / "images.parquet")
    if (src.parent / "classes.json").exists():
        shutil.copy(src.parent / "classes.json", work / "classes.json")
    hw = hardware()
    print(json.dumps(hw))
    results = []
    if args.raw:
        results += raw_encoder(args, hw)
    runs = [("ray", n) for n in args.actors] + ([("local", None)] if args.local else [])
    t0 = time.time()
    ray.init(include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.time() - t0:.1f} s", flush=True)
    try:
        for engine, n in runs:
            out = work / f"ann-{engine}-{n}.parquet"
            rep = run_annotation(work / "images.parquet", [args.spec], out, engine=engine,
                                 num_actors=n, batch_size=args.batch_size,
                                 image_size=args.image_size, templates=args.templates,
                                 shard_size=max(1, args.images // 4), restart=True, progress=False)
            t = rep["timing"]
            row = {"spec": args.spec, "engine": engine, "actors": n, "images": args.images,
                   "image_size": args.image_size or "model default",
                   "batch_size": args.batch_size or ("ray default" if engine == "ray" else 32),
                   "seconds": round(t["seconds"], 2),
                   "images_per_s": round(t["images_per_s"], 2),
                   "first_result_s": round(t.get("first_result_s", 0.0), 2),
                   "first_result_from_call_s": round(t.get("first_result_from_call_s", 0.0), 2),
                   "total_seconds": round(t.get("total_seconds", 0.0), 2),
                   "steady_images_per_s": round(t.get("steady_images_per_s", 0.0), 2),
                   "resources": rep["resources"], "hardware": hw,
                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "hardware"}), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
