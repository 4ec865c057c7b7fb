"""The annotator registry: a spec's prefix names the annotator (`Annotator` protocol,
`coreg_ray.annotate.protocol`).

    clip:MODEL[/PRETRAINED]      ClipAnnotator (open_clip)             run by run_annotation
    llava:PATH_OR_HF_ID          LlavaAnnotator (vLLM)                 run by run_annotation
    simulated:vlm[,k=v...]       SimulatedVLM (weak-template stand-in) in-process only
    simulated:paper,like=PRESET/DATASET[,k=v...]  or  simulated:paper,partial_acc=P,
        avg_candidates=A,zero_shot=Z[,templates=K]   PaperLikeAnnotator  in-process only

`make_annotator(spec, **kwargs)` builds one: for CLIP and LLaVA the keyword arguments are the
class's (`classes=...`, `templates=...`, ...) and building loads the model (the Ray Data
pipeline builds one per actor); a simulated annotator is returned unfitted (`fit(images,
labels, num_classes)` first). Keys of `simulated:vlm`: templates, per_class, feature_fraction,
seed, features; of `simulated:paper`: like, partial_acc, avg_candidates, zero_shot, templates,
features, seed. The specs the simulated annotators describe themselves with
(`simulated-vlm:...`, `simulated-paper-annotator:...`, as written into annotation tables) are
accepted too, so `make_annotator(a.describe())` rebuilds `a`.

The annotation pipeline (`run_annotation`, Ray Data or local) runs the `pipeline=True` kinds,
CLIP and LLaVA; the simulated annotators need the images' labels, which the pipeline does not
read, so they run in-process (`coreg-ray simulate-annotator`, experiment settings).
`annotator_class(spec)` says which class a spec names without loading anything heavy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from coreg_ray.errors import CoregError


@dataclass(frozen=True)
class AnnotatorKind:
    prefix: str  # the spec starts with PREFIX:
    load_class: Callable[[str], type]  # spec -> its class (heavy dependencies load only here)
    summary: str
    pipeline: bool = False  # run_annotation runs it (Ray Data actors / local engine)
    build: Callable[..., object] | None = None  # (spec, **kwargs) -> annotator; None: cls(spec, **kwargs)


_ANNOTATORS: dict[str, AnnotatorKind] = {}


def register_annotator(prefix: str, *, load_class: Callable[[str], type], summary: str,
                       pipeline: bool = False, build: Callable[..., object] | None = None) -> AnnotatorKind:
    if prefix in _ANNOTATORS:
        raise ValueError(f"annotator prefix {prefix}: registered twice")
    _ANNOTATORS[prefix] = kind = AnnotatorKind(prefix, load_class, summary, pipeline, build)
    return kind


def annotator_prefixes(pipeline: bool | None = None) -> list[str]:
    return [p for p, k in _ANNOTATORS.items() if pipeline is None or k.pipeline == pipeline]


def find_annotator(spec) -> AnnotatorKind | None:
    """The registered kind whose prefix the spec starts with (PREFIX:...), or None."""
    prefix, colon, _ = str(spec).partition(":")
    return _ANNOTATORS.get(prefix) if colon else None


def annotator_kind(spec) -> AnnotatorKind:
    kind = find_annotator(spec)
    if kind is None:
        raise CoregError(f"annotator {spec!r}: unknown kind; write one of "
                         + ", ".join(f"{p}:..." for p in annotator_prefixes()))
    return kind


def annotator_class(spec) -> type:
    """The class a spec names (imports its module; loads no model)."""
    return annotator_kind(spec).load_class(str(spec).strip())


def make_annotator(spec: str, **kwargs):
    """An annotator from its spec (module doc); CLIP and LLaVA load their model here."""
    kind = annotator_kind(spec)
    if kind.build is not None:
        return kind.build(str(spec).strip(), **kwargs)
    return kind.load_class(str(spec).strip())(spec, **kwargs)


# ----------------------------------------------------------------------------- simulated specs
_VLM_KEYS = {"templates": int, "per_class": int, "feature_fraction": float, "seed": int,
             "features": str}
_PAPER_KEYS = {"like": str, "partial_acc": float, "avg_candidates": float, "zero_shot": float,
               "templates": int, "features": str, "seed": int}


def _options(spec: str, body: str, keys: dict) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in keys:
            raise CoregError(f"annotator {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(keys)}")
        try:
            out[key.strip()] = keys[key.strip()](value.strip())
        except ValueError:
            raise CoregError(f"annotator {spec!r}: {item!r}: the value is not a valid "
                             f"{keys[key.strip()].__name__}") from None
    return out


def _simulated_vlm(spec: str, body: str):
    from coreg_ray.annotate.weak_templates import SimulatedVLM

    o = _options(spec, body, _VLM_KEYS)
    return SimulatedVLM(o.get("templates", 8), o.get("per_class", 10),
                        o.get("feature_fraction", 0.5), o.get("seed", 0), o.get("features", "pixels"))


def _paper_like(spec: str, body: str):
    from coreg_ray.annotate.simulated import PaperLikeAnnotator

    o = _options(spec, body, _PAPER_KEYS)
    like = o.pop("like", "")
    try:
        return PaperLikeAnnotator.from_options(o, tuple(like.partition("/")[::2]) if like else None)
    except CoregError as exc:
        raise CoregError(f"annotator {spec!r}: {exc}") from None


def _build_simulated(spec: str, **kwargs):
    if kwargs:
        raise CoregError(f"annotator {spec!r}: a simulated annotator takes its settings in the "
                         f"spec (KEY=VALUE), not {', '.join(kwargs)}")
    prefix, _, body = spec.partition(":")
    if prefix == "simulated-vlm":
        return _simulated_vlm(spec, body)
    if prefix == "simulated-paper-annotator":
        return _paper_like(spec, body)
    which, _, rest = body.partition(",")
    if which.strip() == "vlm":
        return _simulated_vlm(spec, rest)
    if which.strip() == "paper":
        return _paper_like(spec, rest)
    raise CoregError(f"annotator {spec!r}: write simulated:vlm[,KEY=VALUE...] or "
                     "simulated:paper,like=PRESET/DATASET[,KEY=VALUE...]")


def _simulated_class(spec: str) -> type:
    prefix, _, body = spec.partition(":")
    if prefix == "simulated-paper-annotator" or (prefix == "simulated" and body.startswith("paper")):
        from coreg_ray.annotate.simulated import PaperLikeAnnotator
        return PaperLikeAnnotator
    from coreg_ray.annotate.weak_templates import SimulatedVLM
    return SimulatedVLM


# ----------------------------------------------------------------------------- the registrations
def _clip(spec: str = "") -> type:
    from coreg_ray.annotate.clip import ClipAnnotator
    return ClipAnnotator


def _llava(spec: str = "") -> type:
    from coreg_ray.annotate.llava import LlavaAnnotator
    return LlavaAnnotator


register_annotator("clip", load_class=_clip, pipeline=True,
                   summary="CLIP zero-shot over prompt templates (open_clip): clip:MODEL[/PRETRAINED]")
register_annotator("llava", load_class=_llava, pipeline=True,
                   summary="LLaVA answers over prompt templates (vLLM): llava:PATH_OR_HF_ID")
register_annotator("simulated", load_class=_simulated_class, build=_build_simulated,
                   summary="a simulated annotator (a STAND-IN, not a VLM): simulated:vlm or "
                           "simulated:paper,like=PRESET/DATASET")
register_annotator("simulated-vlm", load_class=_simulated_class,
                   build=_build_simulated, summary="as SimulatedVLM describes itself")
register_annotator("simulated-paper-annotator", load_class=_simulated_class,
                   build=_build_simulated, summary="as PaperLikeAnnotator describes itself")
