"""Which phase makes 2 workers end elsewhere than one process (issue 22's GTSRB comparison)?

Runs the trainer of `coreg-ray train` in-process, on one process or on 2 gloo ranks (each
owning half the rows, as `--workers 2` does), on the table of benchmarks/scripts/gtsrb_workers.sh
(first 4,000 GTSRB training rows, its CLIP-like simulated candidate sets, the first 2,000 test
rows, the same config), in two steps that can be crossed:

    # the warm-up (10 epochs) on W ranks, its state saved with every row's per-sample state
    python benchmarks/scripts/shard_phase_probe.py warm --world 2 --seed 0 --data DATA --out runs/probe/warm-w2-s0.pt
    # the Co-Reg phase (epochs 11-20) on W ranks from a saved warm-up state
    python benchmarks/scripts/shard_phase_probe.py coreg --world 2 --data DATA --state runs/probe/warm-w1-s0.pt \
        --tag "w1 warm-up, 2 ranks" --rows benchmarks/results/shard_phase_probe.jsonl

DIR (--dir): the folder gtsrb_workers.sh writes (clip-like.parquet, test/test.parquet);
DATA (--data): the GTSRB tables. One JSON line per Co-Reg epoch (test accuracy, P share).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SETS = {"model": {"backbone": "small_cnn"}, "data": {"hflip": False},
        "train": {"epochs": 20, "warmup_epochs": 10, "batch_size": 64, "warmup_batch_size": 128,
                  "lr": 0.05, "eval_every": 1},
        "coreg": {"feature_delay": 2, "rampup_epochs": 3, "queue_size": 4096}}
PER_SAMPLE = ("pred_table", "split_w", "scores")


def config(seed: int):
    from coreg_ray.config import Config

    d = Config().to_dict()
    for section, keys in SETS.items():
        d[section].update(keys)
    d["train"]["seed"] = seed
    return Config.from_dict(d)


def inputs(args):
    from coreg_ray.data import load_image_table, load_run_inputs

    train, _, ann = load_run_inputs(f"{args.data}/train.parquet", f"{args.dir}/clip-like.parquet",
                                    None, None, 4000)
    return train, ann, load_image_table(f"{args.dir}/test/test.parquet", None)


class _Stop(Exception):
    pass


def _from_state():
    from coreg_ray.coreg.trainer import CoReg

    class FromState(CoReg):
        """Restores a state saved by `warm` (every row's per-sample state): this rank's rows."""

        def load_state(self, state, where="state", shards=None):
            self._load_state(state)
            lo, hi = self.lo, self.lo + self.n
            for key in PER_SAMPLE:
                setattr(self, key, [t[lo:hi].to(self.device) for t in getattr(self, key)])
            self.div_history = [[t[lo:hi] for t in h] for h in self.div_history]

    return FromState


def _trainer(args, rank, world, callbacks):
    """(trainer, this rank's train / annotation / test rows)."""
    from coreg_ray.data.shards import Shard, shard_bounds

    train, ann, test = inputs(args)
    cfg, cls = config(args.seed), _from_state()
    if world == 1:
        return cls(cfg, callbacks=callbacks, progress=False), train, ann, test
    from coreg_ray.coreg.comm import TorchDistComm

    shard = Shard(rank, world, len(train))
    rows = np.arange(*shard.bounds)
    test_rows = np.arange(*shard_bounds(len(test), world)[rank])
    t = cls(cfg, comm=TorchDistComm(), shard=shard, callbacks=callbacks, progress=False)
    return t, train.subset(rows), ann.subset(rows), test.subset(test_rows)


def _rank(rank, world, args):
    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank,
                                world_size=world)
    if args.step == "warm":
        def stop(epoch, stats, t):
            if epoch == t.cfg.train.warmup_epochs - 1:
                st = t.checkpoint_state(epoch, per_sample=True)
                gather = t.comm.gather_rows
                for key in PER_SAMPLE:  # every row's state, in row order, on rank 0
                    st[key] = [gather(x, t.counts).cpu() for x in getattr(t, key)]
                st["div_history"] = [[], []]
                if rank == 0:
                    torch.save(st, args.out)
                raise _Stop

        t, train, ann, test = _trainer(args, rank, world, [stop])
        try:
            t.fit(train, ann, None)
        except _Stop:
            pass
    else:
        def row(epoch, stats, t):
            if rank == 0 and "test_accuracy" in stats:
                r = {"tag": args.tag, "world": world, "state": Path(args.state).name,
                     "epoch": epoch, "test_accuracy": round(stats["test_accuracy"], 4),
                     "p_fraction": round(stats.get("p_fraction", float("nan")), 4)}
                print(json.dumps(r), flush=True)
                if args.rows:
                    with open(args.rows, "a") as f:
                        f.write(json.dumps(r) + "\n")

        t, train, ann, test = _trainer(args, rank, world, [row])
        state = torch.load(args.state, weights_only=False)
        t.fit(train, ann, test, None, initial_state=state)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("warm", "coreg"))
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", required=True, help="the folder with the GTSRB train.parquet")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "gtsrb-workers"))
    ap.add_argument("--out", help="warm: where the state goes")
    ap.add_argument("--state", help="coreg: a state saved by warm")
    ap.add_argument("--tag", default="")
    ap.add_argument("--rows", help="coreg: append one JSON line per epoch here")
    args = ap.parse_args()
    needs = {"warm": ("out", "--out"), "coreg": ("state", "--state")}[args.step]
    if not getattr(args, needs[0]):
        ap.error(f"{args.step} needs {needs[1]}")
    if args.step == "coreg" and not Path(args.state).is_file():
        ap.error(f"--state: not a file: {args.state}")
    if not (Path(args.data) / "train.parquet").is_file():
        ap.error(f"--data: no train.parquet in {args.data}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.world == 1:
        return _rank(0, 1, args)
    import tempfile

    import torch.multiprocessing as mp

    args.store = Path(tempfile.mkdtemp()) / "store"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, args.world, args)) for r in range(args.world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit("a rank failed")


if __name__ == "__main__":
    main()
