"""BatchNorm over every rank's batch (sharded training), on any device and backend.

With W ranks each holding batch / W rows, per-rank BatchNorm normalises by statistics of a
W times smaller batch than one process would, and its running statistics follow rank 0's
rows only: the model trained is not the one a single process trains. `GlobalBatchNorm`
computes the training-mode mean and variance over the rows of every rank (one all-reduce of
[sum, sum of squares, count] per forward, one of [sum dy, sum dy * x_hat] per backward, so
the gradients are one process's) and updates the running statistics with them, identically
on every rank; like BatchNorm it keeps only its input and two [C] vectors for the backward.
Eval mode is plain BatchNorm. Unlike `torch.nn.SyncBatchNorm` it runs on CPU (gloo) as well
as CUDA (NCCL).

Every rank must make the same sequence of training-mode forwards (the trainer's batches have
equal sizes on every rank, which DDP needs anyway). One process never converts anything.
"""
from __future__ import annotations

import torch
from torch import nn


def _layout(x: torch.Tensor):
    """The dims BatchNorm reduces over and the per-channel view shape of an [N, C, ...] input."""
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)


class _GlobalBatchNormFn(torch.autograd.Function):
    """Training-mode BatchNorm over every rank's rows: forward all-reduces [sum, sum of squares,
    count], backward all-reduces [sum dy, sum dy * x_hat] (the gradient of every rank's loss
    through the shared statistics). Saves only the input and two [C] vectors, as BatchNorm."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, eps, group):
        import torch.distributed as dist

        dims, shape = _layout(x)
        c = x.shape[1]
        xf = x.float()
        d = xf - shift.view(shape)  # shifted by the running mean (equal on every rank): exact var
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32)
        stats = torch.cat([d.sum(dims), (d * d).sum(dims), count])
        dist.all_reduce(stats, group=group)
        n = stats[-1]
        mean_d = stats[:c] / n
        var = (stats[c:2 * c] / n - mean_d * mean_d).clamp_min(0.0)
        mean = mean_d + shift
        rstd = torch.rsqrt(var + eps)
        y = (xf - mean.view(shape)) * rstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, rstd, n)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx, dy, _mean, _var, _n):
        import torch.distributed as dist

        x, weight, mean, rstd, n = ctx.saved_tensors
        dims, shape = _layout(x)
        c = x.shape[1]
        xhat = (x.float() - mean.view(shape)) * rstd.view(shape)
        dyf = dy.float()
        local = torch.cat([dyf.sum(dims), (dyf * xhat).sum(dims)])
        d_bias, d_weight = local[:c].clone(), local[c:].clone()  # this rank's rows (DDP sums)
        dist.all_reduce(local, group=ctx.group)
        scale = rstd if weight is None else rstd * weight.float()
        dx = (dyf - (local[:c] / n).view(shape) - xhat * (local[c:] / n).view(shape)) \
            * scale.view(shape)
        if weight is None:
            return dx.to(x.dtype), None, None, None, None, None
        return dx.to(x.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype), None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1d,2d} whose training statistics are those of every rank's rows together."""

    # () -> the process group (a separate one: its collectives never interleave DDP's); a
    # function, so that copy.deepcopy (the key nets) shares the group instead of copying it
    group = staticmethod(lambda: None)

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        shift = (self.running_mean.detach().float() if self.running_mean is not None
                 else torch.zeros(x.shape[1], device=x.device))
        y, mean, var, n = _GlobalBatchNormFn.apply(
            x, self.weight if self.affine else None, self.bias if self.affine else None,
            shift, self.eps, self.group())
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def convert_global_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """`module` with every BatchNorm1d/2d replaced by a `GlobalBatchNorm` holding its
    parameters and buffers (in place for children; the converted root is returned)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=module.weight.device
                              if module.affine else None)
        new.group = lambda: group
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child, group))
    return module
