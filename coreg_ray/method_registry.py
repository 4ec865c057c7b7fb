"""The one method registry (the timm habit): every method of the comparisons is registered once,
with its short table label and its one-line description, by `register_method`.

    register_method("coreg", label="Co-Reg", description="Co-Reg (paper)", kind="coreg",
                    target=[])                                      # a call
    @register_method("cc", label="CC", kind="baseline")             # or a decorator: the
    class CC(Method): ...                                           # docstring's first line
                                                                    # is the description
Kinds, in the order `method_names()` lists them: `annotator` (zero_shot: the annotator's own
accuracy), `coreg` (the Co-Reg trainer with switches: its ablations, warm-up only, DivideMix;
the target is the list of config overrides, None for warm-up only), `baseline` (a
`coreg_ray.baselines.Method` subclass), `fewshot` (CoOp / LoRA on the annotator itself).

This module holds the table and imports nothing of the package, so every module can register
here without an import cycle; `coreg_ray.methods` registers the Co-Reg variants, zero-shot and
the few-shot methods and loads the baselines (`coreg_ray.methods.method_names()` is the full
list). The old names are views of this table: `methods.COREG_VARIANTS`, `methods.FEWSHOT`,
`baselines.METHODS`, `experiment.table.SHORT_LABELS`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("annotator", "coreg", "baseline", "fewshot")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    label: str  # the short row label of result tables
    description: str  # one line
    kind: str  # one of KINDS
    target: Any = None  # what runs it (see the module doc), bound by the decorator form


_REGISTRY: dict[str, MethodInfo] = {}


def _first_line(obj) -> str:
    return (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]


def register_method(name: str, *, label: str, kind: str, description: str | None = None,
                    target: Any = None) -> Callable:
    """Register method `name` now; returns a decorator that binds the decorated object as its
    target (and, without `description`, takes the docstring's first line). A name registered
    twice, or an unknown kind, is a ValueError."""
    if kind not in KINDS:
        raise ValueError(f"method {name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if name in _REGISTRY:
        raise ValueError(f"method {name} registered twice")
    _REGISTRY[name] = MethodInfo(name, label, description or "", kind, target)

    def bind(obj):
        if getattr(obj, "name", name) != name and isinstance(obj, type):
            raise ValueError(f"method {name}: registered on {obj.__name__}, whose name is {obj.name!r}")
        info = _REGISTRY[name]
        _REGISTRY[name] = dataclasses.replace(info, target=obj,
                                              description=info.description or _first_line(obj))
        return obj

    return bind


def registered(kind: str | None = None) -> list[MethodInfo]:
    """The registrations made so far (of one kind), in `KINDS` order, then registration order."""
    infos = [i for i in _REGISTRY.values() if kind is None or i.kind == kind]
    return sorted(infos, key=lambda i: KINDS.index(i.kind))  # stable: registration order kept


def lookup(name: str) -> MethodInfo | None:
    return _REGISTRY.get(name)


class MethodView(Mapping):
    """A read-only, live mapping name -> `value(info)` over the registrations (of one kind); the
    old parallel tables (`COREG_VARIANTS`, `METHODS`, `SHORT_LABELS`) are such views. `load`
    runs before each read (to import the modules that register)."""

    def __init__(self, value: Callable[[MethodInfo], Any], kind: str | None = None,
                 load: Callable[[], None] | None = None):
        self._value, self._kind, self._load = value, kind, load

    def _infos(self) -> dict[str, MethodInfo]:
        if self._load is not None:
            self._load()
        return {i.name: i for i in registered(self._kind)}

    def __getitem__(self, name):
        return self._value(self._infos()[name])

    def __iter__(self):
        return iter(self._infos())

    def __len__(self):
        return len(self._infos())

    def __contains__(self, name):
        return name in self._infos()

    def __repr__(self):
        return f"{type(self).__name__}({dict(self)!r})"
