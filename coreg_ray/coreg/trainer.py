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
its loss waits `coreg.feature_delay` epochs; prototypes follow P's weak features from then on,
updated in each step before its prototype loss. A pass trains P's last partial batch and draws
U from a shuffled pass begun again when it runs out (`sampling.split_batches`); alignment goes
in chunks of one training batch; the MoCo queues start random (`moco`).

The training images live on the device as uint8 (or in host memory, batches gathered by index:
`data.placement`); views are made there (`DeviceAugment`). With a `Shard` (Ray Train), a rank
holds only its own rows and their per-sample state; whole-table decisions come from small
collectives (`comm`): the alignment mean, min/max, the GMM on the N gathered scalar losses.
Every random draw is re-seeded per (seed, rank, epoch) by `sampling.epoch_seed`, so a resumed
run replays exactly the epochs a killed run would have run, and N workers draw independent but
reproducible views.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.config import Config
from coreg_ray.coreg.comm import LocalComm
from coreg_ray.coreg.divergence import check_finite
from coreg_ray.coreg.labels import (candidate_agreement, classwise_minmax, co_pseudo_labels,
                                    distribution_alignment,
                                    gmm_clean_probability, minmax_normalize, mixup,
                                    update_prototypes)
from coreg_ray.coreg.losses import (consistency_loss, contrastive_masks, division_loss,
                                    noisy_contrastive_loss, prototype_alignment_loss,
                                    uniform_prior_penalty, warmup_loss)
from coreg_ray.coreg.models import build_model
from coreg_ray.coreg.sampling import (NET_STREAM, VIEW_STREAM, coreg_pass, epoch_seed, shard,
                                      split_batches)
from coreg_ray.coreg.step import Mixed, Outputs, Targets, Views
from coreg_ray.data.tables import ImageTable
from coreg_ray.errors import CoregError
# The device data, optimiser helpers, MoCo queue, checkpoint checks and inference live beside
# this module; they are imported here (and re-exported: `from coreg_ray.coreg.trainer import X`
# keeps working for every name that used to be defined in this file).
from coreg_ray.coreg.checkpoint import (CHECKPOINT, CHECKPOINT_KEYS, check_checkpoint,  # noqa: F401
                                        check_device, read_checkpoint)
from coreg_ray.coreg.classifier import Classifier, check_model_state  # noqa: F401
from coreg_ray.coreg.device_data import (CheckedInputs, TrainingData, check_training_inputs,  # noqa: F401
                                         data_fingerprint, grayscale_view, prepare_training_data,
                                         resize_images, resolve_device)
from coreg_ray.coreg.moco import MoCoQueue
from coreg_ray.coreg.sync_bn import convert_global_batchnorm
from coreg_ray.coreg.persist import Persistence
from coreg_ray.coreg.optim import close_epoch, compile_nets, cosine_lr, make_sgd, set_lr  # noqa: F401

# Per-epoch loss terms of a Co-Reg epoch (summed per step, reported as means).
LOSS_TERMS = ("loss", "loss_x", "loss_u", "loss_prot", "loss_cont", "loss_cand")
# Per-epoch counts of a Co-Reg epoch (pseudo-label accuracy of P and U, steps).
TALLIES = ("p_correct", "p_count", "u_correct", "u_count", "steps")
ALIGN_BLOCK_ROWS = 65_536  # sharded alignment: rows' chunks per all-reduce (memory ~ rows x C)


