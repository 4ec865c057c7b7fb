"""Annotation stage: prompt templates, the CLIP annotator (open_clip), the LLaVA annotator
(vLLM, separate environment) and the Ray Data pipeline.

Heavy dependencies (open_clip, Ray, vLLM) are imported only when the names that need them are used.
"""
from coreg_ray.annotate.templates import (IMAGENET_TEMPLATES, SMALL_TEMPLATES, gtsrb_classes,
                                          load_templates, resolve_classes, resolve_templates,
                                          svhn_classes)

__all__ = ["IMAGENET_TEMPLATES", "LLAVA_TEMPLATES", "SMALL_TEMPLATES", "AnswerParser",
           "ClipAnnotator", "LlavaAnnotator", "LlavaOptions", "annotate_table", "gtsrb_classes",
           "load_templates", "parse_clip_spec", "parse_llava_spec", "resolve_classes",
           "resolve_templates", "run_annotation", "svhn_classes"]


def __getattr__(name):  # lazy: open_clip and Ray load only when used
    if name in ("ClipAnnotator", "annotate_table", "parse_clip_spec"):
        from coreg_ray.annotate import clip
        return getattr(clip, name)
    if name in ("LLAVA_TEMPLATES", "AnswerParser", "LlavaAnnotator", "LlavaOptions",
                "parse_llava_spec"):
        from coreg_ray.annotate import llava
        return getattr(llava, name)
    if name == "run_annotation":
        from coreg_ray.annotate.pipeline import run_annotation
        return run_annotation
    raise AttributeError(name)
