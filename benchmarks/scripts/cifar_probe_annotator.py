"""CIFAR-10 probe (benchmarks/accuracy_cifar_cpu.md, session 4): statistics of the patch-feature
simulated VLM on the first 5,000 training / 2,000 test images, one line per spec
K,PER_CLASS,TEMPLATES,FEATURE_FRACTION (K: the patch dictionary size).

    python benchmarks/scripts/cifar_probe_annotator.py 256,20,8,0.5 [SPEC ...] [--data DIR]
"""
import argparse
import functools
import time
from pathlib import Path

from coreg_ray.data import annotation_stats, load_image_table, patches
from coreg_ray.data.noise import SimulatedVLM

REPO = Path(__file__).resolve().parents[2]  # the repository root
DATA = REPO.parent / "shared/data/cifar10-jpeg"  # the CIFAR-10 copy the configs name
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("specs", nargs="+", help="K,PER_CLASS,TEMPLATES,FEATURE_FRACTION")
ap.add_argument("--data", default=str(DATA))
args = ap.parse_args()
tr = load_image_table(f"{args.data}/train.parquet", limit=5000)
te = load_image_table(f"{args.data}/test.parquet", limit=2000)
for spec in args.specs:
    K, pc, nt, ff = spec.split(","); K=int(K); pc=int(pc); nt=int(nt); ff=float(ff)
    orig = patches.PatchFeatures.__init__
    patches.PatchFeatures.__init__ = functools.partialmethod(orig, k=K)
    t0=time.time()
    v = SimulatedVLM(nt, pc, ff, 0, "patches").fit(tr.images, tr.labels, 10)
    patches.PatchFeatures.__init__ = orig
    a = v.annotate(tr.images, tr.ids); ta = v.annotate(te.images, te.ids)
    s = annotation_stats(a, tr.labels); st = annotation_stats(ta, te.labels)
    print(spec, {k: s[k] for k in ("avg_candidates","partial_accuracy","ensemble_accuracy","vote_accuracy")}, "test", {k: st[k] for k in ("avg_candidates","partial_accuracy","ensemble_accuracy","vote_accuracy")}, round(time.time()-t0), flush=True)
