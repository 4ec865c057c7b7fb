"""Where the time of a Co-Reg step goes: torch.profiler over the post-warm-up training steps.

    python3 benchmarks/scripts/profile_step.py --images .devdata/cifar10-jpeg/train.parquet \
        --limit 50000 --steps 30 --out $OUT

Runs 1 warm-up epoch (untimed), then profiles `--steps` steps of `train_net` (net 1 on net 2's
split) with prototypes and the contrastive term on. Prints the top operators by device time,
the number of kernel launches per step and the wall time per step, and writes a Chrome trace
(`OUT/trace.json.gz`, opens in Perfetto) and `OUT/profile.txt`. Made to decide what to speed up next (compile, CUDA
graphs, fused optimiser, fewer augmentation kernels): see benchmarks/gpu_h200.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # the repository root (no install needed)
sys.path.insert(0, str(REPO))

from coreg_ray.config import Config  # noqa: E402
from coreg_ray.coreg.trainer import CoReg  # noqa: E402
from coreg_ray.data import load_image_table, synthetic_annotations  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(REPO / ".devdata/cifar10-jpeg/train.parquet"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "runs/profile"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_image_table(args.images, limit=args.limit)
    ann = synthetic_annotations(table.ids, table.labels, table.num_classes, 0.1, 0.1)
    cfg = Config.load(overrides=[
        f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
        f"train.warmup_batch_size={2 * args.batch_size}", "train.warmup_epochs=1", "train.epochs=2",
        "coreg.feature_delay=-1", "tracking.mlflow=false", "train.eval_every=1000"])
    trainer = CoReg(cfg, progress=False)
    trainer.fit(table, ann)  # warm-up + one Co-Reg epoch: shapes autotuned, queue filled
    cuda = trainer.device.type == "cuda"

    # profile net 1's steps of the next epoch, capped at --steps batches
    epoch = 1
    split = trainer._split_batches
    taken = []

    def capped(e, a, is_p):  # the epoch's batches, at most --steps of them (P may give fewer)
        taken[:] = split(e, a, is_p)[:args.steps]
        return list(taken)

    trainer._split_batches = capped
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        trainer.train_net(epoch, 0, 1)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    text = events.table(sort_by=sort, row_limit=40)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC"))
    steps = max(len(taken), 1)
    head = (f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
            f"{len(table)} images, {args.backbone}, batch {args.batch_size}: "
            f"{steps} steps in {wall:.3f} s = {1000 * wall / steps:.1f} ms/step (profiler on), "
            f"{launches / steps:.0f} kernel launches/step\n")
    print(head + text, flush=True)
    (out / "profile.txt").write_text(head + text)
    import gzip
    import shutil

    tmp = out / "trace.json"
    prof.export_chrome_trace(str(tmp))
    with open(tmp, "rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)  # compressed: what comes back from a device call is capped
    tmp.unlink()


if __name__ == "__main__":
    main()
