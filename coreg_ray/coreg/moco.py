"""The MoCo queue of Co-Reg's contrastive branch: key features with their pseudo-labels and
P/U flags, a ring buffer filled every post-warm-up step.

Co-Reg's queues start as the reference's do (`random`): Gaussian features with each of the d
columns normalised (so every slot's feature is short, about sqrt(d/Q) long, and its similarity
with a query small), a uniformly random label and a random P/U flag per slot (their flags are
Gaussian weights; here a slot is P where that Gaussian is positive). Why match it: the
random slots matter only while some are still in the queue when the contrastive loss switches
on (`coreg.feature_delay` epochs after the warm-up, while the queue fills from the first
post-warm-up step); once the keys of those epochs have overwritten every slot, a random and an
empty start give the same run bit for bit (tests/test_reference_bookkeeping.py), and where they
have not, the reference's behaviour is the one the paper's numbers were made with.
PiCO's queue here starts `empty` (label -1: a slot no anchor sees; a documented simplification
of that baseline)."""
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

    @classmethod
    def random(cls, size, dim, num_classes, device, seed: int):
        """The reference's start, drawn from a generator of its own (`seed`), so no other
        random stream of the run moves."""
        g = torch.Generator().manual_seed(seed)
        feats = torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=0)
        labels = torch.randint(num_classes, (size,), generator=g)
        is_p = torch.randn(size, generator=g) > 0
        return cls(feats.to(device), labels.to(device), is_p.to(device))

    def push(self, feats, labels, is_p):
        """Write the keys at the pointer, wrapping round; of more keys than slots only the last
        `size` are written (as one key after another would leave them: an index write with
        repeated slots keeps an arbitrary one, which made runs differ)."""
        n, size = feats.shape[0], self.feats.shape[0]
        start = self.ptr
        if n > size:
            start, feats, labels, is_p = ((self.ptr + n - size) % size, feats[-size:],
                                          labels[-size:], is_p[-size:])
        idx = (start + torch.arange(len(feats), device=feats.device)) % size
        self.feats[idx] = feats.float()
        self.labels[idx] = labels
        self.is_p[idx] = is_p
        self.ptr = (self.ptr + n) % size

    def state(self):
        return {"feats": self.feats, "labels": self.labels, "is_p": self.is_p, "ptr": self.ptr}
