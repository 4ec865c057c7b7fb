"""The few collective operations the trainer needs, so one loop serves 1 process or N.

`LocalComm` is the identity (one process). `TorchDistComm` uses an initialised
`torch.distributed` process group (Ray Train's `TorchTrainer` sets one up; `torchrun` too).
"""
from __future__ import annotations

import torch


class LocalComm:
    rank = 0
    world_size = 1

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank along dim 0 (rank order)."""
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_rows(self, t: torch.Tensor, counts) -> torch.Tensor:
        """Every rank's `t` (rank r holds counts[r] rows: ranks may differ by a few) concatenated
        in rank order: with contiguous shards (`coreg_ray.data.shards`), the global row order.
        For small per-sample vectors only (the N scalar division losses), never N x C tables."""
        return t

    def mean_rows(self, t: torch.Tensor, n_total: int) -> torch.Tensor:
        """The mean over every rank's rows of `t` ([rows, C] -> [C]); n_total rows in all."""
        return t.mean(0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running stats), as DDP does at the start
        of each forward: after a rank's last local update they differ across ranks."""

    def barrier(self):
        pass


class TorchDistComm(LocalComm):
    def __init__(self, find_unused_parameters: bool = True):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistComm needs an initialised torch.distributed group")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.find_unused = find_unused_parameters
        # BatchNorm's own group (`coreg_ray.coreg.sync_bn`): its collectives, forward and
        # backward, never interleave with DDP's gradient buckets on the default group
        self.bn_group = dist.new_group() if self.world_size > 1 else None

    def all_gather(self, t):
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)

    def all_reduce_sum(self, t):
        t = t.clone()
        self.dist.all_reduce(t)
        return t

    def all_reduce_min(self, t):
        t = t.clone()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return t

    def all_reduce_max(self, t):
        t = t.clone()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t

    def gather_rows(self, t, counts):
        if self.world_size == 1:
            return t
        most = max(counts)
        pad = torch.zeros((most - len(t),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        parts = self.all_gather(torch.cat([t, pad])).split(most)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def mean_rows(self, t, n_total):
        if self.world_size == 1:  # one process: exactly what LocalComm computes
            return t.mean(0)
        return (self.all_reduce_sum(t.double().sum(0)) / n_total).to(t.dtype)

    def wrap(self, model):
        if self.world_size == 1:  # nothing to synchronise: the model as one process trains it
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        # The projector is idle in warm-up: DDP must tolerate unused parameters.
        return DDP(model, device_ids=ids, find_unused_parameters=self.find_unused)

    def sync_buffers(self, model):
        if self.world_size == 1:
            return
        model = getattr(model, "module", model)
        for buf in model.buffers():
            self.dist.broadcast(buf, src=0)

    def barrier(self):
        self.dist.barrier()
