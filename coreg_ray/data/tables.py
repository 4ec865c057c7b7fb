"""Image tables: every source becomes one `ImageTable` holding a uint8 [N, 3, H, W] tensor.

Sources (`load_image_table(spec)`):
- a Parquet image table (`id`, encoded `image`, optional `label`; `classes.json` beside it), or
  a folder of Parquet shards,
- a folder of image files, searched recursively; ids are the files' relative paths; labels from
  top-level class sub-folders by the rule in `coreg_ray.data.sources` (a flat folder needs
  classes.json or class names),
- either of these on object storage (s3://, gs://; `coreg_ray.data.location`),
- a NumPy `.npz` (`images` [N,H,W(,C)], optional `labels`, `ids`, `classes`),
- `digits`, `digits:train`, `digits:test`: scikit-learn's 1,797 real 8x8 digits (the embedded
  default; a fixed 80/20 split by id),
- `torchvision:NAME:ROOT[:test]`: a torchvision dataset already on disk (never downloads).

Images are decoded once; grayscale/RGBA become RGB; differently sized or non-square images are
letterboxed (resized keeping aspect, then padded) to the working size: `image_size` when given
(the configured `data.image_size` / `--image-size`), else the most common size in the table, so
one odd image never sets the size of all the others. How many images of a mixed-size table
were resized is said in one note on stderr (and kept in `table.meta["resized"]`).
"""
from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from coreg_ray.data.ids import as_ids, first_duplicate, id_text
from coreg_ray.data.listing import IMAGE_SUFFIXES  # noqa: F401  (re-exported)
from coreg_ray.errors import CoregError, note


@dataclass
class ImageTable:
    images: torch.Tensor  # uint8 [N, 3, H, W], CPU
    ids: np.ndarray  # [N] unique, int64 or object-of-str (coreg_ray.data.ids)
    labels: np.ndarray | None  # int64 [N] ground truth (evaluation and few-shot only), or None
    classes: list[str]
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids = as_ids(self.ids, self.source or "images")
        n = len(self.ids)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise CoregError(f"{self.source}: images must be uint8 [N,3,H,W], got "
                             f"{tuple(self.images.shape)} {self.images.dtype}")
        if self.images.shape[0] != n:
            raise CoregError(f"{self.source}: {self.images.shape[0]} images but {n} ids")
        dup = first_duplicate(self.ids)
        if dup is not None:
            raise CoregError(f"{self.source}: id {id_text(dup)} appears more than once")
        if self.labels is not None:
            if len(self.labels) != n:
                raise CoregError(f"{self.source}: {len(self.labels)} labels for {n} images")
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.classes)))
            if len(bad):
                i = bad[0]
                raise CoregError(f"{self.source}: row id {self.ids[i]} has label {self.labels[i]} "
                                 f"outside 0..{len(self.classes) - 1} ({len(self.classes)} classes)")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index) -> "ImageTable":
        index = np.asarray(index)
        return ImageTable(self.images[torch.as_tensor(index)], self.ids[index],
                          None if self.labels is None else self.labels[index],
                          list(self.classes), self.source, dict(self.meta))


# ----------------------------------------------------------------------------- decoding
def _to_rgb_array(img, size: int | None):
    from PIL import Image

    if img.mode != "RGB":
        # Palette/RGBA/LA/grayscale/16-bit: composite onto black, then to 3 channels.
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" \
            else img.convert("RGB")
    if size is not None and img.size != (size, size):
        w, h = img.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return np.asarray(img, dtype=np.uint8)


def _decode_blob(blob, rid, size: int | None, source: str):
    """(HxWx3 uint8 array at `size`, (h, w) as stored) of one encoded image; a bad blob is one
    line naming its row id."""
    from coreg_ray.data.pixels import open_image

    try:
        with open_image(io.BytesIO(blob)) as im:
            im.load()
            return _to_rgb_array(im, size), (im.size[1], im.size[0])
    except Exception as exc:  # PIL raises many types for corrupt data
        raise CoregError(f"{source}: image of row id {id_text(rid)} cannot be decoded "
                         f"({type(exc).__name__}: {exc})") from None


