"""A cap on the pixels an image may decode to, checked from its header before it is decoded.

A few kilobytes of PNG can decode to gigabytes (a 13000x13000 image is 507 MB as RGB), so every
decoder (`load_image_table`'s readers, the Ray Data decode tasks of `annotate` and `predict`)
opens an image with `open_image`, which reads only the header, refuses an image of more than
`max_pixels()` pixels (width x height) and only then lets it be decoded. The limit is
`COREG_RAY_MAX_IMAGE_PIXELS` (default 40,000,000, e.g. 6324x6324; raise it for large scans).
Pillow's own decompression-bomb warning is silenced (this check is stricter and says which
row); its hard error, past twice its limit, is reported the same way.
"""
from __future__ import annotations

import os
import warnings

ENV = "COREG_RAY_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000


def max_pixels() -> int:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        from coreg_ray.errors import CoregError

        raise CoregError(f"{ENV}={raw!r}: must be a positive number of pixels")
    return value


class TooManyPixels(ValueError):
    """An image larger than the cap (its header says so; nothing was decoded)."""


def open_image(src):
    """`PIL.Image.open(src)` that refuses an image of more than `max_pixels()` pixels before
    any pixel is decoded (`TooManyPixels`). Use as a context manager, like Image.open."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(src)
    w, h = im.size
    cap = max_pixels()
    if w * h > cap:
        im.close()
        raise TooManyPixels(f"{w}x{h} image: {w * h:,} pixels, more than the {cap:,} allowed "
                            f"(set {ENV} to allow more)")
    return im
