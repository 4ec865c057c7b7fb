"""Tests for coreg_ray/data/augment.py (paper-method.md, "Augmentation").

The strong view is pinned to the authors' code: Co-Reg's `datasets/*.py` compose
RandomCrop(pad) + flip + `RandomAugment(1, 5)` (PiCO's `utils/randaugment.py`: 14 PIL ops, one
drawn per image, magnitude uniform in a fixed range, then CutoutAbs with colour (125, 123, 114));
their grayscale sets (F-MNIST, FER2013) use crop + flip + `Cutout(n_holes=1, length=16)` instead.
Ops are checked by hand on small cases and, where Pillow is installed, bit for bit against PIL.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coreg_ray.data.augment import (CUTOUT_FILL, MAGNITUDE, OPS, DeviceAugment, apply_ops,
                                    crop_flip, cutout, cutout_holes, draw_ops, rand_augment,
                                    to_float)


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
def _op(name, b=1):
    return torch.full((b,), OPS.index(name), dtype=torch.long)


def _apply(name, q, v):
    """Apply one op to an integer-level image q [C, H, W] (or [B, C, H, W]) -> levels."""
    x = (q if q.dim() == 4 else q[None]).float() / 255.0
    v = torch.as_tensor(v, dtype=torch.float32).reshape(-1).expand(len(x))
    out = (apply_ops(x, _op(name, len(x)), v) * 255.0).round()
    return out if q.dim() == 4 else out[0]


def test_op_list_and_magnitude_ranges_are_the_reference():
    assert OPS == ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity",
                   "Posterize", "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize",
                   "TranslateX", "TranslateY")
    assert MAGNITUDE == {
        "AutoContrast": (0, 1), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95),
        "Contrast": (0.05, 0.95), "Equalize": (0, 1), "Identity": (0, 1), "Posterize": (4, 8),
        "Rotate": (-30, 30), "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3),
        "ShearY": (-0.3, 0.3), "Solarize": (0, 256), "TranslateX": (-0.3, 0.3),
        "TranslateY": (-0.3, 0.3)}
    assert CUTOUT_FILL == (125, 123, 114)


def test_draws_uniform_op_and_uniform_magnitude_in_range():
    n = 28000
    op, v = draw_ops(n, _gen(0))
    counts = torch.bincount(op, minlength=len(OPS)).float() / n
    assert (counts - 1 / 14).abs().max() < 0.012  # uniform over all 14, Identity included
    for k, name in enumerate(OPS):
        lo, hi = MAGNITUDE[name]
        vk = v[op == k]
        assert vk.min() >= lo and vk.max() < hi, name
        span = hi - lo
        assert vk.min() < lo + 0.01 * span and vk.max() > hi - 0.01 * span, name  # no sign flip
        assert abs(vk.mean().item() - (lo + hi) / 2) < 0.03 * span, name
    # enhance factors: the reference range [0.05, 0.95], never above 1 (never brightens)
    bright = v[op == OPS.index("Brightness")]
    assert bright.min() >= 0.05 and bright.max() < 0.95


def test_rand_augment_applies_exactly_n_ops_draws_per_sample():
    x = _batch(b=64, h=12, w=12, seed=4, lo=0.0)
    x = (x * 255).round() / 255
    out = rand_augment(x, n_ops=1, gen=_gen(3))
    op, v = draw_ops(64, _gen(3))
    assert torch.equal(out, apply_ops(x, op, v))  # always applied: no per-op probability
    two = rand_augment(x, n_ops=2, gen=_gen(3))
    g = _gen(3)
    op1, v1 = draw_ops(64, g)
    op2, v2 = draw_ops(64, g)
    assert torch.equal(two, apply_ops(apply_ops(x, op1, v1), op2, v2))
    ident = op == OPS.index("Identity")
    assert ident.any() and torch.equal(out[ident], x[ident])


def test_brightness_truncates_like_pil_blend():
    q = torch.tensor([[[0, 1, 101, 200, 255]]]).expand(3, 1, 5)
    out = _apply("Brightness", q, 0.3)
    assert out[0, 0].tolist() == [0, 0, 30, 60, 76]  # floor(0.3 q): 30.3 -> 30, 76.5 -> 76
    out = _apply("Brightness", q, 0.05)
    assert out[0, 0].tolist() == [0, 0, 5, 10, 12]


def test_color_blends_with_pil_luma():
    q = torch.zeros(3, 1, 2)
    q[0, 0, 0] = 255  # pure red; PIL L = (255*19595 + 32768) >> 16 = 76
    q[:, 0, 1] = torch.tensor([10.0, 200.0, 30.0])  # L = (10*19595+200*38470+30*7471+32768)>>16
    out = _apply("Color", q, 0.5)
    assert out[:, 0, 0].tolist() == [165, 38, 38]  # 76 + .5*179 = 165.5; 76 - 38 = 38
    lum = (10 * 19595 + 200 * 38470 + 30 * 7471 + 32768) >> 16
    assert lum == 124  # 0.299*10 + 0.587*200 + 0.114*30 = 123.81, rounded
    assert out[:, 0, 1].tolist() == [math.floor(124 + 0.5 * (c - 124)) for c in (10, 200, 30)]


def test_contrast_blends_with_the_rounded_mean_luma():
    q = torch.zeros(3, 2, 2)
    q[:, :, 1] = 255  # grey 0 and 255: mean 127.5 -> int(127.5 + .5) = 128
    out = _apply("Contrast", q, 0.5)
    assert out[0, :, 0].tolist() == [64, 64]  # 128 - 64
    assert out[0, :, 1].tolist() == [191, 191]  # 128 + 63.5 -> 191


def test_sharpness_blurs_with_pil_smooth_and_keeps_the_border():
    q = torch.zeros(3, 3, 3)
    q[:, 1, 1] = 130  # SMOOTH at the centre: (5 * 130) / 13 = 50
    out = _apply("Sharpness", q, 0.5)
    assert out[0, 1, 1] == 90  # 50 + 0.5 * (130 - 50)
    border = torch.ones(3, 3, dtype=torch.bool)
    border[1, 1] = False
    assert (out[:, border] == 0).all()  # PIL copies the 1-px border: the blend leaves it


def test_autocontrast_per_channel_truncating():
    q = torch.zeros(3, 1, 3)
    q[0, 0] = torch.tensor([50.0, 100.0, 150.0])  # scale 2.55: 100 -> int(127.5) = 127
    q[1, 0] = torch.tensor([7.0, 7.0, 7.0])  # constant channel: unchanged
    q[2, 0] = torch.tensor([0.0, 128.0, 255.0])  # already full range: unchanged
    out = _apply("AutoContrast", q, 0.5)
    assert out[0, 0].tolist() == [0, 127, 255]
    assert out[1, 0].tolist() == [7, 7, 7]
    assert out[2, 0].tolist() == [0, 128, 255]


def test_equalize_pil_lut():
    # 32x32: 512 px at 10, 256 at 100, 256 at 200: step = (1024 - 256) // 255 = 3,
    # lut = (step // 2 + #below) // step: 10 -> 0, 100 -> 513 // 3 = 171, 200 -> 769 // 3 -> 255
    q = torch.full((3, 32, 32), 10.0)
    q[:, 16:24] = 100.0
    q[:, 24:] = 200.0
    out = _apply("Equalize", q, 0.5)
    assert out[0, 0, 0] == 0 and out[0, 16, 0] == 171 and out[0, 24, 0] == 255
    # too few pixels below the top level (step == 0): unchanged
    small = torch.full((3, 4, 4), 10.0)
    small[:, 2:] = 200.0
    assert torch.equal(_apply("Equalize", small, 0.5), small)


def test_posterize_bits_are_int_of_the_magnitude():
    q = torch.tensor([[[7.0, 200.0, 255.0]]]).expand(3, 1, 3)
    assert _apply("Posterize", q, 4.99)[0, 0].tolist() == [0, 192, 240]  # 4 bits
    assert _apply("Posterize", q, 7.99)[0, 0].tolist() == [6, 200, 254]  # 7 bits, never 8


def test_solarize_inverts_at_or_above_the_level_threshold():
    q = torch.tensor([[[0.0, 128.0, 129.0, 255.0]]]).expand(3, 1, 4)
    assert _apply("Solarize", q, 128.5)[0, 0].tolist() == [0, 128, 126, 0]
    assert _apply("Solarize", q, 0.0)[0, 0].tolist() == [255, 127, 126, 0]  # all inverted


def test_rotate_is_counter_clockwise_about_the_centre_with_black_fill():
    x = torch.randint(1, 256, (2, 3, 8, 8), generator=_gen(1)).float()
    assert torch.equal(_apply("Rotate", x, 90.0), torch.rot90(x, 1, (2, 3)))  # PIL: CCW
    assert torch.equal(_apply("Rotate", x, -90.0), torch.rot90(x, -1, (2, 3)))
    white = torch.full((3, 16, 16), 255.0)
    out = _apply("Rotate", white, 30.0)
    for y, xx in ((0, 0), (0, 15), (15, 0), (15, 15)):
        assert (out[:, y, xx] == 0).all()  # corners: black (PIL's default fill), not the mean
    assert (out[:, 6:10, 6:10] == 255).all()


def test_shear_is_about_the_top_left_corner_and_positive_moves_content_left():
    # ShearX(v): output (x, y) <- input (floor(x + .5 + v (y + .5)), y)
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 8, 8).expand(3, 8, 8)
    out = _apply("ShearX", x, 0.25)
    assert torch.equal(out[:, 0], x[:, 0])  # 0.125: top row unchanged
    assert torch.equal(out[:, 7, :6], x[:, 7, 2:]) and (out[:, 7, 6:] == 0).all()  # 1.875
    neg = _apply("ShearX", x, -0.25)
    assert torch.equal(neg[:, 7, 2:], x[:, 7, :6]) and (neg[:, 7, :2] == 0).all()
    out = _apply("ShearY", x, 0.25)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.equal(out[:, :6, 7], x[:, 2:, 7]) and (out[:, 6:, 7] == 0).all()


def test_translate_moves_content_left_up_by_a_fraction_of_the_side():
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 8, 8).expand(3, 8, 8)
    out = _apply("TranslateX", x, 0.25)  # 2 px: output x <- input x + 2
    assert torch.equal(out[:, :, :6], x[:, :, 2:]) and (out[:, :, 6:] == 0).all()
    out = _apply("TranslateY", x, -0.25)
    assert torch.equal(out[:, 2:], x[:, :6]) and (out[:, :2] == 0).all()


def _pil_op(img, name, v):
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    w, h = img.size
    affine = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * h)}
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name])
    enhance = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
               "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](img).enhance(v)
    return {"AutoContrast": lambda: ImageOps.autocontrast(img),
            "Equalize": lambda: ImageOps.equalize(img), "Identity": lambda: img,
            "Posterize": lambda: ImageOps.posterize(img, int(v)),
            "Rotate": lambda: img.rotate(v), "Solarize": lambda: ImageOps.solarize(img, v)}[name]()


@pytest.mark.parametrize("h,w", [(32, 32), (20, 24)])
def test_every_op_matches_pil_bit_for_bit(h, w):
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    n = 12
    g = _gen(h * w)
    imgs = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    imgs[: n // 2] = imgs[: n // 2] // 4 + torch.randint(0, 190, (n // 2, 3, 1, 1), generator=g,
                                                             dtype=torch.uint8)
    for k, name in enumerate(OPS):
        lo, hi = MAGNITUDE[name]
        v = lo + (hi - lo) * torch.rand(n, generator=g)
        ours = (apply_ops(to_float(imgs), _op(name, n), v) * 255).round().byte()
        for i in range(n):
            pil = Image.fromarray(imgs[i].permute(1, 2, 0).numpy())
            ref = torch.from_numpy(np.array(_pil_op(pil, name, float(v[i])))).permute(2, 0, 1)
            assert torch.equal(ours[i], ref), f"{name} sample {i} v={float(v[i])}"


# ----------------------------------------------------------------------------- cutout
def _cutout_draws(b, h, w, seed):
    """cutout's draws (float64): v = U * 0.5 * W, then the two corner uniforms."""
    g = _gen(seed)
    v = torch.rand(b, generator=g, dtype=torch.float64) * 0.5 * w
    xc = w + (1 - w) * torch.rand(b, generator=g, dtype=torch.float64)  # np.random.uniform(w)
    yc = h + (1 - h) * torch.rand(b, generator=g, dtype=torch.float64)
    return v, xc, yc


