"""Co-Reg: two co-trained networks on noisy candidate label sets (plain PyTorch, no Ray).

Read `fit` top to bottom: warm-up epochs, then each epoch: divide (per net: aligned division
loss -> 5-epoch average -> GMM -> P/U), then one pass in which both networks train on the same
batches, each with the split and pseudo-labels built from its peer (co-divide, co-pseudo-labels).

Bookkeeping follows the authors' code (Portugas0807/Co-Reg, train.py/model.py), pinned by
tests/test_reference_bookkeeping.py: each net warms up on its own shuffled pass (last partial
batch kept) and fills a per-sample prediction table, which distribution alignment divides by
(chunk by chunk, as their eval pass does); in a Co-Reg step the trained net sees each weak view
in its own train-mode forward, then the mixed batch, then the unmixed strong views of the
contrastive branch, which runs (key update, queue) from the first post-warm-up epoch on while
its loss waits `coreg.feature_delay` epochs; prototypes follow P's weak features from then on.

The whole training set lives on the device as uint8; views are made there (`DeviceAugment`).
Every random draw is re-seeded per (seed, rank, epoch), so a resumed run replays exactly the
epochs a killed run would have run, and N workers draw independent but reproducible views.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.config import Config
from coreg_ray.coreg.comm import LocalComm
from coreg_ray.coreg.labels import (candidate_agreement, classwise_minmax, co_pseudo_labels,
                                    distribution_alignment,
                                    gmm_clean_probability, minmax_normalize, mixup,
                                    update_prototypes)
from coreg_ray.coreg.losses import (consistency_loss, contrastive_masks, division_loss,
                                    noisy_contrastive_loss, prototype_alignment_loss,
                                    uniform_prior_penalty, warmup_loss)
from coreg_ray.coreg.models import build_model
from coreg_ray.data.annotations import AnnotationTable, check_candidates
from coreg_ray.data.augment import DeviceAugment, channel_stats
from coreg_ray.data.noise import apply_few_shot, few_shot_indices
from coreg_ray.data.tables import ImageTable, classes_differ, describe_classes
from coreg_ray.errors import CoregError
from coreg_ray import safeload

CHECKPOINT = "checkpoint.pt"


# Per-epoch loss terms of a Co-Reg epoch (summed per step, reported as means).
LOSS_TERMS = ("loss", "loss_x", "loss_u", "loss_prot", "loss_cont", "loss_cand")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CoregError(f"train.device={name} but no CUDA device is available")
    return dev


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def set_lr(opts, lr: float) -> None:
    """The epoch's learning rate on every group (times the group's `lr_scale`, if it has one)."""
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def make_sgd(params, t) -> torch.optim.SGD:
    """The paper's SGD (torch's multi-tensor implementation on CUDA). Not `fused=True`: in
    torch 2.11 the fused kernel fails on parameters without a gradient in a step (the projector
    during warm-up)."""
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def compile_nets(nets) -> None:
    """`Module.compile()` in place: state_dict keys stay the same (checkpoints are unchanged).
    The step calls the nets in a few (batch size, train/eval, grad/no-grad) combinations, each a
    graph; raise dynamo's per-function cache so none of them falls back to eager."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for net in nets:
        net.compile()


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

    return {"rows": int(len(train)), "ids": sha(train.ids.astype(np.int64)),
            "images": sha(train.images), "image_size": int(size),
            "classes": list(train.classes), "candidates": sha(np.asarray(candidates, bool))}


def check_training_inputs(cfg: Config, train: ImageTable, annotations,
                          test: ImageTable | None) -> CheckedInputs:
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
    else:
        cand = np.asarray(annotations, bool)
        if cand.ndim != 2 or cand.shape[0] != len(train):
            raise CoregError(f"candidates have {cand.shape[0]} rows, images {len(train)}")
    if cand.shape[1] != train.num_classes:
        raise CoregError(f"annotations have {cand.shape[1]} classes, images "
                         f"{train.num_classes} ({', '.join(train.classes[:5])}...)")
    check_candidates(cand, train.ids, "annotations")
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
                          test: ImageTable | None) -> TrainingData:
    """Check the tables against each other and move them to the device (one copy, uint8)."""
    checked = check_training_inputs(cfg, train, annotations, test)
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
    mean, std = channel_stats(images)
    test_dev = None
    if test is not None:
        test_dev = (resize_images(test.images, size).to(device),
                    torch.as_tensor(test.labels, device=device))
    soft = None
    if probs is not None:
        soft = torch.as_tensor(np.asarray(probs), dtype=torch.float32, device=device)
        if len(trusted_index):
            soft[torch.as_tensor(trusted_index, device=device)] = torch.as_tensor(
                cand[trusted_index], dtype=torch.float32, device=device)
    data = TrainingData(
        device=device, bf16=bf16, channels_last=channels_last, images=images.to(device),
        candidates=torch.as_tensor(cand, dtype=torch.float32, device=device),
        trusted=torch.as_tensor(trusted, device=device), trusted_index=trusted_index,
        labels=None if train.labels is None else torch.as_tensor(train.labels, device=device),
        test=test_dev, soft_targets=soft,
        aug=DeviceAugment(mean, std, size, cfg.data.crop_padding, cfg.data.strong_ops, device,
                          cfg.train.seed, cfg.data.hflip, grayscale_view(cfg, images)),
        mean=mean, std=std, classes=list(train.classes), num_classes=train.num_classes,
        n=len(train), image_size=size)
    data.fingerprint = checked.fingerprint  # what a checkpoint of this run is tied to
    return data


