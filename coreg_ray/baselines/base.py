"""The loop every baseline shares, and the `Method` interface it drives.

A method owns its networks, optimisers and per-sample state (confidences, prototypes, queues);
the loop owns everything that must be the same for a fair comparison with Co-Reg: the data on
the device (`TrainingData`, the one Co-Reg uses), the epoch permutation, the batch size, the
cosine learning rate, the augmentations (`data.aug.weak/strong`), test evaluation by summed
logits, timing and history. Read `BaselineTrainer.fit` top to bottom.

Writing a method: subclass `Method`, set `name` and `defaults` (hyperparameters from the
method's paper, cited in the class docstring), build networks with `self.new_net()` and
optimisers with `self.new_sgd(net)` in `__init__`, and implement `train_step`. Keep every loss
and label update a pure function in `baselines/losses.py` with a hand-checked unit test.
Schedules the papers give in epochs are scaled with `self.scaled(fraction)` so short runs keep
their shape (write the paper's epochs / total epochs next to the fraction).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from coreg_ray.config import Config
from coreg_ray.coreg.models import build_model
from coreg_ray.coreg.optim import close_epoch
from coreg_ray.coreg.sampling import epoch_seed
from coreg_ray.coreg.trainer import (TrainingData, cosine_lr, make_sgd, prepare_training_data,
                                     set_lr)
from coreg_ray.errors import CoregError


class Method:
    """One baseline. Subclasses set `name`, `defaults` and implement `train_step`."""

    name = "method"
    defaults: dict = {}
    # epochs of the method's own warm-up/schedule are in `params`; the loop only needs these:
    n_nets = 1

    def __init__(self, data: TrainingData, cfg: Config, params: dict | None = None):
        unknown = set(params or {}) - set(self.defaults)
        if unknown:
            raise CoregError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        self.data, self.cfg = data, cfg
        self.p = {**self.defaults, **(params or {})}
        self.device = data.device
        self.nets: list[torch.nn.Module] = []
        self.opts: list[torch.optim.Optimizer] = []

    # --- helpers for subclasses ----------------------------------------------------------
    def new_net(self) -> torch.nn.Module:
        net = build_model(self.cfg.model.backbone, self.data.num_classes, self.data.image_size,
                          self.cfg.model.proj_dim).to(self.device)
        if self.data.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def new_sgd(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        return make_sgd(net.parameters(), self.cfg.train)

    def scaled(self, fraction: float) -> int:
        """An epoch of the run at `fraction` of its length (for schedules given in epochs)."""
        return int(round(fraction * self.cfg.train.epochs))

    def forward(self, net, x, project: bool = False):
        """Network forward under the run's autocast; outputs returned in fp32."""
        with self.data.autocast():
            out = net(self.data.cl(x), project=project) if project else net(self.data.cl(x))
        return tuple(o.float() for o in out) if project else out.float()

    @staticmethod
    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # --- what the loop calls -------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step (e.g. switch a phase)."""

    def train_step(self, idx: torch.Tensor, epoch: int, step: int, steps: int) -> dict:
        """One batch: `idx` indexes `data.images` / `data.candidates`. Returns detached
        scalar tensors (e.g. {"loss": ...}); no host syncs."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict:
        """After the epoch's last step (e.g. an epoch-wise confidence update). Returns stats."""
        return {}

    @torch.no_grad()
    def logits(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """Test-time logits: the sum over the method's networks, in eval mode."""
        out = 0
        for net in self.nets:
            net.eval()
            out = out + self.forward(net, x_normalized)
        return out

    def train_mode(self) -> None:
        for net in self.nets:
            net.train()


class BaselineTrainer:
    """`BaselineTrainer(method_cls, cfg, params).fit(train, annotations, test)` -> final stats,
    the same shape as `CoReg.fit` (history in `.history`, `seconds`, `test_accuracy`)."""

    def __init__(self, method_cls, config: Config | None = None, params: dict | None = None,
                 callbacks=(), progress: bool = True):
        self.method_cls = method_cls
        self.cfg = config or Config()
        self.params = params or {}
        self.callbacks = list(callbacks)
        self.progress = progress
        self.history: list[dict] = []

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.train.seed, epoch))
        perm = torch.randperm(self.data.n, generator=g).to(self.data.device)
        bs = min(self.cfg.train.batch_size, self.data.n)
        return list(perm[:(self.data.n // bs) * bs].split(bs))

    @torch.no_grad()
    def accuracy(self, images, labels) -> float:
        correct = torch.zeros((), device=self.data.device)
        for chunk, y in zip(images.split(self.cfg.train.eval_batch_size),
                            labels.split(self.cfg.train.eval_batch_size)):
            logits = self.method.logits(self.data.aug.plain(chunk))
            correct += (logits.argmax(1) == y).sum()
        return correct.item() / len(labels)

    def fit(self, train, annotations, test=None, output_dir=None, resume: bool = False,
            initial_state: dict | None = None) -> dict:
        """`CoReg.fit`'s signature; baselines keep no checkpoints: `resume` or an
        `initial_state` is one line."""
        cfg = self.cfg
        if resume or initial_state is not None:
            raise CoregError(f"{self.method_cls.name}: baselines do not resume; rerun instead")
        self.data = data = prepare_training_data(cfg, train, annotations, test)
        torch.manual_seed(cfg.train.seed)
        self.method = method = self.method_cls(data, cfg, self.params)
        elapsed = 0.0
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.epochs, unit="epoch", dynamic_ncols=True, desc=method.name)
        for epoch in range(cfg.train.epochs):
            t0 = time.perf_counter()
            lr = cosine_lr(epoch, cfg.train.epochs, cfg.train.lr, cfg.train.lr_min)
            set_lr(method.opts, lr)
            seed = epoch_seed(cfg.train.seed, epoch, rank=0)
            data.aug.gen.manual_seed(seed)
            method.start_epoch(epoch)
            method.train_mode()  # the previous epoch's test pass left the nets in eval mode
            batches = self._batches(epoch)
            totals: dict[str, torch.Tensor] = {}
            for step, idx in enumerate(batches):
                for k, v in method.train_step(idx, epoch, step, len(batches)).items():
                    totals[k] = totals.get(k, 0) + v.detach().float()
            stats = {"phase": method.name}
            if totals:
                vals = torch.stack(list(totals.values())).tolist()  # one sync per epoch
                stats.update({k: v / max(len(batches), 1) for k, v in zip(totals, vals)})
            stats.update(method.end_epoch(epoch))
            close_epoch(stats, epoch, lr, t0, cfg.train, data.device,
                        (lambda: self.accuracy(*data.test)) if data.test is not None else None,
                        getattr(method, "nets", ()))
            elapsed += stats["epoch_seconds"]
            self.history.append(stats)
            for cb in self.callbacks:
                cb(epoch, stats, self)
            if bar is not None:
                show = {k: stats[k] for k in ("loss", "test_accuracy") if k in stats}
                bar.set_postfix({k: f"{v:.3f}" for k, v in show.items()})
                bar.update(1)
        if bar is not None:
            bar.close()
        final = dict(self.history[-1]) if self.history else {}
        final["seconds"] = elapsed
        return final


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1)