def decode_images(blobs, ids, size: int | None, source: str, meta: dict | None = None) -> torch.Tensor:
    """Decode encoded images (bytes) into uint8 [N,3,H,W]; a bad blob fails naming its id."""
    def decode(i):
        return _decode_blob(blobs[i], ids[i], size, source)

    return _stack(decode, len(blobs), size, source, ids, meta)


def decode_chunks(chunks, n: int, size: int | None, source: str,
                  meta: dict | None = None) -> torch.Tensor:
    """`decode_images` over `chunks`, an iterable of (ids, blobs) holding `n` rows in order,
    fetched one after the other: with a `size` each chunk is decoded into the one preallocated
    table and its bytes dropped before the next chunk is fetched."""
    def parts():
        for ids, blobs in chunks:
            yield len(blobs), (lambda j, b=blobs, r=ids: _decode_blob(b[j], r[j], size, source))

    return _fill(parts(), n, size, source, meta)


def working_size(shapes) -> int:
    """The side images of these (h, w) shapes are brought to when no size is asked for: that of
    the most common shape (ties: the smaller side), the longer side if it is not square."""
    from collections import Counter

    counts = Counter((int(h), int(w)) for h, w in shapes)
    (h, w), _ = min(counts.items(), key=lambda kv: (-kv[1], max(kv[0])))
    return max(h, w)


# rows decoded at a time into a preallocated table when the working size is known
CHUNK_ROWS = 2048


def _stack(decode, n, size, source, ids, meta: dict | None = None):
    """Run `decode(i) -> (HxWx3 uint8 array, (h, w) as stored)` over all rows and stack them at
    the working size (`size`, else the most common one); the odd ones are letterboxed to it and
    counted: one note on stderr says how many, `meta["resized"]` keeps the number."""
    return _fill(((min(CHUNK_ROWS, n - a), lambda j, a=a: decode(a + j))
                  for a in range(0, n, CHUNK_ROWS)), n, size, source, meta)


def _fill(parts, n, size, source, meta: dict | None = None):
    """`_stack` over `parts`, an iterable of (rows, decode(j) for j < rows), in row order. With
    a `size`, every image is written into one preallocated uint8 [n,3,S,S] array as it is
    decoded (no list of arrays, no stacked copy, no permuted copy: 1x the images instead of
    3x); without one, the images are kept until the most common size is known, then stacked.
    The pixels are the same either way."""
    if n == 0:
        raise CoregError(f"{source}: no images")
    workers = min(8, os.cpu_count() or 1)
    out = np.empty((n, 3, size, size), np.uint8) if size is not None else None
    arrays, stored = [], []
    with ThreadPoolExecutor(workers) as pool:
        for rows, decode in parts:
            for arr, shape in pool.map(decode, range(rows)):
                if out is not None:
                    out[len(stored)] = arr.transpose(2, 0, 1)
                else:
                    arrays.append(arr)
                stored.append(shape)
            del decode  # the chunk's bytes go before the next chunk is fetched
    if len(stored) != n:
        raise CoregError(f"{source}: {len(stored)} images read, {n} expected")
    target = size if size is not None else working_size(stored)
    odd = [i for i in range(len(arrays)) if arrays[i].shape[:2] != (target, target)]
    for i in odd:  # only without a size: with one, decode already letterboxed every image
        arrays[i] = _letterbox(arrays[i], target)
    resized = sum(s != (target, target) for s in stored)
    kinds = len(set(stored))
    if meta is not None:
        meta["resized"] = resized
    if kinds > 1:
        why = "the size asked for" if size is not None else \
            "the most common size; set data.image_size or --image-size to choose"
        note(f"{source}: images of {kinds} sizes; {resized} of {n} resized to "
             f"{target}x{target} ({why})")
    elif resized and size is None:
        h, w = stored[0]
        note(f"{source}: all {n} images are {w}x{h} (not square): letterboxed to {target}x{target}")
    if out is not None:
        return torch.from_numpy(out)
    out = np.stack(arrays)
    del arrays
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _letterbox(arr, size):
    from PIL import Image
    return _to_rgb_array(Image.fromarray(arr), size)