class CoReg(Persistence):
    """`CoReg(config).fit(train_table, annotations, test_table, output_dir)` -> final metrics.
    Checkpoints, per-shard state and the exported model: `coreg_ray.coreg.persist`."""

    def __init__(self, config: Config | None = None, comm=None, callbacks=(), progress=True,
                 shard=None):
        self.cfg = config or Config()
        self.comm = comm or LocalComm()
        self.shard = shard  # `coreg_ray.data.shards.Shard`: this rank's rows (None: all rows)
        self.callbacks = list(callbacks)
        self.progress = progress and self.comm.rank == 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------ set-up
    def _prepare(self, train: ImageTable, annotations, test: ImageTable | None):
        cfg = self.cfg
        data = prepare_training_data(cfg, train, annotations, test, self.comm, self.shard)
        self.data = data
        for name in ("device", "bf16", "channels_last", "images", "candidates", "trusted",
                     "trusted_index", "labels", "test", "aug", "mean", "std", "classes",
                     "num_classes", "n", "image_size"):
            setattr(self, name, getattr(data, name))
        self.ids = train.ids  # this rank's ids (all of them in one process), as read
        self.counts = [self.n] if self.shard is None else self.shard.counts
        self.lo = 0 if self.shard is None else self.shard.bounds[0]
        self.n_total = sum(self.counts)
        dev = self.device
        # Models: same seed on every rank, so DDP replicas start identical.
        torch.manual_seed(cfg.train.seed)
        self.raw_nets = [self._new_net() for _ in range(2)]
        if self.comm.world_size > 1 and cfg.train.sync_batchnorm:  # one model, as one process
            group = getattr(self.comm, "bn_group", None)
            self.raw_nets = [convert_global_batchnorm(n, group) for n in self.raw_nets]
        self.key_nets = [copy.deepcopy(n).requires_grad_(False) for n in self.raw_nets]
        if cfg.train.compile:
            compile_nets(self.raw_nets + self.key_nets)
        self.nets = [self.comm.wrap(n) for n in self.raw_nets]
        self.opts = [make_sgd(n.parameters(), cfg.train) for n in self.raw_nets]
        self.prototypes = torch.zeros(self.num_classes, cfg.model.proj_dim, device=dev)
        self.queues = [MoCoQueue.random(cfg.coreg.queue_size, cfg.model.proj_dim,
                                        self.num_classes, dev, seed=cfg.train.seed * 2 + k)
                       for k in range(2)]
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
            output_dir: str | os.PathLike | None = None, resume: bool | dict = False,
            initial_state: dict | None = None) -> dict:
        """output_dir: checkpoints go to OUTPUT/checkpoint.pt (None: no checkpoints).
        initial_state: a checkpoint state (`checkpoint_state`, `read_checkpoint`) to continue
        from: restored once the model and data are built, then the epochs after it run (none
        when it is the last); Ray Train workers restore a reported checkpoint this way.
        resume: True continues from OUTPUT/checkpoint.pt if there is one (when no
        initial_state is given); a dict is taken as initial_state. A restored state is checked
        against this run's model and data first (one line if it was made for others)."""
        cfg = self.cfg
        if cfg.train.warmup_epochs > cfg.train.epochs:
            raise CoregError(f"train.warmup_epochs ({cfg.train.warmup_epochs}) > train.epochs "
                             f"({cfg.train.epochs})")
        if initial_state is None and isinstance(resume, dict):
            initial_state = resume
        self._prepare(train, annotations, test)
        self.output_dir = Path(output_dir) if output_dir else None
        if self.output_dir and self.comm.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if initial_state is not None:  # a state the caller already read
            initial_state = dict(initial_state)
            self.load_state(initial_state, str(self.output_dir / CHECKPOINT) if self.output_dir
                            else "checkpoint", shards=initial_state.pop("shard_states", None))
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
            last = close_epoch(stats, epoch, lr, t0, cfg.train, self.device,
                               (lambda: self.accuracy(*self.test)) if self.test is not None else None,
                               self.raw_nets)  # a non-finite loss/weight: Diverged, no checkpoint
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
        """This rank's index batches of a warm-up epoch; net k shuffles as `stream` k."""
        return shard(self.n, epoch_seed(self.cfg.train.seed, epoch, stream * NET_STREAM), batch,
                     self.comm, self.device, keep_last)

    def _reseed(self, epoch: int, stream: int = 0):
        """Re-seed this rank's view draws (augmentations, MixUp) for one epoch or pass."""
        seed = epoch_seed(self.cfg.train.seed, epoch, stream, rank=self.comm.rank)
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
                    logits = net(self._cl(self.aug.strong(self._take(self.images, idx))))
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
        `pseudo_distribution`): this rank's rows of `idx` <- `probs`."""
        if not self.cfg.coreg.distribution_alignment:
            return
        self.pred_table[k][idx] = probs.float()

    def _take(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of `images` on the training device (gathered in host memory and copied
        when `data.placement` keeps them there)."""
        if images.device == self.device:
            return images[idx]
        return images[idx.cpu()].to(self.device, non_blocking=True)

    @torch.no_grad()
    def _predict_all(self, net, images, weak: bool) -> torch.Tensor:
        """Softmax (weak view) or logits (plain view) for every image of `images` (this rank's),
        computed in large no-grad batches."""
        self.comm.sync_buffers(net)  # one model: rank 0's BatchNorm statistics on every rank
        net.eval()
        outs = [torch.zeros(0, self.num_classes, device=self.device)] if len(images) == 0 else []
        for chunk in torch.arange(len(images), device=self.device).split(self.cfg.train.eval_batch_size):
            x = self._take(images, chunk)
            x = self.aug.weak(x) if weak else self.aug.plain(x)
            with self._autocast():
                logits = net(self._cl(x)).float()
            outs.append(F.softmax(logits, 1) if weak else logits)
        return torch.cat(outs)

    def _mean(self, x: torch.Tensor) -> float:
        """The mean of `x` over every rank's rows (NaN for none)."""
        if self.comm.world_size == 1:
            return x.float().mean().item()
        t = self.comm.all_reduce_sum(torch.stack([x.double().sum(), torch.tensor(
            float(len(x)), dtype=torch.float64, device=x.device)]))
        return (t[0] / t[1]).item() if t[1] > 0 else float("nan")

    def accuracy(self, images, labels) -> float:
        """Test accuracy over every rank's share of the test table."""
        logits = sum(self._predict_all(n, images, weak=False) for n in self.raw_nets)
        return self._mean(logits.argmax(1) == labels)

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
            if c.class_balanced_split:  # per-class min/max over every rank's rows
                pseudo = (probs * self.candidates).argmax(1)
                loss = classwise_minmax(loss, pseudo, self.num_classes, self.comm)
            loss = minmax_normalize(loss, self.comm).cpu()
            hist = self.div_history[k]
            hist.append(loss)
            del hist[:-c.division_history]
            # the GMM: fitted on every row's averaged loss (N scalars, gathered in row order),
            # so every rank finds the split one process holding every row would
            avg = self.comm.gather_rows(torch.stack(hist).mean(0).to(self.device),  # NCCL:
                                        self.counts).cpu().numpy()  # collectives on the device
            check_finite({"loss_division": float(avg.sum())}, epoch)  # overflowed predictions
            w = gmm_clean_probability(avg, c.gmm_max_iter, c.gmm_tol, c.gmm_reg_covar,
                                      seed=self.cfg.train.seed)[self.lo:self.lo + self.n]
            w = torch.as_tensor(w, dtype=torch.float32, device=self.device)
            self.split_w[k] = torch.where(self.trusted, torch.ones_like(w), w)
            is_p = self.split_w[k] > c.p_threshold
            stats[f"p_fraction_net{k + 1}"] = self._mean(is_p)
            if self.labels is not None:
                truth_in = self.candidates[torch.arange(self.n, device=self.device), self.labels] > 0
                stats[f"p_precision_net{k + 1}"] = self._mean(truth_in[is_p])
        stats["p_fraction"] = 0.5 * (stats["p_fraction_net1"] + stats["p_fraction_net2"])
        return stats

    def _align(self, k: int, probs: torch.Tensor) -> torch.Tensor:
        """Distribution alignment as the reference runs it: chunk by chunk in row order, in
        chunks of one training batch (their eval loader's), each chunk first written into net
        k's prediction table, then divided by the table's mean (rows not yet reached this pass
        still hold their last prediction, from the previous divide pass or the warm-up). The
        mean is kept as a running float64 sum: O(chunk) per chunk."""
        table, out = self.pred_table[k], torch.empty_like(probs)
        b = max(1, self.cfg.train.batch_size)
        total = self.comm.all_reduce_sum(table.double().sum(0))
        if self.comm.world_size > 1:
            return self._align_sharded(table, probs, total, b)
        for chunk in torch.arange(self.n, device=self.device).split(b):
            new = probs[chunk].float()
            total = total + (new.double() - table[chunk].double()).sum(0)
            table[chunk] = new
            out[chunk] = distribution_alignment(probs[chunk], (total / self.n_total).float())
        return out

    def _align_sharded(self, table, probs, total, b: int):
        """`_align` over several ranks, in the same global chunks of `b` rows in the same row
        order as one process, so every row is divided by the mean one process would divide it
        by: the change of the table's column sums chunk by chunk (this rank's rows only) is
        all-reduced for about ALIGN_BLOCK_ROWS rows' chunks at a time, and its running sum
        gives the mean at each chunk: N / ALIGN_BLOCK_ROWS collectives a pass, not one a chunk."""
        per = max(1, ALIGN_BLOCK_ROWS // b)  # chunks per collective
        lo, n, dev = self.lo, self.n, self.device
        out = torch.empty_like(probs)
        for first in range(0, -(-self.n_total // b), per):  # every rank, every block
            s = min(max(first * b - lo, 0), n)  # this rank's rows of the block: [s, e)
            e = min(max((first + per) * b - lo, 0), n)
            step = torch.zeros(per, probs.shape[1], dtype=torch.float64, device=dev)
            if s < e:
                chunk = torch.div(torch.arange(lo + s, lo + e, device=dev), b,
                                  rounding_mode="floor") - first
                step.index_add_(0, chunk, probs[s:e].double() - table[s:e].double())
            running = total + self.comm.all_reduce_sum(step).cumsum(0)  # after each chunk
            if s < e:
                means = (running[chunk] / self.n_total).float()
                out[s:e] = distribution_alignment(probs[s:e], means)
                table[s:e] = probs[s:e].float()
            total = running[-1]
        return out

    def coreg_epoch(self, epoch: int) -> dict:
        """Train net 1 on net 2's split and scores, then net 2 on net 1's (co-divide)."""
        c = self.cfg.coreg
        # Key encoders restart from their query nets at each post-warm-up epoch.
        for key, raw in zip(self.key_nets, self.raw_nets):
            key.load_state_dict(raw.state_dict())
        totals = None
        for a in range(2):
            self._reseed(coreg_pass(epoch, a), VIEW_STREAM)
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
        """(P, U) index batches of net a's pass in a post-warm-up epoch."""
        return split_batches(is_p, epoch_seed(self.cfg.train.seed, coreg_pass(epoch, a)),
                             self.cfg.train.batch_size, self.comm, self.device,
                             self.cfg.coreg.use_unlabeled)

    def train_net(self, epoch: int, a: int, peer: int) -> dict:
        """One pass of net `a` over net `peer`'s P/U split (itself without co-pseudo-labels).
        Each step: targets from weak views, strong views and MixUp, forward, losses, step,
        queue and prototype updates. Random draws and forwards come in the reference's order
        (pinned by tests/test_reference_bookkeeping.py): reorder nothing."""
        c, warm = self.cfg.coreg, self.cfg.train.warmup_epochs
        features_on = epoch > warm + c.feature_delay  # their loss terms; their updates run always
        use_proto, use_cont = c.prototypes and features_on, c.contrastive and features_on
        net, key, opt = self.nets[a], self.key_nets[a], self.opts[a]
        batches = self._split_batches(epoch, a, self.split_w[peer] > c.p_threshold)
        acc = {k: torch.zeros((), device=self.device) for k in LOSS_TERMS + TALLIES}
        net.train()
        key.train()
        if peer != a:
            self.raw_nets[peer].eval()
        for step, (ix, iu) in enumerate(batches):
            ramp = min(1.0, max(0.0, (epoch - warm + step / len(batches)) / max(c.rampup_epochs, 1)))
            x = self._take(self.images, ix)
            u = self._take(self.images, iu) if iu is not None else x[:0]
            t = self._targets(a, peer, ix, iu, x, u)  # weak views, no grad: P and U targets
            mixed = self._strong_mixup(x, u, t)  # strong views, MixUp over P and U
            out = self._forward(a, mixed, grad_query=use_cont or c.candidate_loss_weight > 0)
            self._update_prototypes(t)  # before the prototype loss, as the reference
            loss, terms = self._losses(a, out, t, mixed, ix, iu, ramp, use_proto, use_cont)
            opt.zero_grad(set_to_none=True)  # step
            loss.backward()
            opt.step()
            self._update_queue(a, out, t)
            self._tally(acc, loss, terms, t, ix, iu)
        return acc

    @torch.no_grad()
    def _targets(self, a: int, peer: int, ix, iu, x, u) -> Targets:
        """As in the reference, the trained net sees each weak view in its own train-mode
        forward (x1, x2, u1, u2), so its BatchNorm statistics get four per-view updates."""
        raw = self.raw_nets[a]
        with self._autocast():
            weak = Views.of(x, u, self.aug.weak)  # per-sample random: 4 views
            outs = [raw(self._cl(v), project=True) for v in weak.parts() if len(v)]
            prob = weak.like(F.softmax(torch.cat([o[0] for o in outs]).float(), 1))
            targets_x, keep_p = self._p_targets(peer, ix, 0.5 * (prob.x1 + prob.x2))
            targets_u = (self._u_targets(a, peer, iu, weak, 0.5 * (prob.u1 + prob.u2))
                         if len(u) else targets_x[:0])
        soft = Views.of(targets_x, targets_u)
        is_p = Views.of(keep_p, torch.zeros(len(u), dtype=torch.bool, device=self.device))
        return Targets(soft, is_p, soft.first.argmax(1), outs[0][1])

    def _p_targets(self, peer: int, ix, own):
        """P rows: co-pseudo-labels from the peer's divide-pass scores and this net's weak-view
        prediction `own`, weighted by the peer's clean probability. With the agreement gate, P
        rows the nets disagree on get U-style targets (keep_p False); without it all stay P."""
        c = self.cfg.coreg
        peer_x, cand, w = self.scores[peer][ix], self.candidates[ix], self.split_w[peer][ix]
        keep_p = (candidate_agreement(peer_x, own, cand) if c.agreement_gate
                  else torch.ones_like(w, dtype=torch.bool))
        return co_pseudo_labels(peer_x, peer_x, own, cand, w, keep_p, c.sharpen_T,
                                c.u_targets_in_candidates), keep_p

    def _u_targets(self, a: int, peer: int, iu, weak: Views, own):
        """U rows: co-pseudo-labels from the peer's eval-mode prediction on the same two weak
        views (this net's `own` without a peer), with no P weight."""
        c, bu = self.cfg.coreg, len(iu)
        by_peer = own
        if peer != a:
            u1, u2 = F.softmax(self.raw_nets[peer](self._cl(weak.u)).float(), 1).split([bu, bu])
            by_peer = 0.5 * (u1 + u2)
        return co_pseudo_labels(by_peer, by_peer, own, self.candidates[iu],
                                torch.zeros(bu, device=self.device),
                                torch.zeros(bu, dtype=torch.bool, device=self.device),
                                c.sharpen_T, c.u_targets_in_candidates)

    def _strong_mixup(self, x, u, t: Targets) -> Mixed:
        """Strong views of [x, x, u, u] (one batched call), then MixUp over P and U together."""
        c = self.cfg.coreg
        strong = Views.of(x, u, self.aug.strong)
        lam = float(self.rng.beta(c.mixup_alpha, c.mixup_alpha))
        partner = torch.randperm(len(strong.stacked), generator=self.aug.gen, device=self.device)
        return Mixed(strong, *mixup(strong.stacked, t.soft.stacked, lam, partner))

    def _forward(self, a: int, mixed: Mixed, grad_query: bool) -> Outputs:
        """The mixed batch; then the reference's contrastive branch (every step once the warm-up
        is over, also before its loss is switched on): the first strong views through the query
        net, the key net's momentum update, the second strong views through the key net."""
        c, raw, key = self.cfg.coreg, self.raw_nets[a], self.key_nets[a]
        with self._autocast():
            logits, z = self.nets[a](self._cl(mixed.inputs), project=True)
        logits, z = logits.float(), z.float()  # losses in fp32 (outside autocast)
        logits_q = zq = k = None
        if c.contrastive or c.candidate_loss_weight > 0:
            with torch.set_grad_enabled(grad_query), self._autocast():
                logits_q, zq = raw(self._cl(mixed.strong.first), project=True)
            logits_q, zq = logits_q.float(), zq.float()
        if c.contrastive:
            with torch.no_grad():
                kp = list(key.parameters())  # momentum update before the keys (reference)
                torch._foreach_mul_(kp, c.key_momentum)
                torch._foreach_add_(kp, [p.detach() for p in raw.parameters()],
                                    alpha=1.0 - c.key_momentum)
                with self._autocast():
                    _, k = key(self._cl(mixed.strong.second), project=True)
                k = k.float()
        return Outputs(logits, z, logits_q, zq, k)

    def _losses(self, a: int, out: Outputs, t: Targets, mixed: Mixed, ix, iu, ramp: float,
                use_proto: bool, use_cont: bool):
        """The step's loss and its terms (LOSS_TERMS but "loss")."""
        c = self.cfg.coreg
        lx, lu = consistency_loss(out.logits, mixed.targets, t.is_p.stacked)
        loss = lx + c.lambda_u * ramp * lu
        if c.prior_penalty:
            loss = loss + uniform_prior_penalty(out.logits)
        lcand = lprot = lcont = torch.zeros((), device=self.device)
        if c.candidate_loss_weight > 0:  # the first strong views vs their candidate sets
            cand = self.candidates[ix]
            cand_u = self.candidates[iu] if iu is not None else cand[:0]
            lcand = warmup_loss(out.logits_q, torch.cat([cand, cand_u]))
            loss = loss + c.candidate_loss_weight * lcand
        if use_proto:
            lprot = prototype_alignment_loss(out.z, self.prototypes, mixed.targets,
                                             t.is_p.stacked, c.proto_temp, c.lambda_u)
            loss = loss + c.beta1 * lprot
        if use_cont:
            queue = self.queues[a]
            pos, kept = contrastive_masks(t.hard, t.is_p.first, queue.labels, queue.is_p,
                                          c.noisy_contrastive)
            lcont = noisy_contrastive_loss(out.zq, torch.cat([out.zq, out.k, queue.feats]), pos,
                                           kept, c.cont_temp)
            loss = loss + c.beta2 * lcont
        return loss, {"loss_x": lx, "loss_u": lu, "loss_prot": lprot, "loss_cont": lcont,
                      "loss_cand": lcand}

    @torch.no_grad()
    def _update_prototypes(self, t: Targets) -> None:
        """Every post-warm-up step (reference), whether or not their loss term is on yet: the
        prototypes (shared by both nets) follow P's weak features, before the step's loss."""
        gather = self.comm.all_gather
        self.prototypes = update_prototypes(
            self.prototypes, gather(t.z_weak.float()), gather(t.hard[:t.soft.bx]),
            gather(t.is_p.x1), self.cfg.coreg.proto_gamma)

    @torch.no_grad()
    def _update_queue(self, a: int, out: Outputs, t: Targets) -> None:
        """Every post-warm-up step: net a's queue takes the keys after the step's loss (which
        saw the queue without them), as MoCo's dequeue-and-enqueue."""
        if self.cfg.coreg.contrastive:
            gather = self.comm.all_gather
            self.queues[a].push(gather(out.k), gather(t.hard), gather(t.is_p.first))

    @torch.no_grad()
    def _tally(self, acc: dict, loss, terms: dict, t: Targets, ix, iu) -> None:
        acc["loss"] += loss.detach()
        for name, term in terms.items():
            acc[name] += term.detach()
        acc["steps"] += 1
        if self.labels is not None:  # gated-out P rows count as U (trained as U)
            keep_p, bx = t.is_p.x1, len(ix)
            right = t.hard[:bx] == self.labels[ix]
            acc["p_correct"] += (right & keep_p).sum()
            acc["p_count"] += keep_p.sum()
            acc["u_correct"] += (right & ~keep_p).sum()
            acc["u_count"] += (~keep_p).sum()
            if iu is not None:
                acc["u_correct"] += (t.hard[bx:] == self.labels[iu]).sum()
                acc["u_count"] += len(iu)
