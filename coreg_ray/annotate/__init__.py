"""Annotation stage: prompt templates, the CLIP annotator (open_clip), the LLaVA annotator
(vLLM, separate environment), the simulated stand-ins and the Ray Data pipeline. All annotators
follow one protocol (`protocol.Annotator`) and are made from their spec by
`registry.make_annotator` (`clip:`, `llava:`, `simulated:`).

Heavy dependencies (open_clip, Ray, vLLM) are imported only when the names that need them are used.
"""
from coreg_ray.annotate.templates import (IMAGENET_TEMPLATES, SMALL_TEMPLATES, gtsrb_classes,
                                          load_templates, resolve_classes, resolve_templates,
                                          svhn_classes)

__all__ = ["IMAGENET_TEMPLATES", "LLAVA_TEMPLATES", "SMALL_TEMPLATES", "Annotator", "AnswerParser",
           "ClipAnnotator", "LlavaAnnotator", "LlavaOptions", "annotate_table", "annotator_class",
           "gtsrb_classes", "load_templates", "make_annotator", "parse_clip_spec",
           "parse_llava_spec", "register_annotator", "resolve_classes", "resolve_templates",
           "run_annotation", "svhn_classes"]


def __getattr__(name):  # lazy: open_clip and Ray load only when used
    if name in ("ClipAnnotator", "annotate_table", "parse_clip_spec"):
        from coreg_ray.annotate import clip
        return getattr(clip, name)
    if name in ("LLAVA_TEMPLATES", "AnswerParser", "LlavaAnnotator", "LlavaOptions",
                "parse_llava_spec"):
        from coreg_ray.annotate import llava
        return getattr(llava, name)
    if name in ("Annotator", "annotator_class", "make_annotator", "register_annotator"):
        from coreg_ray.annotate import protocol, registry
        return getattr(protocol if name == "Annotator" else registry, name)
    if name == "run_annotation":
        from coreg_ray.annotate.pipeline import run_annotation
        return run_annotation
    raise AttributeError(name)
