"""Classic partial-label-learning baselines: one network trained on the candidate sets, and
label-free distillation from the annotator's probabilities.

Each uses one weak view per step, as the original papers do (their CIFAR code: random crop +
flip), unless its docstring says otherwise (CR-DPLL: one weak + two strong views). Only the
method's own hyperparameters are in `defaults`; the optimiser, learning-rate schedule, batch
size and epochs are the shared ones of the run's config, for a fair comparison.
"""
from __future__ import annotations

import torch

from coreg_ray.baselines.base import Method
from coreg_ray.baselines.losses import (candidate_confidence, cc_loss, complementary_loss,
                                        cr_confidence, kd_loss, kl_to_confidence, linear_ramp,
                                        lws_init, lws_loss, lws_weights, uniform_confidence,
                                        weighted_ce_loss)
from coreg_ray.errors import CoregError, NotApplicable
from coreg_ray.method_registry import register_method


@register_method("cc", label="CC", kind="baseline")
class CC(Method):
    """CC (Feng et al., NeurIPS 2020): minimise -log sum_{j in S} p_j. No hyperparameters of
    its own (the optimiser and schedule are the shared ones)."""

    name = "cc"
    defaults: dict = {}

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.nets = [self.new_net()]
        self.opts = [self.new_sgd(self.nets[0])]

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        logits = self.forward(self.nets[0], d.aug.weak(d.images[idx]))
        loss = cc_loss(logits, d.candidates[idx])
        self.step(self.opts[0], loss)
        return {"loss": loss.detach()}


class _OneNet(Method):
    """One network and its SGD optimiser."""

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.nets = [self.new_net()]
        self.opts = [self.new_sgd(self.nets[0])]


@register_method("proden", label="PRODEN", kind="baseline")
class PRODEN(_OneNet):
    """PRODEN (Lv et al., ICML 2020, "Progressive identification of true labels for
    partial-label learning"): minimise -sum_j w_ij log p_ij with per-sample confidences w,
    initialised uniform over the candidate set; after each step the batch's w is set to the
    same forward's softmax restricted to the candidates and renormalised (detached), as the
    authors' code does (the update uses the logits the loss was computed from, before the step).
    No hyperparameters of its own."""

    name = "proden"
    defaults: dict = {}

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.confidence = uniform_confidence(data.candidates)

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        logits = self.forward(self.nets[0], d.aug.weak(d.images[idx]))
        loss = weighted_ce_loss(logits, self.confidence[idx])
        self.step(self.opts[0], loss)
        self.confidence[idx] = candidate_confidence(logits.detach(), d.candidates[idx])
        return {"loss": loss.detach()}


@register_method("rc", label="RC", kind="baseline")
class RC(PRODEN):
    """RC (Feng et al., NeurIPS 2020, "Provably consistent partial-label learning", the
    risk-consistent estimator): the same loss as PRODEN, -sum_j w_ij log p_ij, with w
    initialised uniform over the candidate set. As in the authors' code (RCCC `main.py`), the
    batch's w is updated after the optimiser step from a second, gradient-free forward of the
    *updated* network on the same augmented batch (network left in train mode, as theirs):
    w = softmax restricted to the candidates, renormalised. That post-step re-forward is the
    only difference from PRODEN (which reuses the pre-step logits) and costs one extra forward
    per step. No hyperparameters of its own (the authors' lr/weight decay are the shared
    optimiser's)."""

    name = "rc"
    defaults: dict = {}

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        x = d.aug.weak(d.images[idx])
        loss = weighted_ce_loss(self.forward(self.nets[0], x), self.confidence[idx])
        self.step(self.opts[0], loss)
        with torch.no_grad():
            after = self.forward(self.nets[0], x)
        self.confidence[idx] = candidate_confidence(after, d.candidates[idx])
        return {"loss": loss.detach()}


