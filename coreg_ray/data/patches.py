"""Frozen unsupervised image features for the simulated VLM annotator: a single-layer patch
encoder in the manner of Coates, Lee & Ng (AISTATS 2011, "An analysis of single-layer networks
in unsupervised feature learning").

Why it exists: the simulated annotator stands in for a VLM, whose prompt templates are linear
read-outs of one frozen image encoder. Linear templates on raw pixels are a poor stand-in on
natural images (CIFAR-10: ~0.3 per template, their mistakes are the ones a small CNN makes
anyway); templates on these features are ~0.4-0.6 per template and make different mistakes.

`PatchFeatures.fit(images)` learns, from the images alone (no labels):
  1. random p x p patches, each contrast-normalised (own mean and std);
  2. ZCA whitening of those patches;
  3. a dictionary of k unit-norm centroids (mini-batch k-means on the whitened patches).
`transform(images)` encodes every patch position as relu(d_k . white(patch) - alpha) (the
soft-threshold code), averages the codes over the four image quadrants and standardises:
[N, 4k] float32. Whitening and normalisation are folded into one convolution, so encoding
is a few conv2d calls per batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.errors import CoregError

NORM_EPS = 0.01  # added to a patch's variance before dividing (pixels in [0, 1])
ZCA_EPS = 0.1  # added to the patch covariance's eigenvalues before whitening


class PatchFeatures:
    def __init__(self, k: int = 256, patch: int = 6, n_patches: int = 100_000,
                 alpha: float = 0.25, seed: int = 0, batch_size: int = 1000):
        self.k, self.patch, self.n_patches = k, patch, n_patches
        self.alpha, self.seed, self.batch_size = alpha, seed, batch_size

    def _patch_size(self, images: torch.Tensor) -> int:
        side = min(images.shape[-2:])
        if side < 2:
            raise CoregError(f"patch features: images of {tuple(images.shape[-2:])} px are too small")
        return min(self.patch, side - 1)  # at least 2x2 positions per image

    def fit(self, images: torch.Tensor) -> "PatchFeatures":
        self.fit_transform(images)
        return self

    def fit_transform(self, images: torch.Tensor) -> np.ndarray:
        """Learn the encoder from `images` and return their standardised features."""
        from sklearn.cluster import MiniBatchKMeans

        x = images.float() / 255.0
        p = self.p = self._patch_size(images)
        n, _, h, w = x.shape
        g = torch.Generator().manual_seed(self.seed)
        m = self.n_patches
        i = torch.randint(0, n, (m,), generator=g)
        r = torch.randint(0, h - p + 1, (m,), generator=g)
        c = torch.randint(0, w - p + 1, (m,), generator=g)
        # gather patches with one advanced-indexing call: [m, 3, p, p]
        rows = (r[:, None] + torch.arange(p))[:, None, :, None]
        cols = (c[:, None] + torch.arange(p))[:, None, None, :]
        patches = x[i[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        patches = patches.flatten(1)
        patches = (patches - patches.mean(1, keepdim=True)) / (
            patches.var(1, keepdim=True, unbiased=False) + NORM_EPS).sqrt()
        self.mean = patches.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((patches - self.mean).T))
        self.zca = evecs @ torch.diag((evals.clamp_min(0) + ZCA_EPS).rsqrt()) @ evecs.T
        white = ((patches - self.mean) @ self.zca).numpy()
        k = min(self.k, m)
        km = MiniBatchKMeans(k, random_state=self.seed, batch_size=4096, n_init=1).fit(white)
        d = torch.tensor(km.cluster_centers_, dtype=torch.float32)
        self.dictionary = d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)
        codes = self._encode(x)
        self.feat_mean, self.feat_std = codes.mean(0), codes.std(0) + 1e-3
        return self._standardise(codes)

    def _standardise(self, codes: torch.Tensor) -> np.ndarray:
        return ((codes - self.feat_mean) / self.feat_std).numpy().astype(np.float32)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        p, k = self.p, self.dictionary.shape[0]
        # d . W (x~ - mean) with x~ = (x - mu) / sd per patch:
        #   = ((W d) . x - mu * sum(W d)) / sd - (W d) . mean
        filt = self.dictionary @ self.zca.T  # [k, 3*p*p]
        bias = filt @ self.mean
        filt_sum = filt.sum(1).view(1, k, 1, 1)
        filt = filt.reshape(k, 3, p, p)
        avg = torch.full((1, 3, p, p), 1.0 / (3 * p * p))
        out = []
        with torch.no_grad():
            for s in range(0, len(x), self.batch_size):
                xb = x[s:s + self.batch_size]
                mu = F.conv2d(xb, avg)
                sd = (F.conv2d(xb * xb, avg) - mu * mu).clamp_min(0).add(NORM_EPS).sqrt()
                code = (F.conv2d(xb, filt) - mu * filt_sum) / sd - bias.view(1, k, 1, 1)
                code = F.relu(code - self.alpha)
                out.append(F.adaptive_avg_pool2d(code, 2).flatten(1))
        return torch.cat(out)

    def transform(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [N,3,H,W] -> standardised float32 [N, 4k]."""
        if not hasattr(self, "dictionary"):
            raise CoregError("patch features: call fit() before transform()")
        return self._standardise(self._encode(images.float() / 255.0))
