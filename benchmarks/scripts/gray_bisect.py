"""Grayscale bisect (issue 24): the grayscale probe's problem (scikit-learn digits letterboxed to
28x28, a SIMULATED annotator of 94 % partial accuracy / 2.4 candidates / 80 % ensemble accuracy,
the quickstart config with small_cnn, no flips, 40 epochs, 10 warm-up) run by the coreg_ray of
an OLDER commit, to find which change made Co-Reg fall below its annotator.

The data is made once by the current code (`--make-data`: images, labels, ids and candidate sets
in one .npz per seed), so every commit trains on exactly the same inputs; the run itself uses
only what every commit since bc95981 has (ImageTable, AnnotationTable, quickstart_config,
Config.set, run_method). Run a commit's code by putting a checkout of it first on PYTHONPATH:

    python benchmarks/scripts/gray_bisect.py --make-data runs/gray-bisect --seeds 0 1 2
    git worktree add --detach ../at-bc95981 bc95981
    PYTHONPATH=../at-bc95981 python benchmarks/scripts/gray_bisect.py --data runs/gray-bisect \
        --seed 0 --label bc95981 --out benchmarks/results/gray-probe/bisect.jsonl

One JSON line per (label, seed, method, overrides); rows already in --out are skipped.
"""
import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def make_data(folder: Path, seeds):
    from coreg_ray.annotate.simulated import PaperLikeAnnotator
    from coreg_ray.data import annotation_stats, load_image_table

    folder.mkdir(parents=True, exist_ok=True)
    train = load_image_table("digits:train", image_size=28)
    test = load_image_table("digits:test", image_size=28)
    for seed in seeds:  # the annotator of gray_probe.py, seed for seed
        sim = PaperLikeAnnotator(0.94, 2.4, 0.80, seed=seed).fit(train.images, train.labels, 10)
        ann = sim.annotate(train.images, train.labels, train.ids)
        test_ann = sim.annotate(test.images, test.labels, test.ids)
        np.savez_compressed(
            folder / f"seed{seed}.npz", train_x=train.images.numpy(), train_y=train.labels,
            train_ids=np.asarray(train.ids, np.int64), test_x=test.images.numpy(),
            test_y=test.labels, test_ids=np.asarray(test.ids, np.int64),
            candidates=ann.candidates,
            **{k: v for k, v in (("votes", ann.votes), ("probs", ann.probs)) if v is not None},
            annotator_test=annotation_stats(test_ann, test.labels)["ensemble_accuracy"])
        print(f"seed {seed}: {folder / f'seed{seed}.npz'}")


def run(args):
    import coreg_ray
    from coreg_ray.data import AnnotationTable
    from coreg_ray.data.tables import ImageTable
    from coreg_ray.methods import run_method
    from coreg_ray.quickstart import quickstart_config

    torch.set_num_threads(1)
    src = Path(coreg_ray.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["label"], r["seed"], r["method"], tuple(r["overrides"])))
    d = np.load(Path(args.data) / f"seed{args.seed}.npz")
    classes = [str(i) for i in range(10)]
    train = ImageTable(torch.from_numpy(d["train_x"]), d["train_ids"], d["train_y"], classes,
                       "digits28:train")
    test = ImageTable(torch.from_numpy(d["test_x"]), d["test_ids"], d["test_y"], classes,
                      "digits28:test")
    ann = AnnotationTable(d["train_ids"], d["candidates"], d.get("votes"), d.get("probs"),
                          {"annotator": "simulated (PaperLikeAnnotator 0.94/2.4/0.80)"})
    for method in args.methods:
        key = (args.label, args.seed, method, tuple(args.overrides))
        if key in done:
            continue
        cfg = quickstart_config(args.epochs, args.seed)
        cfg.set("train.warmup_epochs", 10 * args.epochs // 40)
        cfg.set("model.backbone", "small_cnn")
        cfg.set("data.hflip", False)
        cfg.set("tracking.mlflow", False)
        for item in args.overrides:
            k, v = item.split("=", 1)
            import yaml
            cfg.set(k, yaml.safe_load(v))
        t0 = time.time()
        res = run_method(method, cfg, train, ann, test)
        curve = [round(h["test_accuracy"], 4) for h in res["history"] if "test_accuracy" in h]
        row = {"label": args.label, "commit": commit, "seed": args.seed, "method": method,
               "overrides": args.overrides, "acc": res["test_accuracy"], "curve": curve,
               "annotator_test": float(d["annotator_test"]), "epochs": args.epochs,
               "seconds": round(time.time() - t0)}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label")
    ap.add_argument("--out")
    ap.add_argument("--methods", nargs="+", default=["coreg"])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if args.make_data:
        make_data(Path(args.make_data), args.seeds)
    else:
        run(args)


if __name__ == "__main__":
    main()
