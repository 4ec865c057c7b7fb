"""The device data of a Co-Reg run: the run's inputs checked against each other (device,
annotations vs images, test table vs training table, few-shot), fingerprinted for resume, and
moved to the training device once as uint8 (`TrainingData`, `prepare_training_data`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.config import Config
from coreg_ray.data.annotations import AnnotationTable, check_candidates
from coreg_ray.data.augment import DeviceAugment, channel_stats
from coreg_ray.data.noise import apply_few_shot, few_shot_indices
from coreg_ray.data.tables import ImageTable, classes_differ, describe_classes
from coreg_ray.errors import CoregError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CoregError(f"train.device={name} but no CUDA device is available")
    return dev


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def grayscale_view(cfg: Config, images: torch.Tensor) -> bool:
    """`data.strong_view`: the reference's grayscale strong view for gray data (auto: every
    image has R = G = B), its RandAugment view otherwise."""
    if cfg.data.strong_view != "auto":
        return cfg.data.strong_view == "grayscale"
    return bool(images.shape[1] == 3 and (images[:, 0] == images[:, 1]).all()
                and (images[:, 1] == images[:, 2]).all())


@dataclass
class TrainingData:
    """Everything a trainer needs from the tables, already on the training device."""
    device: torch.device
    bf16: bool
    channels_last: bool
    images: torch.Tensor  # uint8 [N, 3, S, S] on the device
    candidates: torch.Tensor  # float [N, C] 0/1 (few-shot rows = their true label)
    trusted: torch.Tensor  # bool [N]: few-shot samples
    trusted_index: np.ndarray
    labels: torch.Tensor | None  # long [N] when the table has truth (metrics only)
    test: tuple | None  # (uint8 images, long labels) on the device
    soft_targets: torch.Tensor | None  # float [N, C]: the annotator's mean template probabilities
    aug: DeviceAugment
    mean: list
    std: list
    classes: list
    num_classes: int
    n: int
    image_size: int

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def cl(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class CheckedInputs:
    """What `check_training_inputs` found: the training device, the candidate matrix and soft
    targets aligned to the training ids (before few-shot), the few-shot rows, the working image
    size and the data fingerprint a checkpoint is tied to."""
    device: torch.device
    candidates: np.ndarray
    probs: np.ndarray | None
    trusted_index: np.ndarray
    size: int
    fingerprint: dict


def data_fingerprint(train: ImageTable, candidates: np.ndarray, size: int) -> dict:
    """What a checkpoint was made on: row count, ids, image content, working size, classes and
    candidate sets (hashes, so the checkpoint stays small). Resume compares it field by field."""
    import hashlib

    def sha(a) -> str:
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
        return hashlib.sha1(a.view(np.uint8).reshape(-1).data).hexdigest()[:16]

    from coreg_ray.data.ids import ids_digest

    # ids_digest: int64 ids hash their bytes as before (old checkpoints still match); string
    # ids (file names) their UTF-8 text
    images = getattr(train, "images", None)  # a table's columns only (the driver): no images
    return {"rows": int(len(train)), "ids": ids_digest(train.ids)[:16],
            "images": None if images is None else sha(images), "image_size": int(size),
            "classes": list(train.classes),
            "candidates": None if candidates is None else sha(np.asarray(candidates, bool))}


def check_training_inputs(cfg: Config, train: ImageTable, annotations,
                          test: ImageTable | None, trusted_index=None) -> CheckedInputs:
    """Everything about a run's inputs that can be checked without training: the device, the
    annotations against the images, the test table against the training table, few-shot.
    `train` calls it before it writes anything; `prepare_training_data` starts with it."""
    device = resolve_device(cfg.train.device)
    prec = cfg.train.precision
    if prec not in ("auto", "bf16", "fp32"):
        raise CoregError(f"train.precision must be auto, bf16 or fp32, got {prec}")
    probs = None
    if isinstance(annotations, AnnotationTable):
        ann = annotations.align_to(train.ids, "annotations")
        cand, probs = ann.candidates, ann.probs
    elif hasattr(annotations, "read"):  # a sharded run's driver: `AnnotationRows`, checked by
        cand = None  # its ids; each worker reads (and checks) its own rows' candidate sets
        if annotations.num_classes != train.num_classes:
            raise CoregError(f"annotations have {annotations.num_classes} classes, images "
                             f"{train.num_classes} ({', '.join(train.classes[:5])}...)")
    else:
        cand = np.asarray(annotations, bool)
        if cand.ndim != 2 or cand.shape[0] != len(train):
            raise CoregError(f"candidates have {cand.shape[0]} rows, images {len(train)}")
    if cand is not None and cand.shape[1] != train.num_classes:
        raise CoregError(f"annotations have {cand.shape[1]} classes, images "
                         f"{train.num_classes} ({', '.join(train.classes[:5])}...)")
    if cand is not None:
        check_candidates(cand, train.ids, "annotations")
    if trusted_index is None:  # a shard gets the table's few-shot rows (`Shard.trusted`)
        trusted_index = few_shot_indices(train.labels, cfg.fewshot.shots, cfg.fewshot.seed)
    if test is not None:
        name = f"test table {test.source}" if test.source else "test table"
        if test.num_classes != train.num_classes:
            raise CoregError(f"{name} has {test.num_classes} classes, the training table "
                             f"{train.num_classes}: test on a table of the same classes")
        if classes_differ(train.classes, test.classes):
            raise CoregError(f"{name} has other class names than the training table "
                             f"({describe_classes(test.classes)} vs "
                             f"{describe_classes(train.classes)})")
        if test.labels is None:
            raise CoregError("test table has no labels: nothing to measure accuracy against")
    size = cfg.data.image_size or train.image_size
    return CheckedInputs(device, cand, probs, trusted_index, size,
                         data_fingerprint(train, cand, size))


def prepare_training_data(cfg: Config, train: ImageTable, annotations,
                          test: ImageTable | None, comm=None, shard=None) -> TrainingData:
    """Check the tables against each other and move them to the device (one copy, uint8).
    With a `shard` (`coreg_ray.data.shards.Shard`), `train`, `annotations` and `test` are this
    rank's rows only; the few statistics over the whole table (channel mean/std, whether every
    image is gray) are all-reduced over `comm`, so every rank normalises alike."""
    checked = check_training_inputs(cfg, train, annotations, test,
                                    None if shard is None else shard.trusted_local())
    device, cand, probs, size = checked.device, checked.candidates, checked.probs, checked.size
    prec = cfg.train.precision
    bf16 = (prec == "bf16") or (prec == "auto" and device.type == "cuda")
    channels_last = cfg.train.channels_last and device.type == "cuda"
    if device.type == "cuda":
        # batch shapes repeat every step (equal P/U batches), so autotuned kernels pay off
        torch.backends.cudnn.benchmark = True
    trusted_index = checked.trusted_index
    cand, trusted = apply_few_shot(cand, train.labels, trusted_index) \
        if len(trusted_index) else (cand, np.zeros(len(cand), bool))
    images = resize_images(train.images, size)
    if shard is None:
        mean, std, gray = (*channel_stats(images), grayscale_view(cfg, images))
    else:
        mean, std, gray = _shared_stats(cfg, images, comm, device)
    test_images = resize_images(test.images, size) if test is not None else None
    where = placement(cfg, device, images, test_images, shard)
    test_dev = None
    if test is not None:
        test_dev = (test_images.to(device) if where == "device" else test_images,
                    torch.as_tensor(test.labels, device=device))
    soft = None
    if probs is not None:
        soft = torch.as_tensor(np.asarray(probs), dtype=torch.float32, device=device)
        if len(trusted_index):
            soft[torch.as_tensor(trusted_index, device=device)] = torch.as_tensor(
                cand[trusted_index], dtype=torch.float32, device=device)
    data = TrainingData(
        device=device, bf16=bf16, channels_last=channels_last,
        images=images.to(device) if where == "device" else images,
        candidates=torch.as_tensor(cand, dtype=torch.float32, device=device),
        trusted=torch.as_tensor(trusted, device=device), trusted_index=trusted_index,
        labels=None if train.labels is None else torch.as_tensor(train.labels, device=device),
        test=test_dev, soft_targets=soft,
        aug=DeviceAugment(mean, std, size, cfg.data.crop_padding, cfg.data.strong_ops, device,
                          cfg.train.seed, cfg.data.hflip, gray),
        mean=mean, std=std, classes=list(train.classes), num_classes=train.num_classes,
        n=len(train), image_size=size)
    data.fingerprint = checked.fingerprint  # what a checkpoint of this run is tied to
    data.shard = shard
    if shard is not None:  # the whole table's (the driver's, from its columns) and this rank's
        data.fingerprint, data.shard_fingerprint = shard.fingerprint, checked.fingerprint
    data.placement = where
    if where == "host" and device.type == "cuda":  # batches gathered by index and copied
        data.images = images.pin_memory()
    return data


def _shared_stats(cfg: Config, images: torch.Tensor, comm, device):
    """channel_stats and grayscale_view over every rank's images: float64 sums all-reduced."""
    s = torch.zeros(7, dtype=torch.float64)
    for chunk in images.split(8192):  # as channel_stats
        x = chunk.double() / 255.0
        s[:3] += x.sum((0, 2, 3))
        s[3:6] += (x * x).sum((0, 2, 3))
        s[6] += x.shape[0] * x.shape[2] * x.shape[3]
    gray = torch.tensor([1 if grayscale_view(cfg, images) else 0])
    s = comm.all_reduce_sum(s.to(device)).cpu()  # on the device: NCCL reduces nothing else
    gray = comm.all_reduce_min(gray.to(device)).cpu()
    n = int(s[6].item())
    mean = s[:3] / n
    std = (s[3:6] / n - mean * mean).clamp_min(1e-8).sqrt()
    return mean.float().tolist(), std.clamp_min(1e-3).float().tolist(), bool(gray.item())


def placement(cfg: Config, device: torch.device, images: torch.Tensor,
              test_images: torch.Tensor | None, shard) -> str:
    """`data.placement`: device (the images live on the training device), host (in host
    memory, pinned on CUDA; each batch gathered by index and copied) or auto: device when
    this rank's images fit in half the device's free memory, host otherwise."""
    want = getattr(cfg.data, "placement", "auto")
    if want != "auto" or device.type != "cuda":
        return "device" if want == "auto" else want
    free, _ = torch.cuda.mem_get_info(device)
    need = images.numel() + (test_images.numel() if test_images is not None else 0)
    return "device" if need < 0.5 * free else "host"
