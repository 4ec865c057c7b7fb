"""The MoCo queue of Co-Reg's contrastive branch: key features with their pseudo-labels and
P/U flags, a ring buffer filled every post-warm-up step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