# ----------------------------------------------------------------------------- readers
def load_image_table(spec: str | os.PathLike, image_size: int | None = None,
                     limit: int | None = None, classes: list[str] | None = None) -> ImageTable:
    """Load any supported source (see module doc). `limit` keeps the first n rows."""
    spec = str(spec)
    check_size_limit(image_size, limit)
    if spec.split(":")[0] == "digits":
        table = _load_digits(spec, image_size)
    elif spec.startswith("torchvision:"):
        table = _load_torchvision(spec, image_size, limit)
    elif spec.endswith(".npz") and "://" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise CoregError(f"image table not found: {spec}")
        table = _load_npz(path, image_size, classes)
    else:
        from coreg_ray.data.listing import locate

        kind, fs, paths, root, loc = locate(spec, "this command")
        if kind == "parquet":
            table = _load_parquet(fs, paths, loc, image_size, limit, classes)
        else:
            table = _load_folder(loc, fs, root, image_size, limit, classes)
    if limit is not None and len(table) > limit:
        table = table.subset(np.arange(limit))
    return table


def check_size_limit(image_size, limit) -> None:
    """One line for a `--limit` or `--image-size` out of range."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CoregError(f"--limit: {limit!r} is out of range (valid: >= 1, the rows to keep)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 4 <= image_size <= 1024):
        raise CoregError(f"--image-size: {image_size!r} is out of range (valid: [4, 1024])")


def read_classes(path: Path) -> list[str] | None:
    f = path if path.name == "classes.json" else path.parent / "classes.json"
    if not f.exists():
        return None
    try:
        names = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CoregError(f"{f}: not valid JSON ({exc})")
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names) or not names:
        raise CoregError(f"{f}: must be a non-empty JSON list of class names")
    return names


def open_image_parquet(path):
    """(ParquetFile, its column names) of a local image table file: one line if it is not
    readable Parquet or lacks the `id` / `image` columns."""
    import pyarrow.fs as pafs

    from coreg_ray.data.listing import open_image_parquet as _open
    return _open(pafs.LocalFileSystem(), str(Path(path).absolute()), str(path))


def _load_parquet(fs, paths, loc, size, limit, classes) -> ImageTable:
    import pyarrow as pa

    from coreg_ray.data.location import filesystem_of
    from coreg_ray.data.listing import open_image_parquet as _open, read_classes_at

    shown = str(loc)
    parts, has_label = [], True
    for p in paths:
        pf, cols = _open(fs, p, shown)
        has_label = has_label and "label" in cols
        parts.append(pf.read(columns=["id", "image"] + (["label"] if "label" in cols else [])))
    if not has_label:
        parts = [t.select(["id", "image"]) for t in parts]
    try:
        tbl = pa.concat_tables(parts)
    except pa.ArrowInvalid as exc:
        raise CoregError(f"{shown}: the Parquet files disagree on their columns ({exc})") from None
    if limit is not None:
        tbl = tbl.slice(0, limit)
    ids = as_ids(tbl.column("id"), shown)
    img_col = tbl.column("image")
    blobs = img_col.to_pylist()
    for i, b in enumerate(blobs):
        if isinstance(b, dict):  # HF-style struct {bytes, path}
            blobs[i] = b.get("bytes")
        if blobs[i] is None:
            raise CoregError(f"{shown}: row id {id_text(ids[i])} has no image bytes")
    labels = label_column(tbl, shown)
    one_file = list(paths) == [filesystem_of(loc)[1]]
    names = classes or read_classes_at((loc.parent if one_file else loc) / "classes.json")
    if len(ids) == 0:
        raise CoregError(f"{shown}: no rows (no images)")
    if names is None:
        if labels is None:
            raise CoregError(f"{shown}: no classes.json beside it and no labels: pass class names")
        names = [str(i) for i in range(int(labels.max()) + 1)]
    meta = {}
    images = decode_images(blobs, ids, size, shown, meta)
    return ImageTable(images, ids, labels, names, shown, meta)


def label_column(tbl, shown: str):
    """The `label` column of an Arrow table as int64 (None without one); empty values are one
    line. Shared by the whole-table reader and the sharded one (`data.shards`)."""
    if "label" not in tbl.column_names:
        return None
    lab = tbl.column("label")
    if lab.null_count:
        raise CoregError(f"{shown}: column 'label' has {lab.null_count} empty values")
    return lab.to_numpy().astype(np.int64)


def write_image_table(table: ImageTable, path: str | Path, fmt: str = "PNG") -> None:
    """Write a Parquet image table (+ classes.json beside it), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from coreg_ray.outputs import atomic_path, check_output_file, write_text_atomic

    path = check_output_file(path, "image table")
    blobs = []
    for img in table.images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        blobs.append(buf.getvalue())
    from coreg_ray.data.ids import arrow_ids

    cols = {"id": arrow_ids(table.ids), "image": pa.array(blobs, pa.binary())}
    if table.labels is not None:
        cols["label"] = pa.array(table.labels, pa.int16())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)
    write_text_atomic(path.parent / "classes.json", json.dumps(table.classes))


