"""What a Co-Reg step passes between its phases (`CoReg.train_net`): the stacked views
[x1, x2, u1, u2] by name, the targets in the same layout, the MixUp batch, the forward's outputs.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Views(NamedTuple):
    """A step's four views in one tensor, [x1, x2, u1, u2]: two views of the P batch (bx rows
    each), then two of the U batch (bu rows each; bu may be 0). Augmentations run on the whole
    stack at once; the named parts are slices of it."""
    stacked: torch.Tensor
    bx: int
    bu: int

    @classmethod
    def of(cls, x: torch.Tensor, u: torch.Tensor,
           make: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Views:
        """[x, x, u, u] stacked, through `make` (an augmentation: its own random view per row)."""
        stacked = torch.cat([x, x, u, u])
        return cls(make(stacked) if make else stacked, len(x), len(u))

    def like(self, t: torch.Tensor) -> Views:
        """Another tensor in this layout (per-view probabilities, say)."""
        return Views(t, self.bx, self.bu)

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.stacked.split([self.bx, self.bx, self.bu, self.bu])

    @property
    def x1(self) -> torch.Tensor:
        return self.stacked[:self.bx]

    @property
    def x2(self) -> torch.Tensor:
        return self.stacked[self.bx:2 * self.bx]

    @property
    def u1(self) -> torch.Tensor:
        return self.stacked[2 * self.bx:2 * self.bx + self.bu]

    @property
    def u2(self) -> torch.Tensor:
        return self.stacked[2 * self.bx + self.bu:]

    @property
    def u(self) -> torch.Tensor:
        """Both U views, [u1, u2]."""
        return self.stacked[2 * self.bx:]

    @property
    def first(self) -> torch.Tensor:
        """Every sample's first view, [x1, u1] (the contrastive query)."""
        return torch.cat([self.x1, self.u1])

    @property
    def second(self) -> torch.Tensor:
        """Every sample's second view, [x2, u2] (the contrastive key)."""
        return torch.cat([self.x2, self.u2])


class Targets(NamedTuple):
    """A step's targets, each view getting its sample's: soft targets and P flags in the views'
    layout (U rows and gated-out P rows are not P), hard labels of [x, u], and the trained net's
    projection of x1 (weak), which the prototypes follow."""
    soft: Views
    is_p: Views
    hard: torch.Tensor
    z_weak: torch.Tensor


class Mixed(NamedTuple):
    """The strong views, and their MixUp (inputs and targets) over P and U together."""
    strong: Views
    inputs: torch.Tensor
    targets: torch.Tensor


class Outputs(NamedTuple):
    """The forward's outputs in fp32: the mixed batch's logits and projections; the query net's
    on the first strong views (None without the contrastive branch or candidate term); the key
    net's projections of the second strong views (None without the contrastive branch)."""
    logits: torch.Tensor
    z: torch.Tensor
    logits_q: torch.Tensor | None
    zq: torch.Tensor | None
    k: torch.Tensor | None
