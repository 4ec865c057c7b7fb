"""Co-Reg on the GTSRB CPU table's data (configs/exp-gtsrb-cpu.yaml: 4,000 images, simulated
annotator, small_cnn, 20 epochs), one run, with per-epoch diagnostics of its pseudo-labels:
test accuracy, |P|, P precision (truth in the candidate set), the P/U pseudo-label accuracy of the
training steps, how many classes P covers, and, on U, the accuracy of the divide-pass prediction
where the truth is outside the candidate set (the case only Co-Reg's U branch can fix).
One JSON line per epoch on stdout.

    python benchmarks/scripts/gtsrb_diagnose.py [--setting clip|llava] [--seed 0] [--set key=value ...]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coreg_ray.config import Config, load_yaml_mapping
from coreg_ray.data import load_image_table
from coreg_ray.experiment import paper_annotator
from coreg_ray.methods import run_method

ROOT = Path(__file__).resolve().parents[2]
ap = argparse.ArgumentParser()
ap.add_argument("--config", default=str(ROOT / "configs" / "exp-gtsrb-cpu.yaml"))
ap.add_argument("--setting", default="clip", help="substring of the setting's name (case-insensitive)")
ap.add_argument("--method", default="coreg")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--set", dest="overrides", action="append", default=[])
args = ap.parse_args()
torch.set_num_threads(1)
exp = load_yaml_mapping(args.config, "experiment file")
data = exp["data"]
resolve = lambda p: str((ROOT / p).resolve()) if not Path(p).is_absolute() else p  # noqa: E731
train = load_image_table(resolve(data["images"]), None, data.get("limit"))
test = load_image_table(resolve(data["test_images"]), None, data.get("test_limit"))
setting = next(s for s in exp["settings"] if args.setting.lower() in s["name"].lower())
sim = paper_annotator(setting["paper_annotator"]).fit(train.images, train.labels, train.num_classes)
ann = sim.annotate(train.images, train.labels, train.ids)
cfg = Config.from_dict(exp["config"])
cfg.train.seed = cfg.fewshot.seed = args.seed
cfg.tracking.mlflow = False
cfg.apply_overrides(args.overrides)
y = torch.as_tensor(train.labels)
truth_in = torch.as_tensor(ann.candidates[np.arange(len(y)), train.labels])
t0 = time.time()


def diag(epoch, stats, trainer):
    row = {"setting": setting["name"], "method": args.method, "seed": args.seed,
           "overrides": args.overrides, "epoch": epoch + 1, "phase": stats.get("phase"),
           "test_accuracy": stats.get("test_accuracy"), "seconds": round(time.time() - t0)}
    for k in ("p_fraction", "p_precision_net1", "pseudo_accuracy_p", "pseudo_accuracy_u", "loss"):
        if k in stats:
            row[k] = round(float(stats[k]), 4)
    if stats.get("phase") == "coreg" and hasattr(trainer, "split_w"):
        is_p = (trainer.split_w[1] > trainer.cfg.coreg.p_threshold).cpu()  # net 1 trains on net 2's split
        per_class = torch.bincount(y[is_p], minlength=train.num_classes).float() / torch.bincount(
            y, minlength=train.num_classes).clamp_min(1).float()
        pred = trainer.scores[1].argmax(1).cpu()
        out = ~is_p & ~truth_in
        row.update(p_classes_under_10pct=int((per_class < 0.10).sum()),
                   u_truth_in_candidates=round(float(truth_in[~is_p].float().mean()), 4),
                   u_outside_set_pred_accuracy=round(float((pred[out] == y[out]).float().mean()), 4)
                   if out.any() else None,
                   divide_pred_accuracy=round(float((pred == y).float().mean()), 4))
    print(json.dumps(row), flush=True)


res = run_method(args.method, cfg, train, ann, test, callbacks=[diag])
print(json.dumps({"final": res["test_accuracy"], "setting": setting["name"], "method": args.method,
                  "seed": args.seed, "overrides": args.overrides}), flush=True)
