"""Batched augmentation on the training device, per-sample random, no host syncs.

The reference code (Co-Reg's `datasets/*.py`, whose `RandomAugment` is PiCO's
`utils/randaugment.py`) augments each image with PIL in the data loader: the CPU, not the GPU,
bounds its epoch time. Here a batch of uint8 images already on the device is augmented in a
handful of tensor ops that reproduce the PIL ops on uint8 levels (same LUTs, same truncation).

weak   = RandomCrop(size, padding=pad) with zero (black) padding + horizontal flip (p=0.5).
strong = weak + `n_ops` ops (the authors use 1) drawn uniformly with replacement from the 14 below,
         each always applied, magnitude v ~ U[low, high) of `MAGNITUDE` (no random sign, no
         per-op probability), then CutoutAbs: a square of side int(v)+1, v ~ U[0, 0.5) * width,
         filled with RGB (125, 123, 114) (see `cutout`).
         Enhance factors lie in [0.05, 0.95], so Brightness/Color/Contrast/Sharpness only ever
         darken / desaturate / flatten / blur. Geometric ops use PIL's conventions: output pixel
         (x, y) takes input pixel floor(A @ (x + .5, y + .5, 1)) (nearest), black outside;
         Rotate is counter-clockwise about the centre, ShearX/Y and TranslateX/Y map output (x, y)
         to input (x + v*y, y) / (x, y + v*x) / (x + v*W, y) / (x, y + v*H) (top-left origin).
strong, grayscale=True (their F-MNIST / FER2013 view): weak + DeVries Cutout(n_holes=1,
         length=16): centre uniform over the pixels, rows/cols [c - 8, c + 8) clipped to the
         image, zeroed (black); no RandAugment. (Their ToPILImage/ToTensor round trip after it is
         the identity on k/255 values.)
Colour ops are computed for the whole batch and selected per sample with `torch.where`; the five
geometric ops become one per-sample affine matrix and a single gather.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
       "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
_OP = {name: i for i, name in enumerate(OPS)}
# (low, high) of each op's magnitude, drawn as low + (high - low) * U[0, 1) (the reference list).
MAGNITUDE = {
    "AutoContrast": (0.0, 1.0), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95),
    "Contrast": (0.05, 0.95), "Equalize": (0.0, 1.0), "Identity": (0.0, 1.0),
    "Posterize": (4.0, 8.0), "Rotate": (-30.0, 30.0), "Sharpness": (0.05, 0.95),
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "Solarize": (0.0, 256.0),
    "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
GEOMETRIC_FILL = 0  # PIL's default fillcolor for rotate/transform: black
CUTOUT_FILL = (125, 123, 114)  # uint8 RGB of the reference CutoutAbs
CUTOUT_MAX_FRACTION = 0.5  # CutoutAbs side: v ~ U[0, 0.5) * width
GRAY_CUTOUT_LENGTH = 16  # Cutout(n_holes=1, length=16) of the grayscale strong view


def _rand(shape, gen, device, dtype=torch.float32):
    return torch.rand(shape, generator=gen, device=device, dtype=dtype)


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


# ----------------------------------------------------------------------------- PIL ops on levels
# q: float tensor [B, C, H, W] holding integer levels 0..255 (exact in float32).

def _luma(q):
    """PIL RGB -> L: (299 R + 587 G + 114 B) / 1000 in its 16-bit fixed point, rounded."""
    if q.shape[1] == 1:
        return q
    s = q[:, 0:1] * 19595 + q[:, 1:2] * 38470 + q[:, 2:3] * 7471 + 32768  # < 2**24: exact
    return torch.floor(s / 65536.0)


def _blend(degenerate, q, factor):
    """PIL Image.blend on uint8: trunc(d + f * (q - d)) in float32, clipped to [0, 255]."""
    return torch.floor(degenerate + (q - degenerate) * factor).clamp_(0.0, 255.0)


def _autocontrast(q):
    """PIL ImageOps.autocontrast (cutoff 0), per image and channel: int(q * s - lo * s)."""
    lo = q.amin((2, 3), keepdim=True).double()
    hi = q.amax((2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    out = torch.floor(q.double() * scale + (-lo * scale)).clamp_(0.0, 255.0).to(q.dtype)
    return torch.where(hi > lo, out, q)


def _equalize(q):
    """PIL ImageOps.equalize per image and channel: step = (N - count of the top level) // 255,
    lut[i] = (step // 2 + #pixels below level i) // step; the identity where step == 0."""
    b, c, h, w = q.shape
    qi = q.long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=q.device)
    hist.scatter_add_(1, qi, torch.ones_like(qi))
    top = hist.gather(1, qi.amax(1, keepdim=True))
    step = (h * w - top) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)
    out = lut.gather(1, qi).view(b, c, h, w).to(q.dtype)
    return torch.where((step > 0).view(b, c, 1, 1), out, q)


