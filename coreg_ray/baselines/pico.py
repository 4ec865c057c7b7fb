"""PiCO, PiCO+ and ALIM: contrastive label disambiguation with prototypes.

All three share one skeleton (`_PiCOBase`): a query network (classifier + 128-d projection), a
momentum key encoder (MoCo, m = 0.999) fed the strong view, a queue of keys with their
pseudo-labels, class prototypes (moving average of query embeddings by pseudo-label, normalised)
and a per-sample pseudo-target s (initially uniform over the candidates), trained with CE(s,
logits of the weak view) + a weighted supervised contrastive loss. The classes differ in how
pseudo-labels and targets are formed and in the extra terms; each docstring lists its defaults
(from the paper and the authors' code; shared settings - lr, weight decay, batch size, epochs,
cosine schedule - are the run's) and every simplification.

Schedules given in epochs are scaled to the run (`self.scaled`, paper epoch / paper total), with
at least one epoch where the method needs a warm-up epoch before it (PiCO's MoCo warm-up,
PiCO+'s first selection, ALIM's first noise estimate).

Queue size: the paper's 8192 for CIFAR's 50,000 images; on a smaller training set the queue is
cut to the same fraction (8192 / 50000 of N, at least one batch), so it never holds stale keys
of the same images several times over.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.baselines.base import Method
from coreg_ray.baselines.pico_losses import (alim_lambda, alim_weights, candidate_margin,
                                             ema_target, estimate_noise_level, knn_index,
                                             masked_mean, mixup_batch, onehot_target,
                                             phi_schedule, pico_contrastive_masks,
                                             pico_plus_masks, prototype_distance,
                                             prototype_scores, scaled_target, select_reliable,
                                             supcon_per_anchor, uniform_over_candidates)
from coreg_ray.coreg.labels import sharpen, update_prototypes
from coreg_ray.coreg.losses import partial_ce, soft_cross_entropy
from coreg_ray.coreg.trainer import MoCoQueue
from coreg_ray.method_registry import register_method

_PICO_DEFAULTS = {
    "queue_size": 8192,  # --moco_queue (PiCO, CIFAR); scaled down on smaller sets (module doc)
    "key_momentum": 0.999,  # --moco_m
    "proto_m": 0.99,  # --proto_m: prototype moving average
    "loss_weight": 0.5,  # --loss_weight: contrastive term
    "phi_start": 0.95,  # --conf_ema_range 0.95,0.8: pseudo-target moving average, linear
    "phi_end": 0.8,
    "temperature": 0.07,  # SupConLoss temperature (= base_temperature)
}


class _PiCOBase(Method):
    """Shared state and helpers; subclasses implement `train_step`."""

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        net = self.new_net()
        self.nets = [net]
        self.opts = [self.new_sgd(net)]
        self.key = copy.deepcopy(net).requires_grad_(False)
        self.key.train()
        bs = min(cfg.train.batch_size, data.n)
        size = min(int(self.p["queue_size"]), max(bs, data.n * 8192 // 50000))
        self.queue = MoCoQueue.empty(size, cfg.model.proj_dim, self.device)
        self.prototypes = torch.zeros(data.num_classes, cfg.model.proj_dim, device=self.device)
        self.confidence = uniform_over_candidates(data.candidates)
        self.rng = np.random.default_rng(cfg.train.seed)
        self.phi = self.p["phi_start"]

    def start_epoch(self, epoch):
        self.phi = phi_schedule(epoch, self.cfg.train.epochs, self.p["phi_start"],
                                self.p["phi_end"])

    @torch.no_grad()
    def keys_of(self, x_strong):
        """Momentum update of the key encoder, then the keys of the strong views."""
        kp = list(self.key.parameters())
        torch._foreach_mul_(kp, self.p["key_momentum"])
        torch._foreach_add_(kp, [p.detach() for p in self.nets[0].parameters()],
                            alpha=1.0 - self.p["key_momentum"])
        return self.forward(self.key, x_strong, project=True)[1]

    def contrastive(self, z, k, pseudo, supervised: bool) -> torch.Tensor:
        pos, kept = pico_contrastive_masks(pseudo, self.queue.labels, supervised)
        keys = torch.cat([z, k, self.queue.feats])
        return supcon_per_anchor(z, keys, pos, kept, self.p["temperature"]).mean()

    def views(self, idx):
        d = self.data
        x = d.images[idx]
        return d.aug.weak(x), d.aug.strong(x), d.candidates[idx]

    def at_least_one(self, fraction: float) -> int:
        return max(1, self.scaled(fraction))


@register_method("pico", label="PiCO", kind="baseline")
class PiCO(_PiCOBase):
    """PiCO (Wang et al., ICLR 2022): contrastive label disambiguation with class prototypes.

    Paper: "PiCO: Contrastive Label Disambiguation for Partial Label Learning"; code
    github.com/hbzju/PiCO (model.py, train.py).

    Each step: query = weak view -> (logits, z); pseudo-label = argmax over the candidates of
    the classifier's softmax; prototype scores softmax(z . mu) computed with the prototypes
    before they are updated with this batch's z by pseudo-label (proto_m 0.99, normalised);
    keys = strong view through the momentum encoder (m 0.999). From `prot_start` on, the
    pseudo-target is updated s <- phi*s + (1-phi)*onehot(argmax_{j in S} prototype score),
    phi linear 0.95 -> 0.8 over training, and the contrastive loss is SupCon with positives =
    same pseudo-label among [queries, keys, queue]; before it (PiCO's warm-up) s stays uniform
    and the contrastive loss is plain MoCo (own key vs queue). Loss = CE(s, logits) + 0.5 * cont.

    Defaults (PiCO's CIFAR-10 command line: --moco_queue 8192 --moco_m 0.999 --proto_m 0.99
    --loss_weight 0.5 --conf_ema_range 0.95,0.8 --prot_start 1 of --epochs 800; SupCon T 0.07).
    `prot_start` = 1/800 of the run, at least 1 epoch.

    Simplifications: empty queue slots are ignored instead of holding random vectors; no
    shuffle-BN (one device: it would not change the batch statistics); the key encoder's BN
    statistics come from its own forward passes, as in MoCo."""

    name = "pico"
    defaults = {**_PICO_DEFAULTS, "prot_start": 1 / 800}

    def train_step(self, idx, epoch, step, steps):
        xw, xs, cand = self.views(idx)
        net = self.nets[0]
        supervised = epoch >= self.at_least_one(self.p["prot_start"])
        logits, z = self.forward(net, xw, project=True)
        with torch.no_grad():
            pseudo = (F.softmax(logits, 1) * cand).argmax(1)
            score_prot = prototype_scores(z, self.prototypes)
            self.prototypes = update_prototypes(self.prototypes, z.detach(), pseudo,
                                                torch.ones_like(pseudo, dtype=torch.bool),
                                                self.p["proto_m"])
            k = self.keys_of(xs)
            if supervised:
                self.confidence[idx] = ema_target(self.confidence[idx],
                                                  onehot_target(score_prot, cand), self.phi)
        lcont = self.contrastive(z, k, pseudo, supervised)
        lcls = soft_cross_entropy(logits, self.confidence[idx]).mean()
        loss = lcls + self.p["loss_weight"] * lcont
        self.step(self.opts[0], loss)
        self.queue.push(k, pseudo, torch.ones_like(pseudo, dtype=torch.bool))
        return {"loss": loss.detach(), "loss_cls": lcls.detach(), "loss_cont": lcont.detach()}


@register_method("pico_plus", label="PiCO+", kind="baseline")
class PiCOPlus(_PiCOBase):
    """PiCO+ (Wang et al., TPAMI 2023): PiCO + prototype-distance clean selection for noisy sets.

    Paper: "PiCO+: Contrastive Label Disambiguation for Robust Partial Label Learning"; code
    github.com/hbzju/PiCO (model.py PiCO_PLUS, train_pico_plus.py).

    Clean-sample detection: each step records d_i = -z_i . mu_y, y = the classifier's argmax
    within the candidates (distance to the prototype of the candidate-restricted prediction);
    at the start of every epoch from `prot_start` on the `pure_ratio` (0.6) fraction with the
    smallest d is the reliable set R (before that every sample is reliable).
    Pseudo-labels: argmax within the candidates for R, argmax over all classes otherwise;
    prototypes move with R's embeddings only. Pseudo-targets s: PiCO's update (all samples).
    After `prot_start` the loss is
      mixup CE (Beta(4,4), lam = max(lam, 1-lam), partners a batch permutation, targets s on R
        and the guessed label on the rest)
      + cls_weight (2) * CE(s, logits) on R
      + ur_weight (0.1) * CE(guess, logits) off R, guess = sharpen(prototype scores, T 0.07)
        over all classes (label guessing)
      + SupCon where R anchors' positives are reliable keys of their pseudo-label and other
        anchors' only their own key, or from `knn_start` their `chosen_neighbors` (16) nearest
        keys; weighted per anchor loss_weight (0.5) on R / ur_weight off R once kNN runs
        (unweighted before, as in their code)
      + ur_weight * plain PiCO SupCon over all anchors ("relaxed" term).
    Before `prot_start`: PiCO's warm-up (CE on uniform s + 0.5 * MoCo).

    Defaults: their CIFAR-10 command (--prot_start 5 of 800 epochs, --loss_weight 0.5,
    --proto_m 0.99, --moco_queue 8192) and argparse defaults (--pure_ratio 0.6, --knn_start
    100, --chosen_neighbors 16, --temperature_guess 0.07, --ur_weight 0.1, --cls_weight 2,
    --conf_ema_range 0.95,0.8, mixup Beta(4, 4)); epochs scaled by 800, at least 1 epoch.

    Simplifications: distances are those recorded while training (as in their code: a sample
    not visited in an epoch keeps its last distance); empty queue slots ignored; no
    shuffle-BN."""

    name = "pico_plus"
    defaults = {**_PICO_DEFAULTS, "prot_start": 5 / 800, "pure_ratio": 0.6,
                "knn_start": 100 / 800, "chosen_neighbors": 16, "temperature_guess": 0.07,
                "ur_weight": 0.1, "cls_weight": 2.0, "mixup_alpha": 4.0}

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.dist = torch.zeros(data.n, device=self.device)
        self.is_rel = torch.ones(data.n, dtype=torch.bool, device=self.device)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        if epoch >= self.at_least_one(self.p["prot_start"]):
            self.is_rel = select_reliable(self.dist, self.p["pure_ratio"])

    def train_step(self, idx, epoch, step, steps):
        p = self.p
        xw, xs, cand = self.views(idx)
        net = self.nets[0]
        started = epoch >= self.at_least_one(p["prot_start"])
        use_knn = epoch >= self.at_least_one(p["knn_start"])
        is_rel = self.is_rel[idx]
        logits, z = self.forward(net, xw, project=True)
        with torch.no_grad():
            probs = F.softmax(logits, 1)
            within = (probs * cand).argmax(1)
            pseudo = torch.where(is_rel, within, probs.argmax(1))
            score_prot = prototype_scores(z, self.prototypes)
            self.dist[idx] = prototype_distance(z, self.prototypes, within)
            self.prototypes = update_prototypes(self.prototypes, z.detach(), pseudo, is_rel,
                                                p["proto_m"])
            k = self.keys_of(xs)
        zero = torch.zeros((), device=self.device)
        if not started:
            lcont = self.contrastive(z, k, pseudo, supervised=False)
            lcls = soft_cross_entropy(logits, self.confidence[idx]).mean()
            loss = lcls + p["loss_weight"] * lcont
            lmix = lur = zero
        else:
            with torch.no_grad():
                self.confidence[idx] = ema_target(self.confidence[idx],
                                                  onehot_target(score_prot, cand), self.phi)
                guess = sharpen(score_prot, p["temperature_guess"])
            keys = torch.cat([z, k, self.queue.feats])
            l_all = self.contrastive(z, k, pseudo, supervised=True)
            knn = None
            if use_knn:
                valid = torch.cat([torch.ones(2 * len(idx), dtype=torch.bool, device=self.device),
                                   self.queue.labels >= 0])
                knn = knn_index(z.detach(), keys.detach(), valid, p["chosen_neighbors"])
            pos, kept = pico_plus_masks(pseudo, is_rel, self.queue.labels, self.queue.is_p, knn)
            per = supcon_per_anchor(z, keys, pos, kept, p["temperature"])
            if use_knn:
                per = per * torch.where(is_rel, p["loss_weight"], p["ur_weight"])
            lcont = per.mean() + p["ur_weight"] * l_all
            conf = self.confidence[idx]
            lcls = masked_mean(soft_cross_entropy(logits, conf), is_rel)
            lur = masked_mean(soft_cross_entropy(logits, guess), ~is_rel)
            targets = torch.where(is_rel[:, None], conf, guess)
            lam = float(self.rng.beta(p["mixup_alpha"], p["mixup_alpha"]))
            perm = torch.randperm(len(idx), generator=self.data.aug.gen, device=self.device)
            x_mix, t_mix = mixup_batch(xw, targets, lam, perm)
            lmix = soft_cross_entropy(self.forward(net, x_mix), t_mix).mean()
            loss = lmix + p["cls_weight"] * lcls + p["ur_weight"] * lur + lcont
        self.step(self.opts[0], loss)
        self.queue.push(k, pseudo, is_rel)
        return {"loss": loss.detach(), "loss_cls": lcls.detach(), "loss_cont": lcont.detach(),
                "loss_mix": lmix.detach(), "loss_ur": lur.detach()}

    def end_epoch(self, epoch):
        out = {"reliable_fraction": self.is_rel.float().mean().item()}
        if self.data.labels is not None:  # metrics only
            truth_in = self.data.candidates.gather(1, self.data.labels[:, None])[:, 0] > 0
            rel = self.is_rel
            out["reliable_precision"] = (truth_in & rel).sum().item() / max(rel.sum().item(), 1)
        return out


class _ALIM(_PiCOBase):
    """ALIM (Xu et al., NeurIPS 2023) on PiCO, lambda from an estimated noise level.

    Paper: "ALIM: Adjusting Label Importance Mechanism for Noisy Partial Label Learning"; code
    github.com/zeroQiaoba/ALIM (train_merge.py, pll_model.py, utils/utils_loss.py).

    The label set S is replaced by S + lambda * (1 - S) (non-candidates kept with importance
    lambda) wherever PiCO restricts to S: the classifier pseudo-label for prototypes and the
    contrastive positives is argmax(p * (S + lambda(1-S))), and the pseudo-target update uses
    the prototype ("cluster") scores c = softmax(z . mu / 0.07):
      ALIM-Onehot: s <- phi*s + (1-phi)*onehot(argmax(c * (S + lambda(1-S))))
      ALIM-Scale:  s <- phi*s + (1-phi)*normalise(c * (S + lambda(1-S)))
    phi linear 0.95 -> 0.8. Loss = CE(s, logits) + 0.5 * SupCon (pseudo-label positives from
    the first epoch, as their proto_start 1 with 1-based epochs) + 1.0 * mixup CE (weak views,
    Beta(4, 4), lam = max(lam, 1-lam), targets s).
    lambda = 0 (PiCO) until `lambda_start`; then after every epoch lambda is ALIM's adaptive
    rule (piror_auto case1): the noise-level quantile of the per-sample margins
    max_{j in S} c_j / max_{j not in S} c_j recorded in training, so that about a noise-level
    fraction of samples gets a non-candidate target; capped at 1 (their --max1).
    The noise level is ESTIMATED, not given (ALIM reads the true one from its command line):
    the fraction of samples that a 2-component GMM on the per-sample partial loss
    -log sum_{j in S} p_j (recorded in training, weak view) puts in the high-loss component,
    refreshed after every epoch from `lambda_start` on.

    Defaults: their CIFAR command lines (--piror_start 80 of --epochs 1000, --max1) and
    argparse defaults (--moco_queue 8192 --moco_m 0.999 --proto_m 0.99 --loss_weight 0.5
    --conf_ema_range 0.95,0.8 --vMF 0.07 --proto_type cluster --alpha 4
    --loss_weight_mixup 1). `lambda_start` = 80/1000 of the run, at least 1 epoch.

    Simplifications: the noise level is estimated (above); mixup partners are a permutation
    of the batch (their second, independently shuffled loader gives other images); their
    first epoch uses phi 0.99 (partial_loss's constructor default), here the schedule's value;
    empty queue slots ignored; no shuffle-BN."""

    soft = False
    defaults = {**_PICO_DEFAULTS, "vmf": 0.07, "lambda_start": 80 / 1000, "max_lambda": 1.0,
                "mixup_alpha": 4.0, "mixup_weight": 1.0}

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.lam = 0.0
        self.noise_level = 0.0
        self.margin = torch.full((data.n,), float("nan"), device=self.device)
        self.ploss = torch.full((data.n,), float("nan"), device=self.device)

    def train_step(self, idx, epoch, step, steps):
        p = self.p
        xw, xs, cand = self.views(idx)
        net = self.nets[0]
        logits, z = self.forward(net, xw, project=True)
        with torch.no_grad():
            w = alim_weights(cand, self.lam)
            pseudo = (F.softmax(logits, 1) * w).argmax(1)
            cluster = prototype_scores(z, self.prototypes, p["vmf"])
            self.margin[idx] = candidate_margin(cluster, cand)
            self.ploss[idx] = partial_ce(logits, cand)
            self.prototypes = update_prototypes(self.prototypes, z.detach(), pseudo,
                                                torch.ones_like(pseudo, dtype=torch.bool),
                                                p["proto_m"])
            k = self.keys_of(xs)
            target = scaled_target(cluster, w) if self.soft else onehot_target(cluster, w)
            self.confidence[idx] = ema_target(self.confidence[idx], target, self.phi)
        lcont = self.contrastive(z, k, pseudo, supervised=True)
        conf = self.confidence[idx]
        lcls = soft_cross_entropy(logits, conf).mean()
        lam = float(self.rng.beta(p["mixup_alpha"], p["mixup_alpha"]))
        perm = torch.randperm(len(idx), generator=self.data.aug.gen, device=self.device)
        x_mix, t_mix = mixup_batch(xw, conf, lam, perm)
        lmix = soft_cross_entropy(self.forward(net, x_mix), t_mix).mean()
        loss = lcls + p["loss_weight"] * lcont + p["mixup_weight"] * lmix
        self.step(self.opts[0], loss)
        self.queue.push(k, pseudo, torch.ones_like(pseudo, dtype=torch.bool))
        return {"loss": loss.detach(), "loss_cls": lcls.detach(), "loss_cont": lcont.detach(),
                "loss_mix": lmix.detach()}

    def end_epoch(self, epoch):
        if epoch + 1 >= self.at_least_one(self.p["lambda_start"]):
            seen = ~torch.isnan(self.ploss)
            self.noise_level = estimate_noise_level(self.ploss[seen], seed=self.cfg.train.seed)
            self.lam = alim_lambda(self.margin[seen], self.noise_level, self.p["max_lambda"])
        return {"noise_level": self.noise_level, "lambda": self.lam}


@register_method("alim_onehot", label="ALIM-Onehot", kind="baseline")
class ALIMOnehot(_ALIM):
    __doc__ = "ALIM-Onehot (hard targets): " + _ALIM.__doc__
    name = "alim_onehot"
    soft = False


@register_method("alim_scale", label="ALIM-Scale", kind="baseline")
class ALIMScale(_ALIM):
    __doc__ = "ALIM-Scale (soft targets): " + _ALIM.__doc__
    name = "alim_scale"
    soft = True
