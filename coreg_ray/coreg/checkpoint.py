"""Reading and checking Co-Reg checkpoints (`checkpoint.pt`): safe loading, the outline of a
complete checkpoint, and its model and data against this run's; `check_device` for a device
name given on the command line."""
from __future__ import annotations

import torch

from coreg_ray.config import Config
from coreg_ray.coreg.device_data import resolve_device
from coreg_ray.data.tables import describe_classes
from coreg_ray.errors import CoregError
from coreg_ray import safeload

CHECKPOINT = "checkpoint.pt"


# Keys every Co-Reg checkpoint has had; a file without them is truncated or something else.
CHECKPOINT_KEYS = ("epoch", "config", "nets", "key_nets", "opts", "history")


def read_checkpoint(path) -> dict:
    """A checkpoint file, read safely (`safeload`, weights only) and checked in outline: one
    line for a truncated, foreign or incomplete file."""
    state = safeload.load_state(path, "cpu", "checkpoint")
    check_checkpoint(state, str(path))
    return state


def check_checkpoint(state, where: str, fingerprint: dict | None = None,
                     cfg: Config | None = None) -> None:
    """One line if `state` is not a complete Co-Reg checkpoint, was made with another model
    (`cfg`'s model section) or on other data (`fingerprint` of this run's tables, see
    `data_fingerprint`; checkpoints from before fingerprints are not compared)."""
    if not isinstance(state, dict):
        raise CoregError(f"{where}: not a coreg-ray checkpoint (holds a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["epoch"], int) or not isinstance(state["nets"], (list, tuple)) \
            or len(state["nets"]) != 2 or not isinstance(state["config"], dict):
        what = f"missing {', '.join(missing)}" if missing else "malformed"
        raise CoregError(f"{where}: not a complete coreg-ray checkpoint ({what}): truncated or "
                         "from another program; train into a new --output (or without --resume)")
    if cfg is not None:
        made = state["config"].get("model") or {}
        now = cfg.to_dict()["model"]
        diff = [f"model.{k}={made[k]} (this run: {now[k]})" for k in now
                if k in made and made[k] != now[k]]
        if diff:
            raise CoregError(f"{where} was made with {', '.join(diff)}: resume with the run's own "
                             "config (no --config, no --set model.*), or train into a new --output")
    made = state.get("data")
    if fingerprint is not None and isinstance(made, dict):
        diffs = []
        if made.get("rows") != fingerprint["rows"]:
            diffs.append(f"{made.get('rows')} rows, this run {fingerprint['rows']}")
        if made.get("image_size") != fingerprint["image_size"]:
            o, n = made.get("image_size"), fingerprint["image_size"]
            diffs.append(f"{o}x{o} images, this run {n}x{n}")
        if made.get("classes") != fingerprint["classes"]:
            diffs.append(f"{describe_classes(made.get('classes') or [])}, this run "
                         f"{describe_classes(fingerprint['classes'])}")
        if not diffs:
            diffs += [f"other {what}" for key, what in (("ids", "image ids"),
                                                          ("images", "images"),
                                                          ("candidates", "candidate sets"),
                                                          ("candidate_sets", "candidate sets"))
                      if made.get(key) != fingerprint.get(key)
                      and None not in (made.get(key), fingerprint.get(key))]  # images: a shard's
        diffs = list(dict.fromkeys(diffs))  # a sharded run's two candidate keys: said once
        if diffs:
            raise CoregError(f"{where} was made on other data ({'; '.join(diffs)}): resume with "
                             "the inputs it was made on, or train into a new --output")


def check_device(name) -> torch.device:
    """`resolve_device` with a bad name as one line (the values `train.device` accepts)."""
    valid = Config.valid_values()["train.device"][1]
    if not valid.ok(name):
        raise CoregError(f"device {name!r}: not a device (valid: {valid})")
    return resolve_device(name)