def _smooth(q):
    """PIL ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divisor 13), rounded; the
    one-pixel border is copied from the input, as PIL's 3x3 filter does. Plain adds of shifted
    slices (exact integer sums; no conv, so neither autocast nor TF32 can round them)."""
    h, w = q.shape[2], q.shape[3]
    if h < 3 or w < 3:
        return q
    s = 4.0 * q[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + q[:, :, dy:dy + h - 2, dx:dx + w - 2]
    out = q.clone()
    out[:, :, 1:-1, 1:-1] = torch.floor((2.0 * s + 13.0) / 26.0)
    return out


def _affine_nearest(q, coef, fill, fixed):
    """PIL Image.transform(AFFINE, coef, NEAREST), `fill` outside. coef: float64 [B, 6] (a..f):
    output pixel (x, y) takes the input pixel at (a X + b Y + c, d X + e Y + f), X = x + .5,
    Y = y + .5, floored. PIL evaluates this in double for pure translations (`fixed` False) and
    in 16.16 fixed point otherwise (a0 = round(a * 2**16), c0 = round((c + a/2 + b/2) * 2**16),
    index = (c0 + x a0 + y b0) >> 16); both are reproduced so boundary pixels match too."""
    b, ch, h, w = q.shape
    dev = q.device
    a, bb, c, d, e, f = (coef[:, i].view(b, 1, 1) for i in range(6))
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
    xf = torch.floor(a * (xs + 0.5) + bb * (ys + 0.5) + c).long()
    yf = torch.floor(d * (xs + 0.5) + e * (ys + 0.5) + f).long()

    def fix(t):
        return torch.floor(t * 65536.0 + 0.5).long()

    xl, yl = xs.long(), ys.long()
    xx = fix(c + a * 0.5 + bb * 0.5) + xl * fix(a) + yl * fix(bb)
    yy = fix(f + d * 0.5 + e * 0.5) + xl * fix(d) + yl * fix(e)
    fixed = fixed.view(b, 1, 1)
    xi = torch.where(fixed, torch.div(xx, 65536, rounding_mode="floor"), xf)
    yi = torch.where(fixed, torch.div(yy, 65536, rounding_mode="floor"), yf)
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(b, 1, h * w).expand(b, ch, h * w)
    out = q.reshape(b, ch, h * w).gather(2, idx).view(b, ch, h, w)
    return torch.where(valid[:, None], out, torch.full_like(out, fill))


def _geometric_coef(op, v, h, w):
    """Per-sample PIL affine coefficients (float64 [B, 6]); identity for non-geometric ops."""
    b = op.shape[0]
    v = v.double()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    coef = torch.stack([one, zero, zero, zero, one, zero], 1)

    def put(name, *vals):
        sel = (op == _OP[name]).view(b, 1)
        return torch.where(sel, torch.stack(vals, 1), coef)

    # Image.rotate(v): angle = -radians(v), matrix [cos, sin, .; -sin, cos, .] (rounded to 15
    # decimals, as PIL does) about the centre (w/2, h/2).
    ang = -torch.deg2rad(v)
    cos, sin = torch.round(torch.cos(ang), decimals=15), torch.round(torch.sin(ang), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    coef = put("Rotate", cos, sin, cos * -cx + sin * -cy + cx,
               -sin, cos, -sin * -cx + cos * -cy + cy)
    coef = put("ShearX", one, v, zero, zero, one, zero)
    coef = put("ShearY", one, zero, zero, v, one, zero)
    coef = put("TranslateX", one, zero, v * w, zero, one, zero)
    coef = put("TranslateY", one, zero, zero, zero, one, v * h)
    return coef


def apply_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply op `OPS[op[i]]` with magnitude `v[i]` to sample i, as the PIL reference does.
    x: float [B, C, H, W] holding k/255 values (from uint8); returns the same kind."""
    b, _, h, w = x.shape
    q = (x * 255.0).round()
    f = v.to(q.dtype).view(b, 1, 1, 1)
    sel = lambda name: (op == _OP[name]).view(b, 1, 1, 1)  # noqa: E731

    gray = _luma(q)
    out = torch.where(sel("AutoContrast"), _autocontrast(q), q)
    out = torch.where(sel("Brightness"), _blend(torch.zeros_like(q), q, f), out)
    out = torch.where(sel("Color"), _blend(gray.expand_as(q), q, f), out)
    mean = torch.floor(gray.double().mean((2, 3), keepdim=True) + 0.5).to(q.dtype)
    out = torch.where(sel("Contrast"), _blend(mean.expand_as(q), q, f), out)
    out = torch.where(sel("Equalize"), _equalize(q), out)
    step = torch.pow(2.0, 8.0 - torch.floor(f))  # bits = int(v): 4..7 for v in [4, 8)
    out = torch.where(sel("Posterize"), torch.floor(q / step) * step, out)
    out = torch.where(sel("Sharpness"), _blend(_smooth(q), q, f), out)
    out = torch.where(sel("Solarize"), torch.where(q < f, q, 255.0 - q), out)

    fixed = (op == _OP["Rotate"]) | (op == _OP["ShearX"]) | (op == _OP["ShearY"])
    warped = _affine_nearest(q, _geometric_coef(op, v, h, w), float(GEOMETRIC_FILL), fixed)
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in GEOMETRIC:
        geometric |= op == _OP[name]
    return torch.where(geometric.view(b, 1, 1, 1), warped, out) / 255.0


def draw_ops(b: int, gen=None, device="cpu"):
    """One RandomAugment draw per sample: op uniform over `OPS` (with replacement), magnitude
    low + (high - low) * U[0, 1) of its `MAGNITUDE` range. Returns (op [B] long, v [B] float)."""
    low = torch.tensor([MAGNITUDE[o][0] for o in OPS], device=device)
    high = torch.tensor([MAGNITUDE[o][1] for o in OPS], device=device)
    op = _randint(len(OPS), (b,), gen, device)
    v = low[op] + (high[op] - low[op]) * _rand((b,), gen, device)
    return op, v


def rand_augment(x: torch.Tensor, n_ops: int = 1, gen=None) -> torch.Tensor:
    """The reference RandomAugment without its Cutout: `n_ops` times, per sample, one op drawn
    by `draw_ops`, always applied. x: float [B, C, H, W] holding k/255 values (from uint8)."""
    for _ in range(n_ops):
        op, v = draw_ops(x.shape[0], gen, x.device)
        x = apply_ops(x, op, v)
    return x


def cutout(x: torch.Tensor, gen=None, fill=CUTOUT_FILL) -> torch.Tensor:
    """The reference `Cutout(img, v)` with v ~ U[0, 0.5): side v * W px; CutoutAbs draws the
    corner as x0 = int(max(0, xc - v/2)) with xc = np.random.uniform(W), which is U(1, W] (numpy's
    `low` argument), likewise y0 with H; PIL fills the inclusive rectangle
    [x0, int(min(W, x0 + v))] x [y0, int(min(H, y0 + v))]: int(v) + 1 px a side, clipped only at
    the right/bottom edge. `fill`: uint8 colour (default the reference's (125, 123, 114))."""
    b, c, h, w = x.shape
    dev = x.device
    v = _rand((b,), gen, dev, torch.float64) * CUTOUT_MAX_FRACTION * w
    xc = w + (1 - w) * _rand((b,), gen, dev, torch.float64)
    yc = h + (1 - h) * _rand((b,), gen, dev, torch.float64)
    x0 = torch.floor((xc - v / 2).clamp_min(0.0))
    y0 = torch.floor((yc - v / 2).clamp_min(0.0))
    x1 = torch.floor(torch.clamp(x0 + v, max=float(w)))
    y1 = torch.floor(torch.clamp(y0 + v, max=float(h)))
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
    inside = ((xs >= x0.view(b, 1, 1)) & (xs <= x1.view(b, 1, 1)) & (ys >= y0.view(b, 1, 1))
              & (ys <= y1.view(b, 1, 1)) & (v > 0).view(b, 1, 1))
    colour = torch.as_tensor(fill, dtype=x.dtype, device=dev)[:c].view(1, -1, 1, 1) / 255.0
    return torch.where(inside[:, None], colour, x)


def cutout_holes(x: torch.Tensor, length: int = GRAY_CUTOUT_LENGTH, gen=None) -> torch.Tensor:
    """DeVries & Taylor `Cutout(n_holes=1, length)` on a [0,1] tensor: centre (y, x) uniform over
    the pixels, rows [y - length//2, y + length//2) and the same columns, clipped to the image,
    set to 0 (black)."""
    b, c, h, w = x.shape
    dev = x.device
    cy = _randint(h, (b,), gen, dev).view(b, 1, 1)
    cx = _randint(w, (b,), gen, dev).view(b, 1, 1)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    half = length // 2
    inside = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return x.masked_fill(inside[:, None], 0.0)


class DeviceAugment:
    """Weak/strong views of uint8 batches on the device, normalised for the network.
    `grayscale=True` gives the reference's grayscale strong view (F-MNIST, FER2013): crop + flip
    + a 16 px zero Cutout (16/28 of the side below 28 px), no RandAugment."""

    def __init__(self, mean, std, image_size: int, crop_padding: float = 0.125, n_ops: int = 1,
                 device="cpu", seed: int = 0, hflip: bool = True, grayscale: bool = False):
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.pad = int(round(crop_padding * image_size))
        self.n_ops = n_ops
        self.hflip = hflip
        self.grayscale = grayscale
        # the reference's 16 px square (F-MNIST 28 px, FER2013 64 px); smaller images (not in the
        # paper, e.g. 8x8 digits) get the same 16/28 of their side so the digit is not blanked
        self.gray_cutout = min(GRAY_CUTOUT_LENGTH, max(1, round(GRAY_CUTOUT_LENGTH * image_size / 28)))
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
        if self.grayscale:
            x = cutout_holes(x, self.gray_cutout, self.gen)
        else:
            x = rand_augment(x, self.n_ops, self.gen)
            x = cutout(x, self.gen)
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
