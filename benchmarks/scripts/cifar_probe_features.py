"""CIFAR-10 probe, step 1 (benchmarks/accuracy_cifar_cpu.md, sessions 4-5): K patch features
(whitened 6x6 patches, K-means dictionary, soft-threshold encoding, 2x2 pooling) of every
training image and the first 2,000 test images, standardised on rows 5,000+, saved as float16
for `cifar_probe_templates.py` and `cifar_probe_pilot.py`.

    python benchmarks/scripts/cifar_probe_features.py 256 [--data DIR] [--out FILE]

--data: the folder with train.parquet and test.parquet (default: the CIFAR-10 copy the configs
name); --out: default runs/cifar-probe/featK.npz under the repository root.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.data import load_image_table

REPO = Path(__file__).resolve().parents[2]  # the repository root
DATA = REPO.parent / "shared/data/cifar10-jpeg"  # the CIFAR-10 copy the configs name
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("k", type=int, nargs="?", default=256, help="dictionary size K")
ap.add_argument("--data", default=str(DATA))
ap.add_argument("--out", default=None, help="default: runs/cifar-probe/featK.npz")
args = ap.parse_args()
out = Path(args.out or REPO / f"runs/cifar-probe/feat{args.k}.npz")
torch.manual_seed(0)
t0=time.time()
tr = load_image_table(f"{args.data}/train.parquet")
te = load_image_table(f"{args.data}/test.parquet", limit=2000)
print("load", time.time()-t0, flush=True)

def patch_dict(x, k=256, p=6, n=100000, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = x.shape[0]
    i = torch.randint(0, N, (n,), generator=g); r = torch.randint(0, 33-p, (n,), generator=g); c = torch.randint(0, 33-p, (n,), generator=g)
    P = torch.stack([x[a, :, b:b+p, d:d+p] for a,b,d in zip(i.tolist(), r.tolist(), c.tolist())]).flatten(1)
    P = (P - P.mean(1, keepdim=True)) / (P.var(1, keepdim=True) + 10/255**2*0+0.01).sqrt()
    m = P.mean(0); C = torch.cov((P-m).T); e, V = torch.linalg.eigh(C)
    W = V @ torch.diag(1/(e+0.1).sqrt()) @ V.T
    Z = (P-m) @ W
    from sklearn.cluster import MiniBatchKMeans
    km = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=1).fit(Z.numpy())
    D = torch.tensor(km.cluster_centers_, dtype=torch.float32)
    D = D / D.norm(dim=1, keepdim=True)
    return m, W, D

def encode(x, m, W, D, p=6, alpha=0.25, bs=2000):
    # soft-threshold encoding of whitened, contrast-normalised patches; 2x2 quadrant sum-pool
    K = D.shape[0]
    filt = (D @ W.T).reshape(K, 3, p, p)   # dot with W(x~ - m) = (W^T d).(x~) - (W^T d).m
    bias = (D @ W.T) @ m
    ones = torch.ones(1, 3, p, p) / (3*p*p)
    out = []
    for s in range(0, len(x), bs):
        xb = x[s:s+bs]
        mu = F.conv2d(xb, ones); sq = F.conv2d(xb*xb, ones)
        sd = (sq - mu*mu).clamp_min(0).add(0.01).sqrt()
        raw = F.conv2d(xb, filt)       # (W^T d).x
        s1 = filt.flatten(1).sum(1).view(1, K, 1, 1)
        a = (raw - mu * s1) / sd - bias.view(1, K, 1, 1)
        f = F.relu(a - alpha)
        out.append(F.adaptive_avg_pool2d(f, 2).flatten(1))
    return torch.cat(out)

K = args.k
xtr = tr.images.float()/255; xte = te.images.float()/255
m, W, D = patch_dict(xtr[5000:], k=K)
print("dict", time.time()-t0, flush=True)
ftr = encode(xtr, m, W, D); fte = encode(xte, m, W, D)
mu, sd = ftr[5000:].mean(0), ftr[5000:].std(0)+1e-3
ftr = ((ftr-mu)/sd).numpy(); fte = ((fte-mu)/sd).numpy()
print("enc", time.time()-t0, ftr.shape, flush=True)
out.parent.mkdir(parents=True, exist_ok=True)
np.savez(out, tr=ftr.astype(np.float16), te=fte.astype(np.float16), ytr=tr.labels, yte=te.labels)
