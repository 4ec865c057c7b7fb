"""Checks and messages of the command line that are about the user's files and machine, not
about one command: output tables that must not be inputs (nor replace a file that is not a
table), the `--device` a command was given, and what an interrupted stream keeps."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from coreg_ray.errors import CoregError, Terminated
from coreg_ray.outputs import check_outputs_not_inputs, check_replaceable_table


def table_outputs(outputs: dict, inputs: dict) -> None:
    """Before anything is read: no output table ({flag: path}) is, or lies inside, an input,
    and none replaces an existing file that is not a Parquet table."""
    check_outputs_not_inputs(outputs, inputs)
    for what, path in outputs.items():
        if path is not None:
            check_replaceable_table(path, what)


@contextlib.contextmanager
def shards_kept_on_interrupt(output):
    """Ctrl-C / SIGTERM in a resumable stream (annotate, predict): one line saying what was
    kept (the finished shards in OUTPUT.parts) and that the same command continues."""
    try:
        yield
    except KeyboardInterrupt as exc:
        from coreg_ray.streaming import has_shards

        parts = Path(f"{output}.parts")
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if has_shards(parts):
            n = sum(1 for _ in parts.rglob("shard-*.parquet"))
            print(f"{what}: {n} finished shard(s) kept in {parts}; the same command continues "
                  "from them", file=sys.stderr)
        else:
            print(f"{what}: no shard had finished, nothing was kept", file=sys.stderr)
        raise


def check_device_flag(device: str, flag: str = "--device") -> None:
    """One line naming the option the user gave when its device is not on this machine."""
    if not device.startswith(("cuda", "mps")):
        return
    import torch

    if device.startswith("mps"):
        if not torch.backends.mps.is_available():
            raise CoregError(f"{flag} {device}: no MPS device is available (use --device cpu "
                             "or auto)")
        return
    if not torch.cuda.is_available():
        raise CoregError(f"{flag} {device}: no CUDA device is available (use --device cpu or "
                         "auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise CoregError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_train_flags(args) -> None:
    """`train`'s flags that exclude or need each other: one line each."""
    if args.resume and args.overwrite:
        raise CoregError("--resume continues the run in --output, --overwrite replaces it: "
                         "give one of them")
    if args.plan and not args.workers:
        raise CoregError("--plan plans a Ray Train run: give --workers N (and --gpus-per-worker)")
