"""Optimiser helpers shared by Co-Reg and the baselines: the cosine schedule, the per-group
learning rate, the paper's SGD and in-place `torch.compile`."""
from __future__ import annotations

import math
import time

import torch


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


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


def close_epoch(stats: dict, epoch: int, lr: float, t0: float, train_cfg, device,
                evaluate=None, nets=()) -> bool:
    """The end of every trainer's epoch: test pass on the eval_every schedule and at the last
    epoch (`evaluate()` -> accuracy; None without a test table), a device sync so the timing is
    real, then epoch / lr / epoch_seconds. Returns whether this was the last epoch. First, a
    non-finite loss in `stats` or weight in `nets` stops training (`Diverged`, one line)."""
    from coreg_ray.coreg.divergence import check_finite

    check_finite(stats, epoch, nets, lr)
    last = epoch == train_cfg.epochs - 1
    if evaluate is not None and (last or (epoch + 1) % train_cfg.eval_every == 0):
        stats["test_accuracy"] = evaluate()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats.update(epoch=epoch, lr=lr, epoch_seconds=time.perf_counter() - t0)
    return last
