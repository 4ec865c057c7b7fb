"""Generate a large pool for the scale measurements (benchmarks/scale_cpu.md), no downloads:
images of an existing Parquet image table re-cropped (a random 20..32 px square, resized back
to 32x32) and re-coloured (channel permutation, per-channel gain), one new row each, with its
source's label; then candidate sets from a simulated annotator with the paper's statistics
(`coreg-ray simulate-annotator --like clip-vitb32 --dataset gtsrb`) or, with --synthetic,
synthetic noisy partial labels from the labels alone (cheap at 1M rows).

    python benchmarks/scripts/scale_pool.py --source DATA/gtsrb32/train.parquet \
        --rows 100000 --out POOLS/pool100k

writes POOLS/pool100k/{train.parquet (row groups of 10,000), classes.json, annotations.parquet}.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np


def generate(source: Path, rows: int, out: Path, seed: int = 0, group: int = 10_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    src = pq.read_table(source, columns=["image", "label"])
    blobs, labels = src.column("image").to_pylist(), src.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.parent / "classes.json", out / "classes.json")
    tmp = out / "train.parquet.tmp"
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int16())])
    with pq.ParquetWriter(tmp, schema) as w:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            pick = rng.integers(0, len(blobs), n)
            images = []
            for k in pick:
                with Image.open(io.BytesIO(blobs[k])) as im:
                    a = np.asarray(im.convert("RGB"))
                side = int(rng.integers(20, 33))
                y, x = rng.integers(0, a.shape[0] - side + 1), rng.integers(0, a.shape[1] - side + 1)
                crop = Image.fromarray(a[y:y + side, x:x + side]).resize((32, 32), Image.BILINEAR)
                c = np.asarray(crop, np.float32)[..., rng.permutation(3)]
                c = np.clip(c * rng.uniform(0.7, 1.3, 3), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(c).save(buf, format="JPEG", quality=90)
                images.append(buf.getvalue())
            w.write_table(pa.table({"id": pa.array(np.arange(start, start + n), pa.int64()),
                                    "image": pa.array(images, pa.binary()),
                                    "label": pa.array(labels[pick], pa.int16())}, schema=schema))
    tmp.rename(out / "train.parquet")


def annotate(out: Path, synthetic: bool) -> None:
    if synthetic:
        import pyarrow.parquet as pq

        from coreg_ray.data import synthetic_annotations, write_annotations

        t = pq.read_table(out / "train.parquet", columns=["id", "label"])
        classes = json.loads((out / "classes.json").read_text())
        ann = synthetic_annotations(t.column("id").to_numpy(), t.column("label").to_numpy(),
                                    len(classes), q=0.3, eta=0.1, seed=0)
        write_annotations(ann, out / "annotations.parquet")
        return
    from coreg_ray.cli import main

    rc = main(["simulate-annotator", "--images", str(out / "train.parquet"), "--like",
               "clip-vitb32", "--dataset", "gtsrb", "--output", str(out / "annotations.parquet")])
    if rc != 0:
        raise SystemExit(rc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="a Parquet image table (classes.json beside)")
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true",
                    help="synthetic candidate sets (q=0.3, eta=0.1) instead of simulate-annotator")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    if not (out / "train.parquet").exists():
        generate(Path(args.source), args.rows, out, args.seed)
    t1 = time.perf_counter()
    if not (out / "annotations.parquet").exists():
        annotate(out, args.synthetic)
    print(json.dumps({"rows": args.rows, "out": str(out), "generate_s": round(t1 - t0, 1),
                      "annotate_s": round(time.perf_counter() - t1, 1)}))


if __name__ == "__main__":
    main()
