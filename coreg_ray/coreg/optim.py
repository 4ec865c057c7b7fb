"""Optimiser helpers shared by Co-Reg and the baselines: the cosine schedule, the per-group
learning rate, the paper's SGD and in-place `torch.compile`."""
from __future__ import annotations

import math

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
