"""Per-epoch view of Co-Reg on digits (MLP, CPU), to study the post-warm-up phase.

    python benchmarks/scripts/diagnose_digits.py --noise clean  coreg.sharpen_T=0.01
    python benchmarks/scripts/diagnose_digits.py --noise synth  coreg.class_balanced_split=true
    python benchmarks/scripts/diagnose_digits.py --noise simulated train.epochs=30

Prints test accuracy, |P| fraction and pseudo-label accuracy of P and U every epoch.
"""
import argparse

from coreg_ray.config import Config
from coreg_ray.coreg.trainer import CoReg
from coreg_ray.data import SimulatedVLM, annotation_stats, load_image_table, synthetic_annotations

ap = argparse.ArgumentParser()
ap.add_argument("--noise", choices=["clean", "synth", "simulated"], default="simulated")
ap.add_argument("--templates", type=int, default=6)
ap.add_argument("--per-class", type=int, default=3)
ap.add_argument("--feature-fraction", type=float, default=0.5)
ap.add_argument("overrides", nargs="*")
args = ap.parse_args()
train, test = load_image_table("digits:train"), load_image_table("digits:test")
if args.noise == "clean":
    ann = synthetic_annotations(train.ids, train.labels, 10, 0.0, 0.0)
elif args.noise == "synth":
    ann = synthetic_annotations(train.ids, train.labels, 10, 0.3, 0.3)
else:
    vlm = SimulatedVLM(args.templates, args.per_class, args.feature_fraction).fit(train.images, train.labels, 10)
    ann = vlm.annotate(train.images, train.ids)
    print("annotator: train", annotation_stats(ann, train.labels)["ensemble_accuracy"], "test",
          annotation_stats(vlm.annotate(test.images, test.ids), test.labels)["ensemble_accuracy"])
base = ["data.hflip=false", "model.backbone=mlp", "train.epochs=20", "train.warmup_epochs=10",
        "train.batch_size=64", "train.warmup_batch_size=128", "coreg.feature_delay=2",
        "coreg.queue_size=512", "tracking.mlflow=false"]
cfg = Config.load(overrides=base + args.overrides)
keys = ("test_accuracy", "p_fraction", "pseudo_accuracy_p", "pseudo_accuracy_u", "loss_x")


def show(epoch, stats, trainer):
    print(epoch, stats["phase"], {k: round(stats[k], 3) for k in keys if k in stats}, flush=True)


CoReg(cfg, callbacks=[show], progress=False).fit(train, ann, test)