# Keys every Co-Reg checkpoint has had; a file without them is truncated or something else.
CHECKPOINT_KEYS = ("epoch", "config", "nets", "key_nets", "opts", "history")


def read_checkpoint(path) -> dict:
    """A checkpoint file, read safely (`safeload`, weights only) and checked in outline: one
    line for a truncated, foreign or incomplete file."""
    state = safeload.load_state(path, "cpu", "checkpoint")
    check_checkpoint(state, str(path))
    return state


def check_checkpoint(state, where: str, fingerprint: dict | None = None,
                     cfg: Config | None = None) -> None:
    """One line if `state` is not a complete Co-Reg checkpoint, was made with another model
    (`cfg`'s model section) or on other data (`fingerprint` of this run's tables, see
    `data_fingerprint`; checkpoints from before fingerprints are not compared)."""
    if not isinstance(state, dict):
        raise CoregError(f"{where}: not a coreg-ray checkpoint (holds a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["epoch"], int) or not isinstance(state["nets"], (list, tuple)) \
            or len(state["nets"]) != 2 or not isinstance(state["config"], dict):
        what = f"missing {', '.join(missing)}" if missing else "malformed"
        raise CoregError(f"{where}: not a complete coreg-ray checkpoint ({what}): truncated or "
                         "from another program; train into a new --output (or without --resume)")
    if cfg is not None:
        made = state["config"].get("model") or {}
        now = cfg.to_dict()["model"]
        diff = [f"model.{k}={made[k]} (this run: {now[k]})" for k in now
                if k in made and made[k] != now[k]]
        if diff:
            raise CoregError(f"{where} was made with {', '.join(diff)}: resume with the run's own "
                             "config (no --config, no --set model.*), or train into a new --output")
    made = state.get("data")
    if fingerprint is not None and isinstance(made, dict):
        diffs = []
        if made.get("rows") != fingerprint["rows"]:
            diffs.append(f"{made.get('rows')} rows, this run {fingerprint['rows']}")
        if made.get("image_size") != fingerprint["image_size"]:
            o, n = made.get("image_size"), fingerprint["image_size"]
            diffs.append(f"{o}x{o} images, this run {n}x{n}")
        if made.get("classes") != fingerprint["classes"]:
            diffs.append(f"{describe_classes(made.get('classes') or [])}, this run "
                         f"{describe_classes(fingerprint['classes'])}")
        if not diffs:
            diffs += [f"other {what}" for key, what in (("ids", "image ids"),
                                                          ("images", "images"),
                                                          ("candidates", "candidate sets"))
                      if made.get(key) != fingerprint[key]]
        if diffs:
            raise CoregError(f"{where} was made on other data ({'; '.join(diffs)}): resume with "
                             "the inputs it was made on, or train into a new --output")


@dataclass
class MoCoQueue:
    feats: torch.Tensor  # [Q, d]
    labels: torch.Tensor  # [Q] long, -1 = empty slot
    is_p: torch.Tensor  # [Q] bool
    ptr: int = 0

    @classmethod
    def empty(cls, size, dim, device):
        return cls(torch.zeros(size, dim, device=device), torch.full((size,), -1, device=device,
                   dtype=torch.long), torch.zeros(size, dtype=torch.bool, device=device))

    def push(self, feats, labels, is_p):
        n = feats.shape[0]
        idx = (self.ptr + torch.arange(n, device=feats.device)) % self.feats.shape[0]
        self.feats[idx] = feats.float()
        self.labels[idx] = labels
        self.is_p[idx] = is_p
        self.ptr = (self.ptr + n) % self.feats.shape[0]

    def state(self):
        return {"feats": self.feats, "labels": self.labels, "is_p": self.is_p, "ptr": self.ptr}


class CoReg:
    """`CoReg(config).fit(train_table, annotations, test_table, output_dir)` -> final metrics."""

    def __init__(self, config: Config | None = None, comm=None, callbacks=(), progress=True):
        self.cfg = config or Config()
        self.comm = comm or LocalComm()
        self.callbacks = list(callbacks)
        self.progress = progress and self.comm.rank == 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------ set-up
    def _prepare(self, train: ImageTable, annotations, test: ImageTable | None):
        cfg = self.cfg
        data = prepare_training_data(cfg, train, annotations, test)
        self.data = data
        for name in ("device", "bf16", "channels_last", "images", "candidates", "trusted",
                     "trusted_index", "labels", "test", "aug", "mean", "std", "classes",
                     "num_classes", "n", "image_size"):
            setattr(self, name, getattr(data, name))
        dev = self.device
        # Models: same seed on every rank, so DDP replicas start identical.
        torch.manual_seed(cfg.train.seed)
        self.raw_nets = [self._new_net() for _ in range(2)]
        self.key_nets = [copy.deepcopy(n).requires_grad_(False) for n in self.raw_nets]
        if cfg.train.compile:
            compile_nets(self.raw_nets + self.key_nets)
        self.nets = [self.comm.wrap(n) for n in self.raw_nets]
        self.opts = [make_sgd(n.parameters(), cfg.train) for n in self.raw_nets]
        self.prototypes = torch.zeros(self.num_classes, cfg.model.proj_dim, device=dev)
        self.queues = [MoCoQueue.empty(cfg.coreg.queue_size, cfg.model.proj_dim, dev)
                       for _ in range(2)]
        self.div_history: list[list[torch.Tensor]] = [[], []]
        # each net's per-sample prediction table (distribution alignment divides by its mean)
        self.pred_table = [torch.full((self.n, self.num_classes), 1.0 / self.num_classes,
                                      device=dev) for _ in range(2)]
        self.split_w = [torch.ones(self.n, device=dev) for _ in range(2)]
        # each net's distribution-aligned weak-view prediction from its last divide pass
        self.scores = [torch.full((self.n, self.num_classes), 1.0 / self.num_classes, device=dev)
                       for _ in range(2)]
        self.start_epoch = 0
        self.elapsed = 0.0

    def _new_net(self):
        net = build_model(self.cfg.model.backbone, self.num_classes, self.image_size,
                          self.cfg.model.proj_dim).to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _cl(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------------ the loop
    def fit(self, train: ImageTable, annotations, test: ImageTable | None = None,
            output_dir: str | os.PathLike | None = None, resume: bool | dict = False) -> dict:
        """resume: True continues from OUTPUT/checkpoint.pt if there is one; a dict is a
        checkpoint already read with `read_checkpoint`. Either is checked against this run's
        model and data first (one line if it was made for others)."""
        cfg = self.cfg
        if cfg.train.warmup_epochs > cfg.train.epochs:
            raise CoregError(f"train.warmup_epochs ({cfg.train.warmup_epochs}) > train.epochs "
                             f"({cfg.train.epochs})")
        self._prepare(train, annotations, test)
        self.output_dir = Path(output_dir) if output_dir else None
        if self.output_dir and self.comm.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(resume, dict):  # a checkpoint the caller already read (read_checkpoint)
            self.load_state(resume, str(self.output_dir / CHECKPOINT) if self.output_dir
                            else "checkpoint")
        elif resume and self.output_dir and (self.output_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.output_dir / CHECKPOINT)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.epochs, initial=self.start_epoch, unit="epoch",
                       dynamic_ncols=True, desc="co-reg")
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            lr = cosine_lr(epoch, cfg.train.epochs, cfg.train.lr, cfg.train.lr_min)
            set_lr(self.opts, lr)
            if epoch < cfg.train.warmup_epochs:
                stats = self.warmup_epoch(epoch)
            else:
                stats = self.divide(epoch)
                stats.update(self.coreg_epoch(epoch))
            last = epoch == cfg.train.epochs - 1
            if self.test is not None and (last or (epoch + 1) % cfg.train.eval_every == 0):
                stats["test_accuracy"] = self.accuracy(*self.test)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stats.update(epoch=epoch, lr=lr, epoch_seconds=time.perf_counter() - t0)
            self.elapsed += stats["epoch_seconds"]
            self.history.append(stats)
            if self.output_dir and (last or (epoch + 1) % cfg.train.checkpoint_every == 0):
                self.save_checkpoint(self.output_dir / CHECKPOINT, epoch)
            for cb in self.callbacks:
                cb(epoch, stats, self)
            if bar is not None:
                show = {k: stats[k] for k in ("loss", "test_accuracy", "p_fraction") if k in stats}
                bar.set_postfix({k: f"{v:.3f}" for k, v in show.items()})
                bar.update(1)
        if bar is not None:
            bar.close()
        final = dict(self.history[-1]) if self.history else {}
        final["seconds"] = self.elapsed
        return final

    # ------------------------------------------------------------------------ batches
    def _shard(self, epoch: int, batch: int, stream: int = 0, keep_last: bool = False):
        """This rank's batches of one epoch: a permutation shared by all ranks (seeded by epoch
        and `stream`), dealt round-robin. `batch` is the global batch: each of W ranks takes
        batch // W, and every rank gets the same number of batches of the same sizes (the
        permutation's last n mod W samples sit out this epoch), so DDP's collectives match.
        `keep_last` keeps the last partial batch (the reference's warm-up loader does)."""
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch + 7_777 * stream)
        perm = torch.randperm(self.n, generator=g)
        w = self.comm.world_size
        mine = perm[:(self.n // w) * w][self.comm.rank::w].to(self.device)
        batch = min(max(1, batch // w), len(mine))
        steps = -(-len(mine) // batch) if keep_last else max(1, len(mine) // batch)
        return [mine[i * batch:(i + 1) * batch] for i in range(steps)]

    def _reseed(self, epoch: int):
        seed = (self.cfg.train.seed * 1_000_003 + epoch) * 1009 + self.comm.rank
        self.aug.gen.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def warmup_epoch(self, epoch: int) -> dict:
        """Partial CE + negative entropy on strong views. As in the reference, each net makes
        its own shuffled pass over the whole set (the last partial batch kept), and its
        predictions fill its distribution-alignment table."""
        self._reseed(epoch)
        total = torch.zeros((), device=self.device)
        steps = 0
        for k, (net, opt) in enumerate(zip(self.nets, self.opts)):
            net.train()
            for idx in self._shard(epoch, self.cfg.train.warmup_batch_size, stream=k,
                                   keep_last=True):
                with self._autocast():
                    logits = net(self._cl(self.aug.strong(self.images[idx])))
                logits = logits.float()
                loss = warmup_loss(logits, self.candidates[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    self._record_predictions(k, idx, F.softmax(logits, 1))
                total += loss.detach()
                steps += 1
        loss = self.comm.all_reduce_sum(total).item() / (steps * self.comm.world_size)
        return {"phase": "warmup", "loss": loss, "loss_warmup": loss}

    def _record_predictions(self, k: int, idx: torch.Tensor, probs: torch.Tensor) -> None:
        """Net k's per-sample prediction table for distribution alignment (the reference's
        `pseudo_distribution`): rows of `idx` <- `probs`, gathered over ranks."""
        if not self.cfg.coreg.distribution_alignment:
            return
        self.pred_table[k][self.comm.all_gather(idx)] = self.comm.all_gather(probs.float())

    @torch.no_grad()
    def _predict_all(self, net, images, weak: bool) -> torch.Tensor:
        """Softmax (weak view) or logits (plain view) for every image, computed in large no-grad
        batches, sharded over ranks and gathered."""
        self.comm.sync_buffers(net)  # one model: rank 0's BatchNorm statistics on every rank
        net.eval()
        n, world = len(images), self.comm.world_size
        per = -(-n // world)
        mine = (torch.arange(per * world, device=self.device) % n)[self.comm.rank * per:(self.comm.rank + 1) * per]
        outs = []
        for chunk in mine.split(self.cfg.train.eval_batch_size):
            x = images[chunk]
            x = self.aug.weak(x) if weak else self.aug.plain(x)
            with self._autocast():
                logits = net(self._cl(x)).float()
            outs.append(F.softmax(logits, 1) if weak else logits)
        return self.comm.all_gather(torch.cat(outs))[:n]

    def accuracy(self, images, labels) -> float:
        logits = sum(self._predict_all(n, images, weak=False) for n in self.raw_nets)
        return (logits.argmax(1) == labels).float().mean().item()

    def divide(self, epoch: int) -> dict:
        """Per network: aligned division loss on weak views, min-max normalised, averaged over
        the last `division_history` epochs, split by a 2-component GMM."""
        c = self.cfg.coreg
        self._reseed(epoch)
        stats = {"phase": "coreg"}
        for k, net in enumerate(self.raw_nets):
            probs = self._predict_all(net, self.images, weak=True)
            if c.distribution_alignment:
                probs = self._align(k, probs)
            self.scores[k] = probs
            loss = division_loss(probs, self.candidates)
            if c.class_balanced_split:
                pseudo = (probs * self.candidates).argmax(1)
                loss = classwise_minmax(loss, pseudo, self.num_classes)
            loss = minmax_normalize(loss).cpu()
            hist = self.div_history[k]
            hist.append(loss)
            del hist[:-c.division_history]
            avg = torch.stack(hist).mean(0).numpy()
            w = gmm_clean_probability(avg, c.gmm_max_iter, c.gmm_tol, c.gmm_reg_covar,
                                      seed=self.cfg.train.seed)
            w = torch.as_tensor(w, dtype=torch.float32, device=self.device)
            self.split_w[k] = torch.where(self.trusted, torch.ones_like(w), w)
            is_p = self.split_w[k] > c.p_threshold
            stats[f"p_fraction_net{k + 1}"] = is_p.float().mean().item()
            if self.labels is not None:
                truth_in = self.candidates[torch.arange(self.n, device=self.device), self.labels] > 0
                stats[f"p_precision_net{k + 1}"] = (truth_in[is_p].float().mean().item()
                                                    if is_p.any() else float("nan"))
        stats["p_fraction"] = 0.5 * (stats["p_fraction_net1"] + stats["p_fraction_net2"])
        return stats

    def _align(self, k: int, probs: torch.Tensor) -> torch.Tensor:
        """Distribution alignment as the reference runs it: chunk by chunk in index order, each
        chunk first written into net k's prediction table, then divided by the table's mean
        (rows not yet reached this pass still hold their last prediction, from the previous
        divide pass or the warm-up)."""
        table, out = self.pred_table[k], torch.empty_like(probs)
        for chunk in torch.arange(self.n, device=self.device).split(self.cfg.train.eval_batch_size):
            table[chunk] = probs[chunk]
            out[chunk] = distribution_alignment(probs[chunk], table.mean(0))
        return out

    def coreg_epoch(self, epoch: int) -> dict:
        """Train net 1 on net 2's split and scores, then net 2 on net 1's (co-divide)."""
        c = self.cfg.coreg
        # Key encoders restart from their query nets at each post-warm-up epoch.
        for key, raw in zip(self.key_nets, self.raw_nets):
            key.load_state_dict(raw.state_dict())
        totals = None
        for a in range(2):
            self._reseed(epoch * 2 + a + 7919)
            peer = 1 - a if c.co_pseudo_labels else a
            part = self.train_net(epoch, a, peer)
            self.comm.sync_buffers(self.raw_nets[a])  # net a is the peer (eval mode) next
            totals = part if totals is None else {k: totals[k] + part[k] for k in totals}
        vals = self.comm.all_reduce_sum(torch.stack(list(totals.values()))).tolist()
        tot = dict(zip(totals.keys(), vals))
        steps = max(tot.pop("steps"), 1.0)
        out = {k: tot[k] / steps for k in LOSS_TERMS}
        if self.labels is not None:
            out["pseudo_accuracy_p"] = tot["p_correct"] / max(tot["p_count"], 1.0)
            out["pseudo_accuracy_u"] = tot["u_correct"] / max(tot["u_count"], 1.0)
        return out

    def _split_batches(self, epoch: int, a: int, is_p: torch.Tensor):
        """Index batches of P and of U for one net's epoch: as many steps as P fills full
        batches on this rank; U is cycled to give every step a U batch of the same size.
        Global batch, equal shares: every rank gets the same number of equal-sized batches
        (the split is the same on all ranks), which DDP and the all_gathers need."""
        r, w = self.comm.rank, self.comm.world_size
        bs = max(1, self.cfg.train.batch_size // w)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch * 2 + a)
        p_idx = torch.nonzero(is_p.cpu()).view(-1)  # one host sync per epoch
        u_idx = torch.nonzero(~is_p.cpu()).view(-1)
        p_idx = p_idx[torch.randperm(len(p_idx), generator=g)]
        u_idx = u_idx[torch.randperm(len(u_idx), generator=g)]
        p_mine = p_idx[:(len(p_idx) // w) * w][r::w].to(self.device)
        u_mine = u_idx[:(len(u_idx) // w) * w][r::w].to(self.device)
        if len(p_mine) == 0:
            return []
        bs = min(bs, len(p_mine))
        steps = len(p_mine) // bs
        batches = []
        for i in range(steps):
            ix = p_mine[i * bs:(i + 1) * bs]
            iu = u_mine[(i * bs + torch.arange(bs, device=self.device)) % len(u_mine)] \
                if len(u_mine) and self.cfg.coreg.use_unlabeled else None
            batches.append((ix, iu))
        return batches

    def train_net(self, epoch: int, a: int, peer: int) -> dict:
        cfg, c = self.cfg, self.cfg.coreg
        warm = cfg.train.warmup_epochs
        use_proto = c.prototypes and epoch > warm + c.feature_delay
        use_cont = c.contrastive and epoch > warm + c.feature_delay
        net, raw, key, opt = self.nets[a], self.raw_nets[a], self.key_nets[a], self.opts[a]
        w_all = self.split_w[peer]
        batches = self._split_batches(epoch, a, w_all > c.p_threshold)
        dev = self.device
        acc = {k: torch.zeros((), device=dev) for k in
               LOSS_TERMS + ("p_correct", "p_count", "u_correct", "u_count", "steps")}
        net.train()
        key.train()
        self.raw_nets[peer].eval() if peer != a else None
        for step, (ix, iu) in enumerate(batches):
            ramp = min(1.0, max(0.0, (epoch - warm + step / len(batches)) / max(c.rampup_epochs, 1)))
            bx = len(ix)
            bu = 0 if iu is None else len(iu)
            x, cand = self.images[ix], self.candidates[ix]
            u = self.images[iu] if bu else x[:0]
            # -- targets: weak views, no grad. As in the reference, the trained net sees each
            #    weak view in its own train-mode forward (x_w1, x_w2, u_w1, u_w2), so its
            #    BatchNorm statistics get four per-view updates per step.
            with torch.no_grad(), self._autocast():
                weak = self.aug.weak(torch.cat([x, x, u, u]))  # per-sample random: 4 views
                views = [v for v in weak.split([bx, bx, bu, bu]) if len(v)]
                outs = [raw(self._cl(v), project=True) for v in views]
                prob_w = F.softmax(torch.cat([o[0] for o in outs]).float(), 1)
                z_xw1 = outs[0][1]
                px_own = 0.5 * (prob_w[:bx] + prob_w[bx:2 * bx])
                w = w_all[ix]
                peer_x = self.scores[peer][ix]
                # With the agreement gate, P rows the nets disagree on get U-style targets (the
                # peer's view of them is its divide-pass prediction); without it all stay P.
                keep_p = (candidate_agreement(peer_x, px_own, cand) if c.agreement_gate
                          else torch.ones_like(w, dtype=torch.bool))
                targets_x = co_pseudo_labels(peer_x, peer_x, px_own, cand, w, keep_p, c.sharpen_T,
                                             c.u_targets_in_candidates)
                if bu:
                    pu_own = 0.5 * (prob_w[2 * bx:2 * bx + bu] + prob_w[2 * bx + bu:])
                    pu_peer = pu_own
                    if peer != a:
                        peer_logits = self.raw_nets[peer](self._cl(weak[2 * bx:])).float()
                        pp = F.softmax(peer_logits, 1)
                        pu_peer = 0.5 * (pp[:bu] + pp[bu:])
                    targets_u = co_pseudo_labels(pu_peer, pu_peer, pu_own, self.candidates[iu],
                                                 torch.zeros(bu, device=dev),
                                                 torch.zeros(bu, dtype=torch.bool, device=dev),
                                                 c.sharpen_T, c.u_targets_in_candidates)
                else:
                    targets_u = targets_x[:0]
            # -- strong views and MixUp over P and U
            inputs = self.aug.strong(torch.cat([x, x, u, u]))  # one batched call for all views
            xs1, xs2, us1, us2 = inputs.split([bx, bx, bu, bu])
            targets = torch.cat([targets_x, targets_x, targets_u, targets_u])
            is_p = torch.cat([keep_p, keep_p,
                              torch.zeros(2 * bu, dtype=torch.bool, device=dev)])
            lam = float(self.rng.beta(c.mixup_alpha, c.mixup_alpha))
            partner = torch.randperm(len(inputs), generator=self.aug.gen, device=dev)
            x_mix, t_mix = mixup(inputs, targets, lam, partner)
            m = len(inputs)
            hard = torch.cat([targets_x, targets_u]).argmax(1)
            q_is_p = torch.cat([is_p[:bx], is_p[2 * bx:2 * bx + bu]])
            # -- forward: the mixed batch, then (the reference's contrastive branch, run every
            #    step once the warm-up is over, also before its loss is switched on) the unmixed
            #    first strong views through the query net and the second through the key net
            anchor = c.candidate_loss_weight > 0
            with self._autocast():
                logits, z = net(self._cl(x_mix), project=True)
            logits, z = logits.float(), z.float()  # losses in fp32 (outside autocast)
            branch = c.contrastive or anchor
            if branch:
                with torch.set_grad_enabled(use_cont or anchor), self._autocast():
                    logits_q, zq = raw(self._cl(torch.cat([xs1, us1])), project=True)
                logits_q, zq = logits_q.float(), zq.float()
            if c.contrastive:
                with torch.no_grad():
                    kp = list(key.parameters())  # momentum update before the keys (reference)
                    torch._foreach_mul_(kp, c.key_momentum)
                    torch._foreach_add_(kp, [p.detach() for p in raw.parameters()],
                                        alpha=1.0 - c.key_momentum)
                    with self._autocast():
                        _, k = key(self._cl(torch.cat([xs2, us2])), project=True)
                    k = k.float()
            # -- losses
            lx, lu = consistency_loss(logits, t_mix, is_p)
            loss = lx + c.lambda_u * ramp * lu
            if c.prior_penalty:
                loss = loss + uniform_prior_penalty(logits)
            lcand = lprot = lcont = torch.zeros((), device=dev)
            if anchor:  # the unmixed first strong views of P and U vs their candidate sets
                cand_u = self.candidates[iu] if bu else cand[:0]
                lcand = warmup_loss(logits_q, torch.cat([cand, cand_u]))
                loss = loss + c.candidate_loss_weight * lcand
            if use_proto:
                lprot = prototype_alignment_loss(z, self.prototypes, t_mix, is_p, c.proto_temp,
                                                 c.lambda_u)
                loss = loss + c.beta1 * lprot
            if use_cont:
                queue = self.queues[a]
                pos, kept = contrastive_masks(hard, q_is_p, queue.labels, queue.is_p,
                                              c.noisy_contrastive)
                lcont = noisy_contrastive_loss(zq, torch.cat([zq, k, queue.feats]), pos, kept,
                                               c.cont_temp)
                loss = loss + c.beta2 * lcont
            # -- step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # -- queue and prototypes: updated every post-warm-up step (reference), whether or
            #    not their loss terms are on yet
            with torch.no_grad():
                if c.contrastive:
                    self.queues[a].push(self.comm.all_gather(k), self.comm.all_gather(hard),
                                        self.comm.all_gather(q_is_p))
                # Prototypes (shared by both nets) follow the weak-view features of P samples.
                self.prototypes = update_prototypes(
                    self.prototypes, self.comm.all_gather(z_xw1.float()),
                    self.comm.all_gather(hard[:bx]), self.comm.all_gather(keep_p),
                    c.proto_gamma)
                acc["loss"] += loss.detach()
                acc["loss_x"] += lx.detach()
                acc["loss_u"] += lu.detach()
                acc["loss_prot"] += lprot.detach()
                acc["loss_cont"] += lcont.detach()
                acc["loss_cand"] += lcand.detach()
                acc["steps"] += 1
                if self.labels is not None:  # gated-out P rows count as U (trained as U)
                    right = hard[:bx] == self.labels[ix]
                    acc["p_correct"] += (right & keep_p).sum()
                    acc["p_count"] += keep_p.sum()
                    acc["u_correct"] += (right & ~keep_p).sum()
                    acc["u_count"] += (~keep_p).sum()
                    if bu:
                        acc["u_correct"] += (hard[bx:] == self.labels[iu]).sum()
                        acc["u_count"] += bu
        return acc

    # ------------------------------------------------------------------------ persistence
    def checkpoint_state(self, epoch: int) -> dict:
        return {
            "epoch": epoch, "config": self.cfg.to_dict(),
            "nets": [n.state_dict() for n in self.raw_nets],
            "key_nets": [n.state_dict() for n in self.key_nets],
            "opts": [o.state_dict() for o in self.opts],
            "prototypes": self.prototypes, "queues": [q.state() for q in self.queues],
            "div_history": self.div_history, "pred_table": self.pred_table,
            "split_w": self.split_w, "scores": self.scores, "history": self.history, "elapsed": self.elapsed,
            "torch_rng": torch.get_rng_state(),
            "data": getattr(self.data, "fingerprint", None),  # what it was made on (resume checks)
        }

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """Atomic: write a temp file, then rename over the old checkpoint."""
        if self.comm.rank != 0:
            return
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint_state(epoch), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path) -> None:
        self.load_state(read_checkpoint(path), str(path))

    def load_state(self, state: dict, where: str = "checkpoint") -> None:
        """Restore a checkpoint after checking it was made for this model and data (one line
        if not, or if its contents do not fit)."""
        check_checkpoint(state, where, getattr(self.data, "fingerprint", None), self.cfg)
        try:
            self._load_state(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise CoregError(f"{where}: its contents do not fit this run ({type(exc).__name__}: "
                             f"{first}); train into a new --output") from None

    def _load_state(self, state: dict) -> None:
        for net, sd in zip(self.raw_nets, state["nets"]):
            net.load_state_dict(sd)
        for net, sd in zip(self.key_nets, state["key_nets"]):
            net.load_state_dict(sd)
        for opt, sd in zip(self.opts, state["opts"]):
            opt.load_state_dict(sd)
        self.prototypes = state["prototypes"].to(self.device)
        for q, s in zip(self.queues, state["queues"]):
            q.feats, q.labels, q.is_p, q.ptr = (s["feats"].to(self.device), s["labels"].to(self.device),
                                               s["is_p"].to(self.device), s["ptr"])
        self.div_history = [[t.cpu() for t in h] for h in state["div_history"]]
        self.pred_table = [t.to(self.device) for t in state["pred_table"]]
        self.split_w = [t.to(self.device) for t in state["split_w"]]
        self.scores = [t.to(self.device) for t in state["scores"]]
        self.history = list(state["history"])
        self.elapsed = state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["epoch"] + 1

    def export(self) -> dict:
        """What `model.pt` holds: enough to predict without the training data."""
        return {"format": "coreg-ray/1", "backbone": self.cfg.model.backbone,
                "num_classes": self.num_classes, "classes": self.classes,
                "image_size": self.image_size, "proj_dim": self.cfg.model.proj_dim,
                "mean": self.mean, "std": self.std,
                "nets": [{k: v.cpu() for k, v in n.state_dict().items()} for n in self.raw_nets]}

    def save_model(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.export(), tmp)
        os.replace(tmp, path)


class Classifier:
    """A trained model (`model.pt`): predicts with the sum of both networks' logits."""

    # what `CoReg.export` writes; a file with the tag but without these is incomplete
    KEYS = ("backbone", "num_classes", "classes", "image_size", "proj_dim", "mean", "std", "nets")

    def __init__(self, state: dict, device="auto", source: str = "model"):
        check_model_state(state, source)
        self.device = check_device(device)
        self.state = state
        self.source = source
        self.classes = list(state["classes"])
        self.image_size = state["image_size"]
        self.nets = []
        try:
            for sd in state["nets"]:
                net = build_model(state["backbone"], state["num_classes"], state["image_size"],
                                  state["proj_dim"]).to(self.device)
                net.load_state_dict(sd)
                self.nets.append(net.eval())
            self.mean = torch.tensor(state["mean"], device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(state["std"], device=self.device).view(1, -1, 1, 1)
        except CoregError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise CoregError(f"{source}: its weights do not fit its {state['backbone']} model "
                             f"({type(exc).__name__}: {first})") from None

    @classmethod
    def load(cls, path, device="auto") -> "Classifier":
        path = Path(path)
        check_device(device)  # a bad --device is one line before the file is even read
        state = safeload.load_state(path, "cpu", "model")  # one line for any unreadable file
        return cls(state, device, str(path))

    def check_table(self, table: ImageTable) -> None:
        """One line if the table is not one this model can be scored on: no labels, or other
        classes (count, or names where both name them). Other image sizes are resized (a note
        says so)."""
        if table.labels is None:
            raise CoregError(f"{table.source}: no labels to evaluate against")
        if classes_differ(self.classes, table.classes):
            raise CoregError(f"{table.source}: {describe_classes(table.classes)}, but "
                             f"{self.source} was trained for {describe_classes(self.classes)}: "
                             "evaluate it on a table of its classes")
        if table.image_size != self.image_size:
            from coreg_ray.errors import note

            note(f"{table.source}: images are {table.image_size}x{table.image_size}, "
                 f"{self.source} was trained on {self.image_size}x{self.image_size}: resized")

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        images = resize_images(images_uint8, self.image_size)
        out = []
        for chunk in images.split(batch_size):
            x = (chunk.to(self.device).float() / 255.0 - self.mean) / self.std
            out.append(sum(net(x).float() for net in self.nets).cpu())
        return torch.cat(out)

    def predict(self, images_uint8: torch.Tensor) -> np.ndarray:
        return self.logits(images_uint8).argmax(1).numpy()

    def evaluate(self, table: ImageTable) -> dict:
        self.check_table(table)
        pred = self.predict(table.images)
        per_class = {self.classes[c]: float((pred[table.labels == c] == c).mean())
                     for c in range(len(self.classes)) if (table.labels == c).any()}
        return {"accuracy": float((pred == table.labels).mean()), "images": len(table),
                "per_class_accuracy": per_class}


def check_device(name) -> torch.device:
    """`resolve_device` with a bad name as one line (the values `train.device` accepts)."""
    valid = Config.valid_values()["train.device"][1]
    if not valid.ok(name):
        raise CoregError(f"device {name!r}: not a device (valid: {valid})")
    return resolve_device(name)


def check_model_state(state, source: str = "model") -> None:
    """One line unless `state` is a complete `model.pt` (`CoReg.export`)."""
    if not isinstance(state, dict) or state.get("format") != "coreg-ray/1":
        raise CoregError(f"{source}: not a coreg-ray model (expected format coreg-ray/1)")
    missing = [k for k in Classifier.KEYS if k not in state]
    if missing:
        raise CoregError(f"{source}: incomplete coreg-ray model (missing {', '.join(missing)})")
    classes, nets = state["classes"], state["nets"]
    bad = None
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        bad = "classes is not a list of names"
    elif not isinstance(state["num_classes"], int) or state["num_classes"] != len(classes):
        bad = f"num_classes {state['num_classes']!r} but {len(classes)} class names"
    elif not isinstance(state["image_size"], int) or state["image_size"] < 1:
        bad = f"image_size {state['image_size']!r}"
    elif not isinstance(nets, (list, tuple)) or not nets or not all(isinstance(n, dict) for n in nets):
        bad = "nets is not a list of state dicts"
    if bad:
        raise CoregError(f"{source}: malformed coreg-ray model ({bad})")
