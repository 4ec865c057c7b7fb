"""One GPU call: the methods table (issue #5) at full CIFAR-10 size, PreAct ResNet-18, every
method for the same number of epochs, runs concurrently on the one GPU.

    python benchmarks/scripts/gpu_table.py --data .devdata/cifar10-jpeg \
        --ann .devdata/ann/sim-pc100.parquet --test-ann .devdata/ann/sim-pc100-test.parquet \
        --out $OUT --epochs 12 --seed 1 --budget 480

Settings: `sim` (the carried simulated-VLM annotation tables) and/or `synthetic` (q, eta drawn
here). Each (setting, method) is a child process running `coreg_ray.methods.run_method`; each
writes one JSON line per epoch under the temporary folder, and the driver gathers every run (finished or
stopped by the budget) into OUT/results.jsonl. Only torch, numpy, pyarrow, Pillow and
scikit-learn are needed (no Ray/MLflow): run from the checkout (the script puts the repository
root on sys.path; default paths are taken from it).
Render the table here afterwards with `coreg_ray.experiment` (see benchmarks/gpu_h200.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.scripts.gpu_common import (REPO, SCRATCH, decode_tables,  # noqa: E402
                                           load_tables, restrict, run_children,
                                           short_run_overrides)
from coreg_ray.config import Config  # noqa: E402
from coreg_ray.data import read_annotations, synthetic_annotations  # noqa: E402
from coreg_ray.methods import run_method  # noqa: E402

METHODS = ["zero_shot", "kd_unsup", "cc", "proden", "rc", "lws", "cr_dpll", "pico", "pico_plus",
           "alim_onehot", "alim_scale", "dividemix", "warmup_only", "coreg"]
RUN_DIR = SCRATCH / "coreg-gpu-table"


def config_for(args, warmup: int) -> Config:
    return Config.load(overrides=[
        f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
        f"train.warmup_batch_size={2 * args.batch_size}", f"train.seed={args.seed}",
        "tracking.mlflow=false"] + short_run_overrides(args.epochs, warmup))


def annotations_for(setting: str, args, train, test):
    if setting == "sim":
        return restrict(read_annotations(args.ann, train.num_classes), train, args.ann), \
            restrict(read_annotations(args.test_ann, test.num_classes), test, args.test_ann)
    if setting == "synthetic":
        return synthetic_annotations(train.ids, train.labels, train.num_classes, args.q, args.eta,
                                     seed=args.seed), None
    raise SystemExit(f"unknown setting {setting}")


def child(args) -> None:
    torch.set_num_threads(2)
    tables = load_tables(args.tables)
    train, test = tables["train"], tables["test"]
    ann, test_ann = annotations_for(args.setting, args, train, test)
    cfg = config_for(args, max(2, round(args.epochs / 4)))
    log = RUN_DIR / f"{args.setting}.{args.method}.jsonl"

    def cb(epoch, stats, trainer):
        with open(log, "a") as f:
            f.write(json.dumps({k: v for k, v in stats.items() if isinstance(v, (int, float, str))}) + "\n")

    out = run_method(args.method, cfg, train, ann, test, test_annotations=test_ann, callbacks=[cb])
    out.pop("history", None)
    (RUN_DIR / f"{args.setting}.{args.method}.json").write_text(json.dumps(out))


def gather(args, started: dict) -> list[dict]:
    rows = []
    for key, info in started.items():
        setting, method = key.split("/", 1)
        final = RUN_DIR / f"{setting}.{method}.json"
        curve = RUN_DIR / f"{setting}.{method}.jsonl"
        hist = [json.loads(x) for x in open(curve)] if curve.exists() else []
        row = {"setting": setting, "method": method, "seed": args.seed, "epochs": args.epochs,
               "returncode": info["returncode"], "wall_seconds": info["wall"]}
        if final.exists():
            row.update(json.loads(final.read_text()))
            row["status"] = "ok"
        else:
            rc = info["returncode"]
            row["status"] = "stopped" if rc is None or rc < 0 else "failed"
            row["epochs_done"] = len(hist)
            row["last_test_accuracy"] = hist[-1].get("test_accuracy") if hist else None
        row["curve"] = [h.get("test_accuracy") for h in hist]
        rows.append(row)
    return rows


def driver(args) -> None:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for f in RUN_DIR.glob("*"):
        f.unlink()
    env = {"torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(env), flush=True)
    tables = str(SCRATCH / "coreg-table-tables.pt")
    train, test, _ = decode_tables(args.data, args.limit, tables)
    jobs = [(s, m) for s in args.settings for m in args.methods
            if not (m == "zero_shot" and s != "sim")]
    # longest first, so the slow Co-Reg runs are not the last to start
    order = {"coreg": 0, "dividemix": 1, "warmup_only": 2, "cr_dpll": 3, "pico_plus": 4}
    jobs.sort(key=lambda j: order.get(j[1], 10))
    cmds = {f"{s}/{m}": [sys.executable, __file__, "--child", "--setting", s, "--method", m,
                         "--tables", tables] + args.passthrough for s, m in jobs}
    with open(out / "logs.txt", "w") as log:
        started = run_children(cmds, t_start + args.budget, log, args.parallel,
                               env={"OMP_NUM_THREADS": "2"}, t_start=t_start)
    pending = [k.split("/", 1) for k in cmds if k not in started]
    rows = gather(args, started)
    rows += [{"setting": s, "method": m, "status": "not started"} for s, m in pending]
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = {"env": env, "epochs": args.epochs, "seed": args.seed, "backbone": args.backbone,
               "train_images": len(train), "test_images": len(test), "parallel": args.parallel,
               "total_seconds": round(time.perf_counter() - t_start, 1),
               "accuracy": {f"{r['setting']}/{r['method']}": r.get("test_accuracy", r.get("last_test_accuracy"))
                            for r in rows}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / ".devdata/cifar10-jpeg"))
    ap.add_argument("--ann", default=str(REPO / ".devdata/ann/sim-pc100.parquet"))
    ap.add_argument("--test-ann", default=str(REPO / ".devdata/ann/sim-pc100-test.parquet"))
    ap.add_argument("--out", default=str(REPO / "runs/gpu-table"))
    ap.add_argument("--settings", nargs="+", default=["sim"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--q", type=float, default=0.3)
    ap.add_argument("--eta", type=float, default=0.3)
    ap.add_argument("--backbone", default="preact_resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=14)
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tables", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.passthrough = ["--ann", args.ann, "--test-ann", args.test_ann, "--epochs", str(args.epochs),
                        "--seed", str(args.seed), "--q", str(args.q), "--eta", str(args.eta),
                        "--backbone", args.backbone, "--batch-size", str(args.batch_size)]
    child(args) if args.child else driver(args)


if __name__ == "__main__":
    main()