def test_cutout_square_fill_side_and_clipping():
    b, h = 64, 16
    x = _batch(b=b, h=h, w=h, seed=7, lo=0.7)
    out = cutout(x, _gen(8))
    fill = torch.tensor([125.0, 123.0, 114.0]) / 255  # the reference colour, not the data mean
    v, xc, yc = _cutout_draws(b, h, h, 8)
    sides = set()
    for i in range(b):
        x0, y0 = int(max(0.0, xc[i] - v[i] / 2)), int(max(0.0, yc[i] - v[i] / 2))
        x1, y1 = int(min(h, x0 + v[i])), int(min(h, y0 + v[i]))  # PIL: inclusive corners
        expected = torch.zeros(h, h, dtype=torch.bool)
        expected[y0:y1 + 1, x0:x1 + 1] = True
        mask = (out[i] != x[i]).any(0)
        assert torch.equal(mask, expected), f"sample {i}"
        for ch in range(3):
            assert (out[i, ch][mask] == fill[ch]).all()
        side = int(v[i]) + 1  # int(v) + 1 px: 1 .. W/2
        sides.add(side)
        assert mask.any(1).sum() == min(side, h - y0)  # clipped only at the bottom/right
        assert mask.any(0).sum() == min(side, h - x0)
    assert min(sides) >= 1 and max(sides) <= h // 2 and len(sides) > 5
    # the corner draw is U(1, W]: an interior square never starts in column 0 unless v > 2
    assert all(int(max(0.0, xc[i] - v[i] / 2)) > 0 for i in range(b) if v[i] < 1.5)


