import sys, json, time, functools
from coreg_ray.data import load_image_table, annotation_stats
from coreg_ray.data import patches
from coreg_ray.data.noise import SimulatedVLM
tr = load_image_table(".devdata/cifar10-jpeg/train.parquet", limit=5000)
te = load_image_table(".devdata/cifar10-jpeg/test.parquet", limit=2000)
for spec in sys.argv[1:]:
    K, pc, nt, ff = spec.split(","); K=int(K); pc=int(pc); nt=int(nt); ff=float(ff)
    orig = patches.PatchFeatures.__init__
    patches.PatchFeatures.__init__ = functools.partialmethod(orig, k=K)
    t0=time.time()
    v = SimulatedVLM(nt, pc, ff, 0, "patches").fit(tr.images, tr.labels, 10)
    patches.PatchFeatures.__init__ = orig
    a = v.annotate(tr.images, tr.ids); ta = v.annotate(te.images, te.ids)
    s = annotation_stats(a, tr.labels); st = annotation_stats(ta, te.labels)
    print(spec, {k: s[k] for k in ("avg_candidates","partial_accuracy","ensemble_accuracy","vote_accuracy")}, "test", {k: st[k] for k in ("avg_candidates","partial_accuracy","ensemble_accuracy","vote_accuracy")}, round(time.time()-t0), flush=True)
