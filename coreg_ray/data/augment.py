"""Batched augmentation on the training device, per-sample random, no host syncs.

The reference code augments each image with PIL in the data loader (four views per sample): the
CPU, not the GPU, bounds its epoch time. Here a batch of uint8 images already on the device is
augmented in a handful of tensor ops.

weak   = random crop with zero padding (shift up to `pad` px) + horizontal flip.
strong = weak + `n_ops` random ops of the 14 RandAugment ops at random magnitude + Cutout
         (square of side up to half the image, filled with the dataset mean colour).
Colour ops are computed for the whole batch and selected per sample with `torch.where` (cheaper
on a GPU than grouping by op, which would need a host sync); the five geometric ops become one
per-sample affine matrix and a single `grid_sample`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
       "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
_OP = {name: i for i, name in enumerate(OPS)}


def _rand(shape, gen, device):
    return torch.rand(shape, generator=gen, device=device)


def _randint(high, shape, gen, device, low=0):
    return torch.randint(low, high, shape, generator=gen, device=device)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def crop_flip(x: torch.Tensor, pad: int, gen=None, hflip: bool = True) -> torch.Tensor:
    """Random shift by up to `pad` px (zero fill) and random horizontal flip, per sample."""
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = _randint(2 * pad + 1, (b,), gen, dev)
        ox = _randint(2 * pad + 1, (b,), gen, dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        x = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
        x = x.gather(3, cols)
    if not hflip:
        return x
    flip = _rand((b, 1, 1, 1), gen, dev) < 0.5
    return torch.where(flip, x.flip(3), x)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(degenerate, x, factor):
    return (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)


def _equalize(x):
    """Per-image, per-channel histogram equalisation on 256 levels (PIL semantics, batched)."""
    b, c, h, w = x.shape
    q = (x * 255.0).round().long().clamp_(0, 255).view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    cdf = hist.cumsum(1)
    first = hist.gt(0).float().argmax(1, keepdim=True)  # lowest occupied level
    cdf_min = cdf.gather(1, first)
    denom = (h * w - cdf_min).clamp_min(1.0)
    lut = ((cdf - cdf_min) / denom).clamp_(0.0, 1.0)
    out = lut.gather(1, q).view(b, c, h, w)
    flat = (h * w - cdf_min).view(b, c, 1, 1) <= 0  # constant channel: leave as is
    return torch.where(flat, x, out)


def _sharpen_degenerate(x):
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    k = k.expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
    return smooth


def rand_augment(x: torch.Tensor, fill: torch.Tensor, n_ops: int = 1, gen=None) -> torch.Tensor:
    """Apply `n_ops` random ops per sample (see module doc). x: float [B,3,H,W] in [0,1]."""
    b, _, h, w = x.shape
    dev = x.device
    for _ in range(n_ops):
        op = _randint(len(OPS), (b,), gen, dev)
        m = _rand((b,), gen, dev)  # magnitude in [0, 1)
        sign = torch.where(_rand((b,), gen, dev) < 0.5, -1.0, 1.0)
        f = (0.05 + 1.9 * m).view(b, 1, 1, 1)  # enhance factor in [0.05, 1.95]
        sel = lambda name: (op == _OP[name]).view(b, 1, 1, 1)  # noqa: E731

        # --- colour ops, computed for the batch, kept where selected
        lo = x.amin((2, 3), keepdim=True)
        hi = x.amax((2, 3), keepdim=True)
        auto = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        out = torch.where(sel("AutoContrast"), auto, x)
        out = torch.where(sel("Brightness"), _blend(torch.zeros_like(x), x, f), out)
        out = torch.where(sel("Color"), _blend(_gray(x).expand_as(x), x, f), out)
        mean = _gray(x).mean((2, 3), keepdim=True)
        out = torch.where(sel("Contrast"), _blend(mean.expand_as(x), x, f), out)
        out = torch.where(sel("Equalize"), _equalize(x), out)
        bits = (4 + (m * 5).floor().clamp_(max=4)).view(b, 1, 1, 1)  # 4..8 bits kept
        step = torch.pow(2.0, 8.0 - bits)
        post = torch.floor((x * 255.0).round() / step) * step / 255.0
        out = torch.where(sel("Posterize"), post, out)
        out = torch.where(sel("Sharpness"), _blend(_sharpen_degenerate(x), x, f), out)
        thresh = m.view(b, 1, 1, 1)
        out = torch.where(sel("Solarize"), torch.where(x >= thresh, 1.0 - x, x), out)

        # --- geometric ops: one affine matrix per sample (identity where none is selected)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        ang = sign * m * math.radians(30.0)
        is_rot = op == _OP["Rotate"]
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta[:, 0, 0] = torch.where(is_rot, cos, theta[:, 0, 0])
        theta[:, 0, 1] = torch.where(is_rot, -sin, theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(is_rot, sin, theta[:, 1, 0])
        theta[:, 1, 1] = torch.where(is_rot, cos, theta[:, 1, 1])
        shear = sign * m * 0.3
        theta[:, 0, 1] = torch.where(op == _OP["ShearX"], shear, theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(op == _OP["ShearY"], shear, theta[:, 1, 0])
        shift = sign * m * 0.3 * 2.0  # 30% of the side, in normalised [-1, 1] coordinates
        theta[:, 0, 2] = torch.where(op == _OP["TranslateX"], shift, theta[:, 0, 2])
        theta[:, 1, 2] = torch.where(op == _OP["TranslateY"], shift, theta[:, 1, 2])
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        f_ = fill.view(1, -1, 1, 1)
        warped = F.grid_sample(out - f_, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False) + f_
        geometric = (op == _OP["Rotate"]) | (op == _OP["ShearX"]) | (op == _OP["ShearY"]) | \
                    (op == _OP["TranslateX"]) | (op == _OP["TranslateY"])
        x = torch.where(geometric.view(b, 1, 1, 1), warped, out)
    return x


def cutout(x: torch.Tensor, fill: torch.Tensor, gen=None) -> torch.Tensor:
    """Square of random side in [1, H/2] at a random centre, filled with `fill` [3]."""
    b, _, h, w = x.shape
    dev = x.device
    side = 1 + (_rand((b,), gen, dev) * (max(h // 2, 1))).floor()
    cy = (_rand((b,), gen, dev) * h).floor()
    cx = (_rand((b,), gen, dev) * w).floor()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    before = (side / 2).floor().view(b, 1, 1)  # rows/cols before the centre; side - before from it
    after = side.view(b, 1, 1) - before
    dy, dx = ys - cy.view(b, 1, 1), xs - cx.view(b, 1, 1)
    inside = (dy >= -before) & (dy < after) & (dx >= -before) & (dx < after)
    return torch.where(inside[:, None], fill.view(1, -1, 1, 1), x)


class DeviceAugment:
    """Weak/strong views of uint8 batches on the device, normalised for the network."""

    def __init__(self, mean, std, image_size: int, crop_padding: float = 0.125, n_ops: int = 1,
                 device="cpu", seed: int = 0, hflip: bool = True):
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.pad = int(round(crop_padding * image_size))
        self.n_ops = n_ops
        self.hflip = hflip
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def plain(self, x_uint8):
        return self.normalize(to_float(x_uint8))

    def weak(self, x_uint8):
        return self.normalize(crop_flip(to_float(x_uint8), self.pad, self.gen, self.hflip))

    def strong(self, x_uint8):
        x = crop_flip(to_float(x_uint8), self.pad, self.gen, self.hflip)
        x = rand_augment(x, self.mean, self.n_ops, self.gen)
        x = cutout(x, self.mean, self.gen)
        return self.normalize(x)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def channel_stats(images_uint8: torch.Tensor):
    """Per-channel mean/std in [0,1] units (float64 accumulate; chunked for big tables)."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    for chunk in images_uint8.split(8192):
        x = chunk.double() / 255.0
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-8).sqrt()
    return mean.float().tolist(), std.clamp_min(1e-3).float().tolist()
