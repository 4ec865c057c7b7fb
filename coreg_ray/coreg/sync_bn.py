"""BatchNorm over every rank's batch (sharded training), on any device and backend.

With W ranks each holding batch / W rows, per-rank BatchNorm normalises by statistics of a
W times smaller batch than one process would, and its running statistics follow rank 0's
rows only: the model trained is not the one a single process trains. `GlobalBatchNorm`
computes the training-mode mean and variance over the rows of every rank (one all-reduce of
[sum, sum of squares, count] per call, differentiable, so gradients flow through the shared
statistics as in one process) and updates the running statistics with them, identically on
every rank. Eval mode is plain BatchNorm. Unlike `torch.nn.SyncBatchNorm` it runs on CPU
(gloo) as well as CUDA (NCCL).

Every rank must make the same sequence of training-mode forwards (the trainer's batches have
equal sizes on every rank, which DDP needs anyway). One process never converts anything.
"""
from __future__ import annotations

import torch
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's
    loss depends on every rank's rows through the shared statistics)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


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
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        # shifted sums (the shift: the running mean, equal on every rank) keep var exact in fp32
        shift = self.running_mean.detach().view(shape) if self.running_mean is not None else 0.0
        d = xf - shift
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=torch.float32)
        stats = _AllReduceSum.apply(torch.cat([d.sum(dims), (d * d).sum(dims), count]),
                                    self.group())
        c = x.shape[1]
        n = stats[-1]
        mean_d = stats[:c] / n
        var = (stats[c:2 * c] / n - mean_d * mean_d).clamp_min(0.0)
        mean = mean_d + (shift.view(-1) if torch.is_tensor(shift) else 0.0)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


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