def _load_npz(path: Path, size, classes) -> ImageTable:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CoregError(f"{path}: not a readable .npz ({exc})")
    if "images" not in data:
        raise CoregError(f"{path}: missing array 'images' (has: {', '.join(data.files)})")
    ids = as_ids(data["ids"], str(path)) if "ids" in data else None
    labels = data["labels"].astype(np.int64) if "labels" in data else None
    names = classes or ([str(c) for c in data["classes"]] if "classes" in data else None)
    return table_from_arrays(data["images"], labels, names, ids, size, str(path))


def table_from_arrays(images, labels=None, classes=None, ids=None, size=None,
                      source="arrays") -> ImageTable:
    """Build a table from NumPy images: [N,H,W] gray or [N,H,W,C] / [N,C,H,W] with C in 1,3,4;
    uint8, or floats in [0,1]."""
    from PIL import Image

    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise CoregError(f"{source}: images must be [N,H,W] or [N,H,W,C], got shape {x.shape}")
    if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)
    if x.dtype != np.uint8:
        x = x.astype(np.float64)
        hi = 1.0 if x.max() <= 1.0 else 255.0
        x = np.clip(np.round(x / hi * 255.0), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    n = len(x)
    ids = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, source)
    if labels is not None:
        labels = np.asarray(labels, np.int64)
    if classes is None:
        if labels is None:
            raise CoregError(f"{source}: no labels and no class names: pass classes")
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    if size is not None and x.shape[1:3] != (size, size) or x.shape[1] != x.shape[2]:
        target = size or max(x.shape[1:3])
        x = np.stack([_to_rgb_array(Image.fromarray(a), target) for a in x])
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageTable(images, ids, labels, list(classes), source)


