"""One GPU call: Co-Reg seconds per epoch on the 50k CIFAR-10 copy (PreAct ResNet-18, batch 256)
and annotator vs warm-up-only vs Co-Reg at full size, with the epoch count sized to a budget.

    python benchmarks/scripts/gpu_cifar.py --data .devdata/cifar10-jpeg \
        --ann .devdata/ann/sim-pc100.parquet --ann-stats .devdata/ann/sim-pc100.json \
        --out $OUT --budget 400

1. Speed (alone on the GPU): 1 warm-up + 3 Co-Reg epochs on all training images with the
   given annotations, prototypes and contrastive term on from the first Co-Reg epoch; eager,
   then (`--compile-speed`, a child process stopped after --compile-timeout s) the same with
   `train.compile=true` (+1 epoch: the first epochs pay the compilation).
2. Accuracy: from the measured epoch times, the largest E <= --max-epochs (warm-up W = E/4,
   or --epochs/--warmup fixed) for which the `--runs` x `--seeds` fit in the rest of the budget
   (sequential cost x --concurrency-factor); they then run concurrently as child processes
   (eager unless --compile-runs), one JSON line per epoch in OUT/NAME-seedS.jsonl (so a run
   stopped by the budget still leaves its curve), test accuracy every epoch.

Only torch, torchvision, numpy, pyarrow, Pillow, scikit-learn are needed (no Ray/MLflow), so it
runs on the device machine from the checkout (the script puts the repository root on sys.path).
Default paths (--data, --ann, --out) are taken from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.scripts.gpu_common import (REPO, SCRATCH, decode_tables,  # noqa: E402
                                           load_annotations, load_tables, run_children,
                                           short_run_overrides)
from coreg_ray.config import Config  # noqa: E402
from coreg_ray.coreg.trainer import CoReg  # noqa: E402

RUNS = {  # applied after short_run_overrides(E, W)
    "warmup-only": lambda e, w: [f"train.warmup_epochs={e}"],
    "coreg-paper-split": lambda e, w: ["coreg.class_balanced_split=false"],
    "coreg-balanced-split": lambda e, w: ["coreg.class_balanced_split=true"],
}


def base_overrides(args, seed: int) -> list[str]:
    return [f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
            f"train.warmup_batch_size={2 * args.batch_size}", "tracking.mlflow=false",
            f"train.seed={seed}"]


def emit(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def child(args) -> None:
    torch.set_num_threads(4)
    tables = load_tables(args.tables)
    train, test = tables["train"], tables["test"]
    ann = load_annotations(args.ann, train)
    if args.run == "speed-compiled":
        result = measure_speed(args, train, ann, True)
        (Path(args.out) / "speed-compiled.json").write_text(json.dumps(result, indent=1))
        return
    cfg = Config.load(overrides=base_overrides(args, args.seeds[0]) + list(args.set)
                      + ["train.eval_every=1"])
    out = Path(args.out) / f"{args.run}.jsonl"
    emit(out, {"run": args.run, "config": cfg.to_dict()})

    def log(epoch, stats, trainer):
        keep = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()}
        emit(out, keep)

    final = CoReg(cfg, callbacks=[log], progress=False).fit(train, ann, test)
    emit(out, {"final_test_accuracy": final.get("test_accuracy"), "seconds": final["seconds"]})


def measure_speed(args, train, ann, compile_: bool) -> dict:
    """1 warm-up + `speed_epochs` Co-Reg epochs alone on the device; seconds per epoch."""
    speed = []

    def timed(epoch, stats, trainer):
        speed.append({"epoch": epoch, "phase": stats["phase"],
                      "seconds": round(stats["epoch_seconds"], 3),
                      "p_fraction": stats.get("p_fraction"), "bf16": trainer.bf16,
                      "channels_last": trainer.channels_last, "compile": compile_})
        print(json.dumps(speed[-1]), flush=True)

    epochs = 1 + args.speed_epochs + (1 if compile_ else 0)
    cfg = Config.load(overrides=base_overrides(args, args.seeds[0]) + [
        f"train.epochs={epochs}", "train.warmup_epochs=1", "coreg.feature_delay=-1",
        "train.eval_every=100000", f"train.compile={compile_}"] + list(args.speed_set))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    CoReg(cfg, callbacks=[timed], progress=False).fit(train, ann)
    out = {"epochs": speed, "warmup_epoch_seconds": speed[0]["seconds"],
           "first_coreg_epoch_seconds": speed[1]["seconds"],
           # steady state: the cheapest of the last two (the first ones pay autotuning/compiling)
           "steady_coreg_epoch_seconds": min(s["seconds"] for s in speed[-2:]),
           "max_coreg_epoch_seconds": max(s["seconds"] for s in speed[-2:])}
    if torch.cuda.is_available():
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
    return out


def plan_epochs(args, t_w: float, t_c: float, left: float):
    """Largest E (warm-up W = E/4) whose cost fits `left` seconds: each run's epochs at the
    measured alone-on-the-device times, summed over runs and seeds, times the concurrency factor
    (runs sharing the device finish sooner than one after the other)."""
    if args.epochs:
        return args.epochs, args.warmup or max(2, round(args.epochs / 4))
    best = None
    for e in range(4, args.max_epochs + 1):
        w = max(2, round(e / 4))
        per_seed = sum(e * t_w if name == "warmup-only" else w * t_w + (e - w) * t_c
                       for name in args.runs)
        if per_seed * len(args.seeds) * args.concurrency_factor <= left:
            best = (e, w)
    return best


def driver(args) -> None:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "python": sys.version.split()[0]}
    print(json.dumps(env), flush=True)
    tables = str(SCRATCH / "coreg-cifar-tables.pt")
    train, test, decode_s = decode_tables(args.data, args.limit, tables)
    ann = load_annotations(args.ann, train)
    summary = {"env": env, "train_images": len(train), "test_images": len(test),
               "decode_seconds": round(decode_s, 2), "backbone": args.backbone,
               "batch_size": args.batch_size, "seeds": args.seeds, "runs": args.runs}
    if args.ann_stats:
        summary["annotator"] = [json.loads(line) for line in open(args.ann_stats)
                                if line.startswith("{")]

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    # 1. speed, alone on the device: eager, then compiled (in a child with a time limit: an
    #    Inductor compile of every graph can take minutes, and must not eat the accuracy runs)
    summary["speed"] = {"eager": measure_speed(args, train, ann, False)}
    save()
    if args.compile_speed:
        path = out / "speed-compiled.json"
        cmd = [sys.executable, __file__, "--run", "speed-compiled", "--tables", tables,
               "--ann", args.ann, "--out", str(out), "--backbone", args.backbone,
               "--batch-size", str(args.batch_size), "--seeds", str(args.seeds[0]),
               "--speed-epochs", str(args.speed_epochs)]
        try:
            subprocess.run(cmd, timeout=args.compile_timeout, check=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            summary["speed"]["compiled"] = json.loads(path.read_text())
        except subprocess.TimeoutExpired:
            summary["speed"]["compiled"] = {"error": f"not done within {args.compile_timeout} s"}
        except subprocess.CalledProcessError as exc:
            summary["speed"]["compiled"] = {"error": f"exit status {exc.returncode} (see the log)"}
    use_compile = args.compile_runs
    fast = summary["speed"]["eager"]
    save()
    if not args.runs:
        return

    # 2. plan the accuracy runs
    left = args.budget - (time.perf_counter() - t_start) - args.overhead
    plan = plan_epochs(args, fast["warmup_epoch_seconds"], fast["max_coreg_epoch_seconds"], left)
    if plan is None:
        summary["plan"] = {"skipped": f"only {left:.0f} s left"}
        save()
        print("no time left for the accuracy runs", flush=True)
        return
    e, w = plan
    summary["plan"] = {"epochs": e, "warmup_epochs": w, "seconds_left": round(left),
                       "compile": use_compile, "extra": short_run_overrides(e, w)}
    print(json.dumps(summary["plan"]), flush=True)
    save()

    cmds = {}
    for seed in args.seeds:
        for name in args.runs:
            run = f"{name}-seed{seed}"
            cmd = [sys.executable, __file__, "--run", run, "--tables", tables, "--ann", args.ann,
                   "--out", str(out), "--backbone", args.backbone,
                   "--batch-size", str(args.batch_size), "--seeds", str(seed)]
            for s in short_run_overrides(e, w) + RUNS[name](e, w) + [f"train.compile={use_compile}"]:
                cmd += ["--set", s]
            cmds[run] = cmd
    with open(out / "logs.txt", "w") as log:
        procs = run_children(cmds, t_start + args.budget, log, t_start=t_start)
    results = {}
    for run in procs:
        path = out / f"{run}.jsonl"
        lines = [json.loads(x) for x in open(path)] if path.exists() else []
        epochs = [x for x in lines if "epoch" in x]
        results[run] = {"epochs_done": len(epochs), "returncode": procs.get(run, {}).get("returncode"),
                        "final_test_accuracy": next((x["final_test_accuracy"] for x in lines
                                                    if "final_test_accuracy" in x), None),
                        "last_test_accuracy": epochs[-1].get("test_accuracy") if epochs else None,
                        "curve": [x.get("test_accuracy") for x in epochs],
                        "mean_epoch_seconds_concurrent": round(sum(x["epoch_seconds"] for x in epochs)
                                                               / max(len(epochs), 1), 2)}
    summary["results"] = results
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps({k: {kk: v[kk] for kk in ("epochs_done", "final_test_accuracy")}
                      for k, v in results.items()}, indent=1), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / ".devdata/cifar10-jpeg"))
    ap.add_argument("--ann", default=str(REPO / ".devdata/ann/sim-pc100.parquet"))
    ap.add_argument("--ann-stats", default=None)
    ap.add_argument("--out", default=str(REPO / "runs/gpu-cifar"))
    ap.add_argument("--budget", type=float, default=400.0, help="wall seconds for the whole script")
    ap.add_argument("--overhead", type=float, default=45.0,
                    help="seconds reserved for child start-up and final evaluation")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=None, help="fix E instead of sizing it")
    ap.add_argument("--warmup", type=int, default=None, help="with --epochs: W (default E/4)")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--compile-speed", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the speed with train.compile=true (in a child process)")
    ap.add_argument("--compile-timeout", type=float, default=150.0)
    ap.add_argument("--speed-set", action="append", default=[],
                    help="extra config override for the speed runs (repeatable)")
    ap.add_argument("--compile-runs", action="store_true",
                    help="run the accuracy runs compiled (each child compiles its own graphs)")
    ap.add_argument("--concurrency-factor", type=float, default=0.8)
    ap.add_argument("--speed-epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tables", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    child(args) if args.run else driver(args)


if __name__ == "__main__":
    main()
