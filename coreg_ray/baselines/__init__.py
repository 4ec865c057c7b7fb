"""Baselines of the paper's comparisons (issue #5), each a `Method` driven by `BaselineTrainer`.

`METHODS` maps a method name to its class; `coreg_ray.methods.run_method` is the one entry point
for every method, Co-Reg and its ablations included.
"""
from __future__ import annotations

from coreg_ray.baselines.base import BaselineTrainer, Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name} registered twice")
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    # import for the side effect of registering; each module holds related methods
    from coreg_ray.baselines import pico, pll  # noqa: F401


_load_all()

__all__ = ["METHODS", "BaselineTrainer", "Method", "register"]
