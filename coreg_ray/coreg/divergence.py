"""Training that diverges stops with one line instead of running on NaN.

`check_finite(stats, epoch, nets, lr)` is called at the end of every epoch (`close_epoch`, for
Co-Reg and the baselines), on values already on the host (the epoch's mean losses, synced once
per epoch anyway) plus one reduction over the networks' weights (one device sync per epoch, no
sync per step). A non-finite loss or weight raises `Diverged` before the epoch is checkpointed,
so the checkpoint on disk stays the last finite one.
"""
from __future__ import annotations

import math

from coreg_ray.errors import CoregError

__all__ = ["Diverged", "check_finite"]


class Diverged(CoregError):
    """Training produced a non-finite loss or weight (`epoch`: 0-based)."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


def _weights_finite(nets) -> bool:
    import torch

    flags = [torch.isfinite(p.detach()).all() for n in nets for p in n.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def check_finite(stats: dict, epoch: int, nets=(), lr: float | None = None) -> None:
    """`Diverged` when a loss of the epoch's `stats` or a weight of `nets` is not finite."""
    bad = [k for k, v in stats.items() if k.startswith("loss") and isinstance(v, float)
           and not math.isfinite(v)]
    what = f"the loss ({', '.join(bad)}) is not finite" if bad else None
    if bad == ["loss_division"]:
        what = "the networks' predictions are not finite"
    if what is None and nets and not _weights_finite(nets):
        what = "the weights are not finite"
    if what is None:
        return
    at = f" (lr {lr:.3g} this epoch)" if lr is not None else ""
    raise Diverged(f"training diverged at epoch {epoch + 1}: {what}{at}; the likely cause is "
                   "train.lr too high (or a very small coreg temperature): lower it", epoch)
