"""CIFAR-10 probe (benchmarks/accuracy_cifar_cpu.md, session 4): statistics of an 8-template
annotator made of logistic regressions on the patch features of `cifar_probe_features.py`, each
fitted on PER_CLASS images per class of rows 5,000+ and a FEATURE_FRACTION of the features with
inverse regularisation C; one line per spec (student pool = rows 0-4,999, and the test images).

    python benchmarks/scripts/cifar_probe_templates.py 20,0.5,0.01 [SPEC ...] [--features FILE]
"""
import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[2]  # the repository root
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("specs", nargs="+", help="PER_CLASS,FEATURE_FRACTION,C")
ap.add_argument("--features", default=str(REPO / "runs/cifar-probe/feat256.npz"))
args = ap.parse_args()
d = np.load(args.features); ftr=d["tr"].astype(np.float32); fte=d["te"].astype(np.float32); y=d["ytr"]; yte=d["yte"]
rng = np.random.default_rng(0)
pool = np.arange(5000, 50000)
stu = np.arange(5000)
def stats(votes, probs, yy):
    n=len(yy); cand=np.zeros((n,10),bool); cand[np.repeat(np.arange(n),votes.shape[1]), votes.ravel()]=True
    return dict(avg=round(cand.sum(1).mean(),2), partial=round(cand[np.arange(n),yy].mean(),3), ens=round((probs.argmax(1)==yy).mean(),3), tmpl=round(np.mean([(votes[:,t]==yy).mean() for t in range(votes.shape[1])]),3))
for per_class, ff, C in [(int(a.split(",")[0]), float(a.split(",")[1]), float(a.split(",")[2])) for a in args.specs]:
    t0=time.time()
    V=[];P=[];Vt=[];Pt=[]
    for t in range(8):
        rows=np.concatenate([rng.choice(pool[y[pool]==c], per_class, replace=False) for c in range(10)])
        cols=rng.choice(ftr.shape[1], int(ff*ftr.shape[1]), replace=False)
        clf=LogisticRegression(max_iter=200, C=C).fit(ftr[rows][:,cols], y[rows])
        p=clf.predict_proba(ftr[stu][:,cols]); V.append(p.argmax(1)); P.append(p)
        p=clf.predict_proba(fte[:,cols]); Vt.append(p.argmax(1)); Pt.append(p)
    print(per_class, ff, C, "student-pool", stats(np.stack(V,1), np.mean(P,0), y[stu]), "test", stats(np.stack(Vt,1), np.mean(Pt,0), yte), round(time.time()-t0), flush=True)