@register_method("lws", label="LWS", kind="baseline")
class LWS(_OneNet):
    """LWS (Wen et al., ICML 2021, "Leveraged weighted loss for partial label learning"),
    the sigmoid-loss version the paper evaluates: minimise
    sum_{j in S} w_j phi(z_j) + beta * sum_{j not in S} w_j phi(-z_j), phi(z) = 1/(1+e^z),
    on the raw logits z. Weights start at 1/C for every class (authors' code); after each step
    they are refreshed from a gradient-free forward of the updated network on the same batch
    (authors' `confidence_update_lw`): softmax renormalised over the candidates on S plus
    softmax renormalised over the non-candidates off S. beta = 1: the authors' CIFAR-10 setting
    for every partial rate (their Run.md: `-lo lws -lw 1`; the paper searches beta in {1, 2},
    beta = 2 being their MNIST choice at q = 0.1). `lr_scale` 5: the bounded sigmoid loss has
    small gradients, and the authors train CIFAR-10 at lr 0.05, five times the shared 0.01 (at
    0.01 it reaches 0.65 on digits in 8 epochs vs 0.87 at 0.05); the schedule stays the shared
    cosine."""

    name = "lws"
    defaults = {"beta": 1.0, "lr_scale": 5.0}

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.weights = lws_init(data.candidates)
        for g in self.opts[0].param_groups:
            g["lr_scale"] = self.p["lr_scale"]

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        x = d.aug.weak(d.images[idx])
        cand = d.candidates[idx]
        loss = lws_loss(self.forward(self.nets[0], x), cand, self.weights[idx], self.p["beta"])
        self.step(self.opts[0], loss)
        with torch.no_grad():
            after = self.forward(self.nets[0], x)
        self.weights[idx] = lws_weights(after, cand)
        return {"loss": loss.detach()}


@register_method("cr_dpll", label="CR-DPLL", kind="baseline")
class CRDPLL(_OneNet):
    """CR-DPLL (Wu, Wang & Zhang, ICML 2022, "Revisiting consistency regularization for deep
    partial label learning"): per-sample confidences q (uniform on the candidate set at first);
    loss = -sum_{j not in S} log(1 - p_j) on the weak view (complementary loss, as in the
    authors' code: a sum of per-class terms, not -log sum_{j not in S}(1 - p_j))
    + lambda(t) * sum over the three views of KL(q || p_view), with views one weak + two strong
    (the authors' loader: one crop+flip view and two AutoAugment+Cutout views; here the shared
    strong augmentation), each a separate forward as theirs. lambda(t) = min(t / T_ramp, 1) *
    lam with lam = 1 and T_ramp = 100 of their 200 epochs (`ramp_fraction` 0.5, via
    `self.scaled`). After each step q for the batch is set to the normalised geometric mean of
    the three views' (pre-step) softmax restricted to the candidates."""

    name = "cr_dpll"
    defaults = {"lam": 1.0, "ramp_fraction": 0.5}  # 100 / 200 epochs

    def __init__(self, data, cfg, params=None):
        super().__init__(data, cfg, params)
        self.confidence = uniform_confidence(data.candidates)

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        net = self.nets[0]
        imgs, cand, q = d.images[idx], d.candidates[idx], self.confidence[idx]
        views = [self.forward(net, d.aug.weak(imgs)), self.forward(net, d.aug.strong(imgs)),
                 self.forward(net, d.aug.strong(imgs))]
        lam = linear_ramp(epoch, self.scaled(self.p["ramp_fraction"]), self.p["lam"])
        sup = complementary_loss(views[0], cand)
        cons = sum(kl_to_confidence(v, q) for v in views)
        loss = sup + lam * cons
        self.step(self.opts[0], loss)
        self.confidence[idx] = cr_confidence([v.detach() for v in views], cand)
        return {"loss": loss.detach(), "loss_sup": sup.detach(), "loss_cons": cons.detach()}


@register_method("kd_unsup", label="KD_unsup", kind="baseline")
class KDUnsup(_OneNet):
    """Knowledge distillation from the annotator with no labels (Hinton et al., 2015): the
    student minimises the soft cross-entropy to the annotator's mean template probabilities
    (`data.soft_targets`, the annotation table's `probs`), at temperature T: -T^2 sum_j t'_j log
    softmax(z/T)_j with t' = t^(1/T) renormalised. T = 1 (plain soft CE) by default; the
    candidate sets are not used."""

    name = "kd_unsup"
    defaults = {"temperature": 1.0}

    def __init__(self, data, cfg, params=None):
        if data.soft_targets is None:
            raise NotApplicable("kd_unsup distils the annotator's probabilities, but the annotation "
                             "table has no `probs` column (candidate sets only); annotate with a "
                             "run that records the mean template probabilities")
        super().__init__(data, cfg, params)
        if not self.p["temperature"] > 0:
            raise CoregError(f"kd_unsup: temperature must be > 0, got {self.p['temperature']}")

    def train_step(self, idx, epoch, step, steps):
        d = self.data
        logits = self.forward(self.nets[0], d.aug.weak(d.images[idx]))
        loss = kd_loss(logits, d.soft_targets[idx], self.p["temperature"])
        self.step(self.opts[0], loss)
        return {"loss": loss.detach()}
