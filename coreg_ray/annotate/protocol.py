"""The one annotator interface: what the CLIP, LLaVA and simulated annotators have in common.

    ann = make_annotator("clip:ViT-B-32/openai", classes=names)   # coreg_ray.annotate.registry
    ann.load()                                  # once per process / Ray Data actor
    rows = ann.annotate_batch(pixels)           # uint8 [B, H, W, 3] -> votes, candidates, probs
    ann.describe()                              # one line: the spec it was made from

`annotate_batch` returns NumPy arrays: ``votes`` int64 [B, K] (K templates; -1: no vote),
``candidates`` bool [B, C], ``probs`` float32 [B, C] (an annotator may add keys, e.g. LLaVA's
``answers``). The CLIP and LLaVA annotators load their model in the constructor, which the Ray
Data pipeline calls once per actor, so their `load()` has nothing left to do; the simulated
annotators are fitted on labelled images (`fit(images, labels, num_classes)`) before they
annotate, and the paper-like one needs the batch's true `labels` (it simulates mistakes
around the truth).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Annotator(Protocol):
    def load(self) -> "Annotator": ...

    def annotate_batch(self, pixels, **context) -> dict: ...

    def describe(self) -> str: ...


class ModelAnnotator:
    """The protocol's shared part for annotators that hold a model, templates and classes
    (`ClipAnnotator`, `LlavaAnnotator`): the constructor loads the model (one per actor)."""

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self):
        return self

    def describe(self) -> str:
        return self.spec.label


class FittedAnnotator:
    """The protocol's shared part for the simulated annotators (fitted on labelled images)."""

    def load(self):
        return self

    def describe(self) -> str:
        return self.spec

    def _fitted(self) -> None:
        if not getattr(self, "num_classes", None):
            from coreg_ray.errors import CoregError
            raise CoregError(f"{self.describe()}: fit it on labelled images before annotating")


def nchw(pixels):
    """uint8 [B, H, W, 3] (NumPy, the pipeline's decoded batch) -> a torch uint8 [B, 3, H, W]."""
    import torch

    return torch.as_tensor(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()


def table_rows(table) -> dict:
    """An `AnnotationTable` -> the protocol's rows (votes, candidates, probs)."""
    return {"votes": table.votes, "candidates": table.candidates, "probs": table.probs}