def test_cutout_matches_pil_rectangle():
    Image = pytest.importorskip("PIL.Image")
    ImageDraw = pytest.importorskip("PIL.ImageDraw")
    np = pytest.importorskip("numpy")
    b, h, w = 40, 20, 24
    x = to_float(torch.randint(0, 256, (b, 3, h, w), generator=_gen(3), dtype=torch.uint8))
    out = (cutout(x, _gen(4)) * 255).round().byte()
    v, xc, yc = _cutout_draws(b, h, w, 4)
    for i in range(b):
        img = Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy())
        vv = float(v[i])
        x0, y0 = int(max(0, float(xc[i]) - vv / 2.0)), int(max(0, float(yc[i]) - vv / 2.0))
        ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + vv), min(h, y0 + vv)), CUTOUT_FILL)
        assert torch.equal(out[i], torch.from_numpy(np.array(img)).permute(2, 0, 1)), i


def test_grayscale_cutout_is_devries_16px_zero_square():
    b, h = 64, 32
    x = _batch(b=b, h=h, w=h, seed=12, lo=0.5)
    out = cutout_holes(x, 16, _gen(13))
    g = _gen(13)
    cy, cx = torch.randint(0, h, (b,), generator=g), torch.randint(0, h, (b,), generator=g)
    for i in range(b):
        expected = torch.zeros(h, h, dtype=torch.bool)
        y, xx = int(cy[i]), int(cx[i])
        expected[max(0, y - 8):min(h, y + 8), max(0, xx - 8):min(h, xx + 8)] = True
        mask = (out[i] != x[i]).any(0)
        assert torch.equal(mask, expected)
        assert (out[i][:, mask] == 0).all()  # zero (black) before normalisation
    # hand case: centre (10, 10) -> rows/cols 2..17; centre (0, 31) -> rows 0..7, cols 23..31
    one = torch.ones(1, 1, h, h)
    g = torch.Generator()
    g.manual_seed(0)
    cy0 = torch.randint(0, h, (1,), generator=g).item()
    cx0 = torch.randint(0, h, (1,), generator=g).item()
    m = cutout_holes(one, 16, _gen(0))[0, 0] == 0
    assert m.sum() == (min(h, cy0 + 8) - max(0, cy0 - 8)) * (min(h, cx0 + 8) - max(0, cx0 - 8))


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


