"""Tests for coreg_ray/data/augment.py (paper-method.md, "Augmentation")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coreg_ray.data.augment import (OPS, DeviceAugment, _equalize, crop_flip, cutout,
                                    rand_augment, to_float)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(b=8, h=8, w=8, seed=0, lo=0.1):
    """Strictly positive values, so zero padding is distinguishable from content."""
    return lo + (1 - lo) * torch.rand(b, 3, h, w, generator=_gen(seed))


# ----------------------------------------------------------------------------- crop + flip
def test_crop_flip_without_pad_or_flip_is_identity():
    x = _batch()
    assert torch.equal(crop_flip(x, 0, _gen(), hflip=False), x)


def test_crop_flip_is_a_shifted_copy():
    x = _batch(b=16, h=8, w=6)
    pad = 2
    out = crop_flip(x, pad, _gen(1), hflip=False)
    assert out.shape == x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        found = [(oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
                 if torch.equal(out[i], xp[i, :, oy:oy + 8, ox:ox + 6])]
        assert len(found) == 1, f"sample {i} is not a shifted copy"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # per-sample offsets
    # One sample by manual slicing with its found offset: the uncovered border is zero.
    oy, ox = offsets[0]
    manual = torch.zeros(3, 8 + 2 * pad, 6 + 2 * pad)
    manual[:, pad:pad + 8, pad:pad + 6] = x[0]
    assert torch.equal(out[0], manual[:, oy:oy + 8, ox:ox + 6])


def test_crop_flip_flips_some_samples_only():
    x = _batch(b=32)
    out = crop_flip(x, 0, _gen(2), hflip=True)
    same = torch.tensor([torch.equal(out[i], x[i]) for i in range(32)])
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(2)) for i in range(32)])
    assert (same | flipped).all()
    assert same.any() and flipped.any()


# ----------------------------------------------------------------------------- RandAugment
def _draws(b, seed):
    """The first three draws of rand_augment with a fresh generator: op, magnitude, sign."""
    g = _gen(seed)
    op = torch.randint(0, len(OPS), (b,), generator=g)
    m = torch.rand((b,), generator=g)
    sign = torch.where(torch.rand((b,), generator=g) < 0.5, -1.0, 1.0)
    return op, m, sign


def test_rand_augment_range_shape_and_per_sample_ops():
    b, seed = 64, 3
    x = _batch(b=b, h=12, w=12, seed=4, lo=0.0)
    fill = torch.tensor([0.4, 0.5, 0.6])
    out = rand_augment(x, fill, n_ops=1, gen=_gen(seed))
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    op, m, _ = _draws(b, seed)
    assert len(set(op.tolist())) >= 8  # many different ops in one batch
    f = 0.05 + 1.9 * m
    checked = set()
    for i in range(b):
        name = OPS[int(op[i])]
        if name == "Identity":
            assert torch.equal(out[i], x[i])
        elif name == "Brightness":
            assert torch.allclose(out[i], (f[i] * x[i]).clamp(0, 1), atol=1e-6)
        elif name == "Solarize":
            assert torch.allclose(out[i], torch.where(x[i] >= m[i], 1 - x[i], x[i]), atol=1e-6)
        elif name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            assert not torch.allclose(out[i], x[i], atol=1e-3)
        else:
            continue
        checked.add(name)
    assert len(checked) >= 3


def test_rand_augment_same_image_gets_different_ops():
    x = _batch(b=1, h=10, w=10, seed=5).expand(16, -1, -1, -1).contiguous()
    out = rand_augment(x, torch.full((3,), 0.5), gen=_gen(6))
    distinct = {tuple(out[i].flatten().round(decimals=4).tolist()) for i in range(16)}
    assert len(distinct) > 4
    again = rand_augment(x, torch.full((3,), 0.5), gen=_gen(6))
    assert torch.equal(out, again)


def test_equalize_two_levels_and_three_levels():
    x = torch.full((1, 3, 4, 4), 0.2)
    x[:, :, :, 2:] = 0.6  # channel 0..2: half at level 51, half at level 153
    x[:, 2] = 0.3  # channel 2 constant: left unchanged
    out = _equalize(x)
    assert torch.allclose(out[0, 0, :, :2], torch.zeros(4, 2))
    assert torch.allclose(out[0, 0, :, 2:], torch.ones(4, 2))
    assert torch.equal(out[0, 0], out[0, 1])
    assert torch.equal(out[0, 2], x[0, 2])
    # three levels with counts 4, 8, 4: lowest -> 0, middle -> 8/(16-4), highest -> 1
    y = torch.zeros(1, 3, 4, 4)
    y[..., 0, :] = 10 / 255
    y[..., 1:3, :] = 100 / 255
    y[..., 3, :] = 200 / 255
    e = _equalize(y)
    assert torch.allclose(e[0, 0, 0], torch.zeros(4))
    assert torch.allclose(e[0, 0, 1:3], torch.full((2, 4), 8 / 12))
    assert torch.allclose(e[0, 0, 3], torch.ones(4))


# ----------------------------------------------------------------------------- cutout
def test_cutout_fills_a_square_with_the_fill_colour():
    b, h = 32, 16
    x = _batch(b=b, h=h, w=h, seed=7, lo=0.7)
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = cutout(x, fill, _gen(8))
    assert out.shape == x.shape
    changed = (out != x).any(1)  # [B, H, W]
    for i in range(b):
        mask = changed[i]
        assert mask.any()
        rows, cols = mask.any(1), mask.any(0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # an axis-aligned rectangle
        r_idx, c_idx = rows.nonzero().flatten(), cols.nonzero().flatten()
        assert r_idx.max() - r_idx.min() + 1 == len(r_idx)  # contiguous
        assert c_idx.max() - c_idx.min() + 1 == len(c_idx)
        assert len(r_idx) <= h // 2 and len(c_idx) <= h // 2
        # square unless clipped by the border
        if 0 < r_idx.min() and r_idx.max() < h - 1 and 0 < c_idx.min() and c_idx.max() < h - 1:
            assert len(r_idx) == len(c_idx)
        for ch in range(3):
            assert (out[i, ch][mask] == fill[ch]).all()
            assert torch.equal(out[i, ch][~mask], x[i, ch][~mask])


def test_cutout_square_has_the_drawn_side():
    b, h = 64, 16
    x = _batch(b=b, h=h, w=h, seed=10, lo=0.7)
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = cutout(x, fill, _gen(11))
    g = _gen(11)  # the same draws as cutout: side, centre row, centre column
    side = (1 + (torch.rand(b, generator=g) * (h // 2)).floor()).long()
    cy = (torch.rand(b, generator=g) * h).floor().long()
    cx = (torch.rand(b, generator=g) * h).floor().long()
    assert side.min() >= 1 and side.max() <= h // 2
    assert len(set(side.tolist())) > 4  # odd and even sides both occur
    for i in range(b):
        s, before = int(side[i]), int(side[i]) // 2
        expected = torch.zeros(h, h, dtype=torch.bool)
        y0, x0 = max(0, int(cy[i]) - before), max(0, int(cx[i]) - before)
        y1, x1 = min(h, int(cy[i]) - before + s), min(h, int(cx[i]) - before + s)
        expected[y0:y1, x0:x1] = True
        assert torch.equal((out[i] != x[i]).any(0), expected), f"sample {i}, side {s}"


# ----------------------------------------------------------------------------- DeviceAugment
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _uint8_batch(b=8, side=16):
    return torch.randint(0, 256, (b, 3, side, side), generator=_gen(9), dtype=torch.uint8)


def test_device_augment_views_finite_and_normalised():
    x = _uint8_batch()
    aug = DeviceAugment(MEAN, STD, 16, crop_padding=0.125, seed=0)
    assert aug.pad == 2
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    for view in (aug.weak(x), aug.strong(x)):
        assert view.dtype == torch.float32 and view.shape == x.shape
        assert torch.isfinite(view).all()
        assert (view >= lo - 1e-5).all() and (view <= hi + 1e-5).all()
    plain = aug.plain(x)
    assert torch.allclose(plain, (to_float(x) - mean) / std)
    no_aug = DeviceAugment(MEAN, STD, 16, crop_padding=0.0, hflip=False)
    assert torch.allclose(no_aug.weak(x), plain)


def test_device_augment_seeded_and_resumable():
    x = _uint8_batch()
    a, b = DeviceAugment(MEAN, STD, 16, seed=1), DeviceAugment(MEAN, STD, 16, seed=1)
    c = DeviceAugment(MEAN, STD, 16, seed=2)
    sa, sb, sc = a.strong(x), b.strong(x), c.strong(x)
    assert torch.equal(sa, sb)
    assert not torch.equal(sa, sc)
    assert torch.equal(a.weak(x), b.weak(x))
    state = a.state_dict()
    nxt = a.strong(x)
    assert not torch.equal(nxt, sa)  # the generator advances
    a.load_state_dict(state)
    assert torch.equal(a.strong(x), nxt)
