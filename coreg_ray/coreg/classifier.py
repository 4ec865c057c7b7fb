"""Inference with a trained model (`model.pt`, written by `CoReg.export`): `Classifier` and the
check of a model file's contents."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coreg_ray.coreg.checkpoint import check_device
from coreg_ray.coreg.device_data import resize_images
from coreg_ray.coreg.models import build_model
from coreg_ray.data.tables import ImageTable, classes_differ, describe_classes
from coreg_ray.errors import CoregError
from coreg_ray import safeload


class Classifier:
    """A trained model (`model.pt`): predicts with the sum of both networks' logits."""

    # what `CoReg.export` writes; a file with the tag but without these is incomplete
    KEYS = ("backbone", "num_classes", "classes", "image_size", "proj_dim", "mean", "std", "nets")

    def __init__(self, state: dict, device="auto", source: str = "model"):
        check_model_state(state, source)
        self.device = check_device(device)
        self.state = state
        self.source = source
        self.classes = list(state["classes"])
        self.image_size = state["image_size"]
        self.nets = []
        try:
            for sd in state["nets"]:
                net = build_model(state["backbone"], state["num_classes"], state["image_size"],
                                  state["proj_dim"]).to(self.device)
                net.load_state_dict(sd)
                self.nets.append(net.eval())
            self.mean = torch.tensor(state["mean"], device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(state["std"], device=self.device).view(1, -1, 1, 1)
        except CoregError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise CoregError(f"{source}: its weights do not fit its {state['backbone']} model "
                             f"({type(exc).__name__}: {first})") from None

    @classmethod
    def load(cls, path, device="auto") -> "Classifier":
        path = Path(path)
        check_device(device)  # a bad --device is one line before the file is even read
        state = safeload.load_state(path, "cpu", "model")  # one line for any unreadable file
        return cls(state, device, str(path))

    def check_table(self, table: ImageTable) -> None:
        """One line if the table is not one this model can be scored on: no labels, or other
        classes (count, or names where both name them). Other image sizes are resized (a note
        says so)."""
        if table.labels is None:
            raise CoregError(f"{table.source}: no labels to evaluate against")
        if classes_differ(self.classes, table.classes):
            raise CoregError(f"{table.source}: {describe_classes(table.classes)}, but "
                             f"{self.source} was trained for {describe_classes(self.classes)}: "
                             "evaluate it on a table of its classes")
        if table.image_size != self.image_size:
            from coreg_ray.errors import note

            note(f"{table.source}: images are {table.image_size}x{table.image_size}, "
                 f"{self.source} was trained on {self.image_size}x{self.image_size}: resized")

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        images = resize_images(images_uint8, self.image_size)
        out = []
        for chunk in images.split(batch_size):
            x = (chunk.to(self.device).float() / 255.0 - self.mean) / self.std
            out.append(sum(net(x).float() for net in self.nets).cpu())
        return torch.cat(out)

    def top_k(self, images_uint8: torch.Tensor, k: int):
        """(probabilities, class indices) [B, k] of the k most probable classes, best first."""
        probs = self.logits(images_uint8, max(1, len(images_uint8))).float().softmax(1)
        return probs.topk(min(int(k), probs.shape[1]), dim=1)

    def predict(self, images_uint8: torch.Tensor) -> np.ndarray:
        return self.logits(images_uint8).argmax(1).numpy()

    def evaluate(self, table: ImageTable) -> dict:
        self.check_table(table)
        pred = self.predict(table.images)
        per_class = {self.classes[c]: float((pred[table.labels == c] == c).mean())
                     for c in range(len(self.classes)) if (table.labels == c).any()}
        return {"accuracy": float((pred == table.labels).mean()), "images": len(table),
                "per_class_accuracy": per_class}


def pool_prep(size: int) -> dict:
    """How encoded images are decoded for a model (`annotate.imageio.decode_batch_bytes`
    settings): RGB, letterboxed to its size as `load_image_table` does."""
    return {"size": int(size), "resize_mode": "longest", "interpolation": "bicubic",
            "fill_color": 0}


def check_model_state(state, source: str = "model") -> None:
    """One line unless `state` is a complete `model.pt` (`CoReg.export`)."""
    if not isinstance(state, dict) or state.get("format") != "coreg-ray/1":
        raise CoregError(f"{source}: not a coreg-ray model (expected format coreg-ray/1)")
    missing = [k for k in Classifier.KEYS if k not in state]
    if missing:
        raise CoregError(f"{source}: incomplete coreg-ray model (missing {', '.join(missing)})")
    classes, nets = state["classes"], state["nets"]
    bad = None
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        bad = "classes is not a list of names"
    elif not isinstance(state["num_classes"], int) or state["num_classes"] != len(classes):
        bad = f"num_classes {state['num_classes']!r} but {len(classes)} class names"
    elif not isinstance(state["image_size"], int) or state["image_size"] < 1:
        bad = f"image_size {state['image_size']!r}"
    elif not isinstance(nets, (list, tuple)) or not nets or not all(isinstance(n, dict) for n in nets):
        bad = "nets is not a list of state dicts"
    if bad:
        raise CoregError(f"{source}: malformed coreg-ray model ({bad})")
