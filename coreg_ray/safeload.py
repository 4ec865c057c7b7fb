"""Loading `model.pt`, `checkpoint.pt` and other saved state without running code from the file.

`torch.load(..., weights_only=False)` unpickles arbitrary objects, so a planted `model.pt` or
`checkpoint.pt` runs whatever its pickle says (`evaluate --model someone_elses.pt`,
`train --resume`). Every load goes through `load_state`: `weights_only=True`, i.e. tensors,
containers and plain Python values only; anything else must be named in `allow` (only the
benchmark's table cache needs that). What our own files hold was checked: a Co-Reg checkpoint
and `model.pt` contain nothing outside that set (`torch.get_rng_state()` is a plain tensor), so
the default allow-list is empty.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

from coreg_ray.errors import CoregError


def numpy_array_types() -> list:
    """The globals a pickled NumPy array refers to (for `allow`): the array reconstructor,
    ndarray, dtype and the concrete dtype classes of bool/int/uint/float arrays."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    dtypes = {type(np.dtype(c)) for c in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
                                         "f2", "f4", "f8")}
    return [reconstruct, np.ndarray, np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]


def _refused_global(exc: BaseException) -> str | None:
    """The global the weights-only unpickler refused (e.g. 'builtins.open'), if it says so."""
    m = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(exc))
    return m.group(1) if m else None


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _file_kind(p: Path) -> str | None:
    """What a file that is not a torch.save archive is, when it can be told from its first
    bytes (a TorchScript or exported program, a plain pickle), else None."""
    try:
        with open(p, "rb") as f:
            head = f.read(16)
        if head[:2] == b"PK" and zipfile.is_zipfile(p):
            names = zipfile.ZipFile(p).namelist()
            if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names):
                return ("a TorchScript program (such as `coreg-ray export --format torchscript` "
                        "writes), not a model.pt written by train: load it with torch.jit.load")
            return None
        if head[:1] == b"\x80" and _LEGACY_MAGIC not in head:  # (legacy torch.save: a magic)
            return "a plain pickle file, not one torch.save wrote (refused: it is not loaded)"
    except (OSError, zipfile.BadZipFile):
        return None
    return None


def load_state(path, map_location="cpu", what: str = "model/checkpoint",
               allow: Iterable = ()) -> Any:
    """`torch.load(path, map_location, weights_only=True)`, with the types in `allow` added to
    the weights-only allow-list for this call. Any failure is one `CoregError` line naming the
    file: a refused payload ("... or it contains code: refused"), or an unreadable file."""
    import torch

    from coreg_ray.outputs import check_local

    check_local(path, what)
    p = Path(path)
    if not p.is_file():
        raise CoregError(f"{what} not found: {p}" if not p.exists() else f"{p}: not a file ({what})")
    kind = _file_kind(p)
    if kind is not None:  # say what it is, rather than "truncated"
        raise CoregError(f"{p}: not a coreg-ray {what}: {kind}")
    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's and the unpickler's: the line says it all
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused something
        if re.search(r"Unsupported operand|invalid load key", str(exc)):  # not a pickle at all
            raise CoregError(f"{p}: not a coreg-ray {what}: not a file torch wrote") from None
        name = _refused_global(exc)
        detail = f" (it would load {name})" if name else ""
        raise CoregError(f"{p}: not a coreg-ray {what}, or it contains code: refused{detail}") from None
    except Exception as exc:  # truncated, not a torch file, ...
        first = " ".join(str(exc).split()).split(". ")[0][:160] or type(exc).__name__
        raise CoregError(f"{p}: not a readable coreg-ray {what}: truncated, or not a file "
                         f"torch wrote ({first})") from None
