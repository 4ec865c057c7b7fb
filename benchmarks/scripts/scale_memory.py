"""Peak memory and step time of sharded Co-Reg training on a generated pool
(benchmarks/scripts/scale_pool.py), one JSON line per run appended to --results (a run already
there, same n / workers / divide / backbone / what the driver reads, is skipped: the script
resumes). Rows before issue 22's fix have no `driver_reads` key: their driver read the whole
annotation table ("annotation table"); this script's driver reads its id column only
("annotation ids").

    python benchmarks/scripts/scale_memory.py --pool POOLS/pool100k --workers 2 \
        --results benchmarks/results/scale_cpu.jsonl

The driver is the real one (`check_sharded_inputs`: the id and label columns only; of the
annotation file its id column, never the candidate sets); each Ray Train worker reads and
decodes its rows from the Parquet file, reads its annotation rows by id from the annotation
file (`shard_annotations`, as `coreg-ray train --workers` does) and builds the real trainer on
its shard (`CoReg(shard=...)._prepare`), then times a
bounded number of steps: --steps warm-up steps per network, optionally one full divide pass
(--divide), --steps Co-Reg steps per network (on a random half P / half U split when the
divide pass is skipped). Peak RSS is each process's high-water mark (VmHWM in /proc/PID/status)
read at the end: every worker's, and the driver process's (Ray's raylet and object store run
in processes of their own and are not counted in either).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


DRIVER_READS = "annotation ids"  # of the annotation file, the driver reads its id column only
READER = "chunked"  # a worker decodes its rows chunk by chunk into one preallocated table
# (rows without the key were measured with the reader before it: "stacked", ~4.5x the images)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loop(c: dict):
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from coreg_ray.config import Config
    from coreg_ray.coreg.comm import TorchDistComm
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data.shards import Shard
    from coreg_ray.distributed.shard_data import shard_annotations

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(c["config"])
    cfg.train.device = "cpu"
    lo, hi = Shard(rank, world, c["rows"]).bounds
    t0 = time.perf_counter()
    train = c["src"].read_rows(lo, hi, c["size"])
    ann, _, key = shard_annotations(c["ann"], train, lo, hi)
    shard = Shard(rank, world, c["rows"], tuple(c["trusted"]),
                  dict(c["fingerprint"], candidate_sets=key))
    trainer = CoReg(cfg, comm=TorchDistComm(), shard=shard, progress=False)
    trainer._prepare(train, ann, None)
    del train, ann
    read_s = time.perf_counter() - t0
    k = c["steps"]
    shard_batches, split_batches = trainer._shard, trainer._split_batches
    trainer._shard = lambda *a, **kw: shard_batches(*a, **kw)[:k]
    trainer._split_batches = lambda *a, **kw: split_batches(*a, **kw)[:k]
    t0 = time.perf_counter()
    trainer.warmup_epoch(0)
    warm = (time.perf_counter() - t0) / (2 * k)
    divide_s = None
    if c["divide"]:
        t0 = time.perf_counter()
        trainer.divide(5)
        divide_s = time.perf_counter() - t0
    else:
        g = torch.Generator().manual_seed(rank)
        trainer.split_w = [torch.rand(trainer.n, generator=g) for _ in range(2)]
    t0 = time.perf_counter()
    trainer.coreg_epoch(5)
    coreg = (time.perf_counter() - t0) / (2 * k)
    peaks = [None] * world
    dist.all_gather_object(peaks, {"rank": rank, "rows": hi - lo, "peak_rss_mb": peak_rss_mb(),
                                   "read_s": read_s})
    if rank == 0:  # this machine: the driver reads it back
        Path(c["out_file"]).write_text(json.dumps({
            "warmup_step_s": warm, "coreg_step_s": coreg, "divide_s": divide_s,
            "workers_detail": peaks}))
    ray.train.report({"warmup_step_s": warm})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True, help="a folder from scale_pool.py")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--divide", action="store_true", help="also time one full divide pass")
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--results", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    pool = Path(args.pool)
    import pyarrow.parquet as pq

    n = pq.ParquetFile(pool / "train.parquet").metadata.num_rows
    results = Path(args.results)
    done = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] \
        if results.exists() else []
    if any((r["n"], r["workers"], r.get("divide", False), r.get("backbone"),
            r.get("driver_reads", "annotation table"), r.get("reader", "stacked")) ==
           (n, args.workers, args.divide, args.backbone, DRIVER_READS, READER) for r in done):
        print(f"already measured: n={n} workers={args.workers}")
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from coreg_ray.config import Config
    from coreg_ray.distributed.train import check_sharded_inputs

    cfg = Config.load(overrides=[f"model.backbone={args.backbone}", "tracking.mlflow=false",
                                 "train.epochs=10", "train.warmup_epochs=1",
                                 "coreg.feature_delay=1"])
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    src, _, train, _, ann, checked = check_sharded_inputs(
        cfg, str(pool / "train.parquet"), str(pool / "annotations.parquet"), None, None, None,
        args.workers)
    check_s = time.perf_counter() - t0
    driver_after_check_mb = peak_rss_mb()
    conf = {"config": cfg.to_dict(), "src": src, "ann": ann, "rows": len(train),
            "size": checked.size, "trusted": [int(i) for i in checked.trusted_index],
            "fingerprint": checked.fingerprint, "steps": args.steps, "divide": args.divide}
    del ann, train
    with tempfile.TemporaryDirectory(prefix="scale-") as d:
        conf["out_file"] = str(Path(d) / "measured.json")
        trainer = TorchTrainer(loop, train_loop_config=conf,
                               scaling_config=ScalingConfig(num_workers=args.workers,
                                                            resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="scale", storage_path=d))
        trainer.fit()
        m = json.loads(Path(conf["out_file"]).read_text())
    ray.shutdown()
    each = m["workers_detail"]
    row = {"n": n, "workers": args.workers, "image_size": checked.size,
           "worker_peak_rss_mb": max(w["peak_rss_mb"] for w in each),
           "worker_peak_rss_mb_each": [round(w["peak_rss_mb"], 1) for w in each],
           "driver_peak_rss_mb": peak_rss_mb(), "driver_peak_rss_after_check_mb":
               driver_after_check_mb, "warmup_step_s": m["warmup_step_s"],
           "coreg_step_s": m["coreg_step_s"], "divide": args.divide, "divide_s": m["divide_s"],
           "steps": args.steps, "batch_per_worker": cfg.train.batch_size // args.workers,
           "backbone": args.backbone, "read_and_prepare_s": max(w["read_s"] for w in each),
           "driver_check_s": check_s, "wall_s": time.perf_counter() - t0,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_avg_1m_at_end": os.getloadavg()[0], "note": args.note,
           "driver_reads": DRIVER_READS, "reader": READER}
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
