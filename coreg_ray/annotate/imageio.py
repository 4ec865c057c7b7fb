"""Image decoding for annotation: NumPy + Pillow only (no torch), so that Ray's CPU decode
tasks start fast (importing torch costs seconds per worker process on small machines)."""
from __future__ import annotations

import io

import numpy as np


def _pil_filter(name: str):
    from PIL import Image
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}.get(str(name).lower(), Image.BICUBIC)


def prepare_image(img, size: int, resize_mode: str = "shortest", interpolation: str = "bicubic",
                  fill_color: int = 0) -> np.ndarray:
    """A PIL image -> uint8 [size, size, 3] RGB, as open_clip's eval transform does it:
    'shortest' resizes the short side to `size` and centre-crops; 'longest' resizes the long
    side and pads with `fill_color`; 'squash' resizes both sides."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if ("A" in img.getbands() or img.mode == "P") \
            else img.convert("RGB")
    w, h = img.size
    filt = _pil_filter(interpolation)
    if (w, h) == (size, size):
        pass
    elif resize_mode == "squash":
        img = img.resize((size, size), filt)
    elif resize_mode == "longest":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), filt)
        canvas = Image.new("RGB", (size, size), (fill_color,) * 3)
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    else:  # shortest + centre crop (torchvision Resize(int) + CenterCrop)
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), filt)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def decode_image(blob, size: int, resize_mode="shortest", interpolation="bicubic",
                 fill_color=0) -> np.ndarray:
    """Encoded bytes (or an HF-style {'bytes': ...} dict) -> uint8 [size, size, 3]; raises on
    unreadable data (or more pixels than `coreg_ray.data.pixels.max_pixels()`)."""
    from coreg_ray.data.pixels import open_image

    if isinstance(blob, dict):
        blob = blob.get("bytes")
    if blob is None:
        raise ValueError("no image bytes")
    with open_image(io.BytesIO(bytes(blob))) as im:
        im.load()
        return prepare_image(im, size, resize_mode, interpolation, fill_color)


def _error_text(exc, blob) -> str:
    """Why an image could not be decoded, the same text on every run (no object addresses)."""
    import re

    if isinstance(blob, dict):
        blob = blob.get("bytes")
    if blob is not None and len(blob) == 0:
        return "empty file (0 bytes)"
    text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", f"{type(exc).__name__}: {exc}")
    return text.replace("\n", " ")[:300]


def decode_batch_bytes(blobs, ids, prep: dict) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch; unreadable images become zeros with an error string (never raises)."""
    size = prep["size"]
    out = np.zeros((len(blobs), size, size, 3), np.uint8)
    errors = np.full(len(blobs), "", dtype=object)
    for i, blob in enumerate(blobs):
        try:
            out[i] = decode_image(blob, size, prep["resize_mode"], prep["interpolation"],
                                  prep["fill_color"])
        except Exception as exc:  # PIL raises many types for corrupt data
            errors[i] = _error_text(exc, blob)
    return out, errors


def decode_udf(batch: dict, prep: dict, skip=None, keep=None) -> dict:
    """Ray Data CPU task: drop the rows whose id is in `skip` (finished shards) or, with `keep`,
    not in it (the rows still to do); decode and resize the rest to uint8 [B, S, S, 3] `pixels`
    (bad images get an `error` string)."""
    from coreg_ray.data.ids import as_ids

    ids = as_ids(batch["id"], "pool")
    blobs = batch["image"]
    if (skip is not None and len(skip)) or keep is not None:
        sel = np.isin(ids, keep) if keep is not None else ~np.isin(ids, skip)
        ids, blobs = ids[sel], np.asarray(blobs, dtype=object)[sel]
    pixels, errors = decode_batch_bytes(blobs, ids, prep)
    return {"id": ids, "pixels": pixels, "error": errors}


def annotator_batch(batch: dict, prep: dict, who: str, num_templates: int, num_classes: int):
    """What every annotator's `__call__` starts with: the batch's ids, its images as uint8
    pixels (decoded here when the batch carries encoded `image` bytes), and the output columns
    pre-filled for "no vote" — rows whose decode (or an earlier stage) failed keep them and their
    `error`. Returns (pixels, out, ok): annotate `pixels[ok]` and write into `out` at `ok`."""
    from coreg_ray.errors import CoregError

    from coreg_ray.data.ids import as_ids

    ids = as_ids(batch["id"], who)
    n = len(ids)
    errors = batch.get("error")
    errors = np.full(n, "", dtype=object) if errors is None else \
        np.asarray([("" if e is None else str(e)) for e in errors], dtype=object)
    if "pixels" in batch:
        pixels = np.asarray(batch["pixels"])
    elif "image" in batch:
        pixels, dec_err = decode_batch_bytes(batch["image"], ids, prep)
        errors = np.where(errors == "", dec_err, errors).astype(object)
    else:
        raise CoregError(f"{who}: the batch needs a 'pixels' or an 'image' column "
                         f"(has: {', '.join(batch)})")
    out = {"id": ids, "votes": np.full((n, num_templates), -1, np.int64),
           "candidates": np.zeros((n, num_classes), bool),
           "probs": np.zeros((n, num_classes), np.float32), "error": errors}
    return pixels, out, np.flatnonzero(errors == "")
