"""The simulated annotator's patch encoder (coreg_ray/data/patches.py): the folded convolution
equals the per-patch recipe written out by hand, and the features carry class information."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coreg_ray.data import annotation_stats, load_image_table, simulate_vlm_annotator
from coreg_ray.data.patches import NORM_EPS, PatchFeatures
from coreg_ray.errors import CoregError


def _images(n=40, side=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


def test_encoding_equals_explicit_per_patch_computation():
    imgs = _images()
    enc = PatchFeatures(k=5, patch=3, n_patches=2000, alpha=0.1, seed=0).fit(imgs)
    x = imgs[:3].float() / 255
    # every 3x3 patch written out: [3 images, 27 values, 8x8 positions]
    cols = F.unfold(x, 3)
    feats = []
    for i in range(3):
        p = cols[i].T  # [64 positions, 27], unfold's (channel, row, col) order = flatten's
        p = (p - p.mean(1, keepdim=True)) / (p.var(1, keepdim=True, unbiased=False) + NORM_EPS).sqrt()
        white = (p - enc.mean) @ enc.zca
        code = torch.relu(white @ enc.dictionary.T - 0.1).T.reshape(5, 8, 8)
        quads = [code[:, :4, :4], code[:, :4, 4:], code[:, 4:, :4], code[:, 4:, 4:]]
        feats.append(torch.stack([q.mean((1, 2)) for q in quads], 1).flatten())
    expected = (torch.stack(feats) - enc.feat_mean) / enc.feat_std
    got = enc.transform(imgs[:3])
    assert got.shape == (3, 20) and got.dtype == np.float32
    assert np.allclose(got, expected.numpy(), atol=1e-4)


def test_fit_transform_is_transform_and_standardised_and_seeded():
    imgs = _images(60, 12)
    a = PatchFeatures(k=8, patch=4, n_patches=3000, seed=1)
    fa = a.fit_transform(imgs)
    assert np.allclose(fa, a.transform(imgs), atol=1e-5)
    assert np.allclose(fa.mean(0), 0, atol=1e-4)
    assert np.all(fa.std(0) < 1.01)
    fb = PatchFeatures(k=8, patch=4, n_patches=3000, seed=1).fit_transform(imgs)
    assert np.allclose(fa, fb)


def test_small_images_clamp_patch_and_bad_use_errors():
    enc = PatchFeatures(k=4, patch=6, n_patches=500).fit(_images(20, 4))
    assert enc.p == 3 and enc.transform(_images(2, 4)).shape == (2, 16)
    with pytest.raises(CoregError, match="fit"):
        PatchFeatures().transform(_images(2))
    with pytest.raises(CoregError, match="too small"):
        PatchFeatures().fit(_images(2, 1))


def test_patch_features_simulated_annotator_is_useful_on_digits():
    t = load_image_table("digits:train")
    ann = simulate_vlm_annotator(t.images, t.labels, 10, ids=t.ids, n_templates=4, per_class=5,
                                 seed=0, features="patches")
    assert ann.meta["annotator"].endswith("features=patches")
    stats = annotation_stats(ann, t.labels)
    assert stats["ensemble_accuracy"] > 0.5 and stats["partial_accuracy"] > stats["ensemble_accuracy"]
    with pytest.raises(CoregError, match="features must be one of"):
        simulate_vlm_annotator(t.images, t.labels, 10, features="edges")
