"""Baselines of the paper's comparisons (issue #5), each a `Method` driven by `BaselineTrainer`.

Each baseline registers itself where it is defined, with its table label, in the one method
registry (`coreg_ray.method_registry.register_method(..., kind="baseline")`); `METHODS` is that
registry's view name -> `Method` class. `coreg_ray.methods.run_method` is the one entry point
for every method, Co-Reg and its ablations included.
"""
from __future__ import annotations

from coreg_ray.baselines import pico, pll  # noqa: F401  (imported to register their methods)
from coreg_ray.baselines.base import BaselineTrainer, Method
from coreg_ray.method_registry import MethodView, register_method

METHODS = MethodView(lambda info: info.target, kind="baseline")


def register(cls: type[Method], label: str | None = None) -> type[Method]:
    """Register a baseline class under its `name` (label: the name unless given)."""
    return register_method(cls.name, label=label or cls.name, kind="baseline")(cls)


__all__ = ["METHODS", "BaselineTrainer", "Method", "register"]