def _load_digits(spec: str, size) -> ImageTable:
    from sklearn.datasets import load_digits

    part = spec.split(":", 1)[1] if ":" in spec else "all"
    if part not in ("all", "train", "test"):
        raise CoregError(f"{spec}: use digits, digits:train or digits:test")
    d = load_digits()
    x = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # [1797, 8, 8], values 0..16
    ids = np.arange(len(x), dtype=np.int64)
    # Fixed split: every 5th sample (by a seeded permutation) is test.
    perm = np.random.default_rng(0).permutation(len(x))
    is_test = np.zeros(len(x), bool)
    is_test[perm[: len(x) // 5]] = True
    keep = {"all": np.ones(len(x), bool), "train": ~is_test, "test": is_test}[part]
    table = table_from_arrays(x[keep], d.target[keep], [str(i) for i in range(10)], ids[keep],
                              size, spec)
    return table


def _load_folder(loc, fs, root, size, limit, classes) -> ImageTable:
    """A folder of image files (`coreg_ray.data.listing.list_folder`: the label rule of
    `coreg_ray.data.sources`), decoded once; ids are the files' relative paths. A file that
    cannot be decoded (or is over the pixel cap) stops the load naming it."""
    from coreg_ray.data.listing import list_folder

    paths, ids, _, labels, names, _ = list_folder(loc, fs, root, classes, limit)
    shown = str(loc)
    folder_classes(names, shown)
    meta = {}
    images = _stack(folder_decoder(fs, paths, ids, shown, size), len(ids), size, shown, ids, meta)
    table = ImageTable(images, ids, labels, list(names), shown, meta)
    table.meta["files"] = list(ids)
    return table


def folder_classes(names, shown: str) -> list:
    """The class names of a folder pool; one line when it has none (nothing to train on)."""
    if names is None:
        raise CoregError(f"{shown}: no class sub-folders (an image lies directly in the "
                         "folder) and no classes.json: pass class names, or put each image in "
                         "a sub-folder named after its class")
    return list(names)


def folder_decoder(fs, paths, ids, shown: str, size: int | None):
    """decode(i) -> (HxWx3 uint8 array, (h, w) as stored) of image file `paths[i]` (id
    `ids[i]`, its path relative to the folder), read when it is decoded; one line naming the
    file when it cannot be read or decoded. Shared by the whole-folder loader and the sharded
    reader (`coreg_ray.data.shards.FolderRows`)."""
    from PIL import UnidentifiedImageError

    from coreg_ray.data.pixels import open_image

    def decode(i):
        rel, data = ids[i], b""
        try:
            with fs.open_input_stream(paths[i]) as f:
                data = f.read()
            with open_image(io.BytesIO(data)) as im:
                im.load()
                return _to_rgb_array(im, size), (im.size[1], im.size[0])
        except Exception as exc:
            why = "empty file (0 bytes)" if isinstance(exc, UnidentifiedImageError) and \
                not data else f"{type(exc).__name__}: {exc}".replace(f" {_bio(exc)}", "")
            raise CoregError(f"{shown}/{rel}: cannot be decoded ({why}); move it out of "
                             "the folder (annotate and predict keep such files as error rows)") from None

    return decode


def _bio(exc) -> str:
    """The '<_io.BytesIO object at 0x...>' PIL puts in its messages (never the same twice)."""
    import re
    m = re.search(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", str(exc))
    return m.group(0) if m else "\0"


def _load_torchvision(spec: str, size, limit) -> ImageTable:
    parts = spec.split(":")
    usage = "use torchvision:NAME:ROOT[:test] with a torchvision dataset class such as CIFAR10"
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise CoregError(f"{spec}: {usage}")
    name, root = parts[1], ":".join(parts[2:])
    train = True
    if len(parts) > 3 and parts[-1] in ("test", "train"):
        root, train = ":".join(parts[2:-1]), parts[-1] == "train"
    import torchvision.datasets as tvd
    from torch.utils.data import Dataset

    cls = getattr(tvd, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise CoregError(f"{spec}: torchvision has no dataset '{name}' ({usage})")
    if name in ("ImageFolder", "DatasetFolder"):
        raise CoregError(f"{spec}: for a folder of class sub-folders pass the folder itself "
                         f"(--images {root})")
    if not Path(root).is_dir():
        raise CoregError(f"{spec}: root folder {root} not found")
    try:
        try:
            ds = cls(root, train=train, download=False)
        except TypeError:
            ds = cls(root, split="train" if train else "test", download=False)
    except TypeError:
        raise CoregError(f"{spec}: torchvision.datasets.{name} takes neither train= nor split=: "
                         "write it as a .parquet table or a folder instead") from None
    except Exception as exc:  # RuntimeError "Dataset not found", FileNotFoundError, ...
        first = " ".join(str(exc).split())[:200]
        raise CoregError(f"{spec}: not found on disk under {root} (downloads are off): {first}") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise CoregError(f"{spec}: the dataset is empty")
    items = [ds[i] for i in range(n)]
    labels = [int(y) for _, y in items]

    def decode(i):
        img = items[i][0]
        return _to_rgb_array(img, size), (img.size[1], img.size[0])

    meta = {}
    images = _stack(decode, n, size, spec, np.arange(n), meta)
    classes = list(getattr(ds, "classes", None) or [str(i) for i in range(max(labels) + 1)])
    return ImageTable(images, np.arange(n, dtype=np.int64), np.asarray(labels, np.int64),
                      [str(c) for c in classes], spec, meta)


# ----------------------------------------------------------------------------- classes
def classes_differ(a, b) -> bool:
    """Two class lists that are not the same classes: other counts or other names, always
    compared (a table without names is numbered "0".."C-1", which are also the names of the
    digits: a model of digits is not one of CIFAR-10's ten classes)."""
    return [str(c) for c in a] != [str(c) for c in b]


def describe_classes(names, show: int = 4) -> str:
    names = list(names)
    head = ", ".join(names[:show]) + (", ..." if len(names) > show else "")
    return f"{len(names)} classes: {head}"
