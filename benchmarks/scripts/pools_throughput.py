"""Annotate and predict images/s from a folder of JPEG files against the same images in Parquet
(issue 21), in one process, one Ray runtime, the same model.

From --data/test.parquet (id, JPEG bytes, label) + classes.json it writes, in a temp folder:
  - folder/: the first --images images as files CLASS/ID.jpg (the table's own JPEG bytes, so
    both pools decode the same bytes);
  - parquet/: the same rows as a Parquet table whose string ids are those relative paths.
Then, for --rounds rounds (alternating which pool goes first), it runs through Ray Data:
  - predict with a student (--model, else one trained here for one epoch on --train-images);
  - annotate with a CLIP annotator (--clip, default random weights at full size) on the first
    --annotate-images,
and prints one JSON line per run (images/s end to end and steady, first result) plus a ratio
row per command (folder / Parquet), appended to --out. It also checks that both pools give the
same labels / candidate sets.

    nice .venv/bin/python benchmarks/scripts/pools_throughput.py --data DATA/cifar10-jpeg \
        --out benchmarks/results/pools_cpu.jsonl
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


def make_pools(data: Path, n: int, work: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = json.loads((data / "classes.json").read_text())
    tbl = pq.read_table(data / "test.parquet").slice(0, n)
    rels = [f"{classes[lab]}/{i:05d}.jpg" for i, lab in zip(tbl.column("id").to_pylist(),
                                                           tbl.column("label").to_pylist())]
    folder = work / "folder"
    for rel, blob in zip(rels, tbl.column("image").to_pylist()):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
    (folder / "classes.json").write_text(json.dumps(classes))
    par = work / "parquet"
    par.mkdir()
    order = sorted(range(len(rels)), key=lambda k: rels[k])  # the folder's order (by path)
    pq.write_table(pa.table({"id": pa.array([rels[k] for k in order], pa.string()),
                             "image": tbl.column("image").take(pa.array(order)),
                             "label": tbl.column("label").take(pa.array(order))}),
                   par / "train.parquet")
    (par / "classes.json").write_text(json.dumps(classes))
    return folder, par, classes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with test.parquet (+ train.parquet)")
    ap.add_argument("--images", type=int, default=2000, help="pool size for predict")
    ap.add_argument("--annotate-images", type=int, default=512)
    ap.add_argument("--clip", default="clip:ViT-B-32/random")
    ap.add_argument("--model", default=None, help="a student model.pt (else trained here)")
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="Ray's num_cpus")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", required=True, help="JSON lines to append to")
    a = ap.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch

    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.data.annotations import read_annotations
    from coreg_ray.predict import run_predict

    data = Path(a.data)
    work = Path(tempfile.mkdtemp(prefix="poolbench"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    hw = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
          "torch": torch.__version__, "python": platform.python_version()}
    rows = []

    def emit(row):
        row = dict(row, when=when, hardware=hw, note=a.note)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "hardware"}), flush=True)

    try:
        folder, par, classes = make_pools(data, max(a.images, a.annotate_images), work)
        model = Path(a.model) if a.model else work / "model.pt"
        if not a.model:
            from coreg_ray.config import Config
            from coreg_ray.coreg.trainer import CoReg
            from coreg_ray.data import load_image_table, synthetic_annotations

            train = load_image_table(data / "train.parquet", None, a.train_images)
            ann = synthetic_annotations(train.ids, train.labels, train.num_classes, 0.3, 0.0, 0)
            cfg = Config.load(overrides=[f"model.backbone={a.backbone}", "train.epochs=1",
                                         "train.warmup_epochs=1", "tracking.mlflow=False",
                                         "train.device=cpu", "train.batch_size=64",
                                         "train.warmup_batch_size=64"])
            trainer = CoReg(cfg, progress=False)
            trainer.fit(train, ann)
            trainer.save_model(model)
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        results = {}
        for r in range(a.rounds):
            pools = [("parquet", par), ("folder", folder)]
            if r % 2:
                pools.reverse()
            for kind, pool in pools:
                out = work / f"pred-{kind}-{r}.parquet"
                s = run_predict(model, pool, out, limit=a.images, progress=False)
                results.setdefault(("predict", kind), []).append(s["images_per_s"])
                labels = pq.read_table(out, columns=["id", "label"]).to_pydict()
                results[("predict-labels", kind)] = labels
                emit({"step": "predict", "pool": kind, "round": r, "images": s["rows"],
                      "images_per_s": s["images_per_s"], "seconds": s["seconds"],
                      "steady_images_per_s": s.get("steady_images_per_s"),
                      "first_result_s": s.get("first_result_s"), "errors": s["errors"],
                      "resources": s["resources"]})
            for kind, pool in pools:
                src = pool
                out = work / f"ann-{kind}-{r}.parquet"
                # the first --annotate-images of the pool: a Parquet slice / a sub-folder list is
                # not a pool form, so both pools are cut by a copy of that many rows
                cut = work / f"cut-{kind}"
                if not cut.exists():
                    _cut(kind, pool, cut, a.annotate_images)
                src = cut
                rep = run_annotation(src, [a.clip], out, classes=classes, progress=False,
                                     templates="small")
                t = rep["timing"]
                results.setdefault(("annotate", kind), []).append(t["images_per_s"])
                results[("annotate-cand", kind)] = read_annotations(out)
                emit({"step": "annotate", "pool": kind, "round": r,
                      "images": rep["rows_in_input"], "annotator": a.clip,
                      "images_per_s": round(t["images_per_s"], 2),
                      "steady_images_per_s": t.get("steady_images_per_s"),
                      "first_result_s": t.get("first_result_s"), "seconds": t["seconds"],
                      "resources": rep["resources"]})
        for cmd in ("predict", "annotate"):
            f, p = np.mean(results[(cmd, "folder")]), np.mean(results[(cmd, "parquet")])
            same = None
            if cmd == "predict":
                same = results[("predict-labels", "folder")] == results[("predict-labels", "parquet")]
            else:
                x, y = results[("annotate-cand", "folder")], results[("annotate-cand", "parquet")]
                same = x.ids.tolist() == y.ids.tolist() and bool((x.candidates == y.candidates).all())
            emit({"step": f"{cmd}-ratio", "folder_images_per_s": round(float(f), 2),
                  "parquet_images_per_s": round(float(p), 2),
                  "folder_vs_parquet": round(float(f / p), 3), "same_results": same})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return 0


def _cut(kind: str, pool: Path, dst: Path, n: int) -> None:
    """The first n rows (by id = relative path) of a pool, as the same kind of pool."""
    import pyarrow.parquet as pq

    if kind == "parquet":
        dst.mkdir()
        pq.write_table(pq.read_table(pool / "train.parquet").slice(0, n), dst / "train.parquet")
        shutil.copy(pool / "classes.json", dst / "classes.json")
        return
    files = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.jpg"))[:n]
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pool / rel, dst / rel)
    shutil.copy(pool / "classes.json", dst / "classes.json")


if __name__ == "__main__":
    raise SystemExit(main())