def test_device_augment_strong_is_crop_flip_randaugment_cutout():
    x = _uint8_batch(b=32)
    aug = DeviceAugment(MEAN, STD, 16, crop_padding=0.125, n_ops=1, seed=5)
    g = _gen(5)
    y = crop_flip(to_float(x), 2, g, True)
    y = cutout(rand_augment(y, 1, g), g)
    assert torch.equal(aug.strong(x), aug.normalize(y))


def test_device_augment_grayscale_strong_is_crop_flip_cutout_only():
    x = _uint8_batch(b=32, side=32)
    aug = DeviceAugment(MEAN, STD, 32, crop_padding=0.0, hflip=False, seed=6, grayscale=True)
    s = aug.strong(x)
    g = _gen(6)
    assert torch.equal(s, aug.normalize(cutout_holes(to_float(x), 16, g)))
    changed = (s != aug.plain(x)).any(1)
    assert (changed.sum((1, 2)) <= 256).all()  # only the zeroed square differs: no RandAugment
    assert changed.sum((1, 2)).float().mean() > 100
    assert DeviceAugment(MEAN, STD, 32).grayscale is False  # colour view by default


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


def test_grayscale_cutout_is_16px_from_28px_and_scaled_below():
    from coreg_ray.data.augment import DeviceAugment

    sizes = {s: DeviceAugment([0.5] * 3, [0.2] * 3, s, grayscale=True).gray_cutout
             for s in (8, 14, 28, 32, 64)}
    assert sizes == {8: 5, 14: 8, 28: 16, 32: 16, 64: 16}


def test_strong_view_auto_picks_grayscale_for_gray_tables():
    from coreg_ray.config import Config
    from coreg_ray.coreg.trainer import grayscale_view

    gray = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8).expand(4, 3, 8, 8)
    color = gray.clone()
    color[0, 2, 0, 0] ^= 1  # one pixel off grey
    cfg = Config()
    assert grayscale_view(cfg, gray) and not grayscale_view(cfg, color)
    cfg.set("data.strong_view", "color")
    assert not grayscale_view(cfg, gray)
    cfg.set("data.strong_view", "grayscale")
    assert grayscale_view(cfg, color)
