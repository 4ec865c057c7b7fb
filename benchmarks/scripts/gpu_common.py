"""What the one-call GPU benchmarks share: short-run schedule, table loading, and a runner that
starts child processes (at most `parallel` at once) and stops them at a deadline.

Only torch, numpy, pyarrow, Pillow and scikit-learn are needed (the device machine has no Ray or
MLflow); scripts run from the checkout (each puts the repository root on sys.path). `REPO`: the
repository root, for default paths; `SCRATCH`: the system's temporary folder, for the decoded
tables and the children's per-epoch files.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
SCRATCH = Path(tempfile.gettempdir())
sys.path.insert(0, str(REPO))

from coreg_ray.data import load_image_table, read_annotations  # noqa: E402


def short_run_overrides(epochs: int, warmup: int) -> list[str]:
    """The paper's delays are sized for 750 post-warm-up epochs; scale them to a short run."""
    post = max(epochs - warmup, 1)
    return [f"train.epochs={epochs}", f"train.warmup_epochs={warmup}",
            f"coreg.feature_delay={max(1, post // 10)}",
            f"coreg.rampup_epochs={min(16, max(2, post // 4))}"]


def restrict(ann, table, source):
    """Rows of `ann` for the table's ids (the table may be --limit'ed), in its order."""
    return ann.subset(np.flatnonzero(np.isin(ann.ids, table.ids))).align_to(table.ids, source)


def load_annotations(path, table):
    return restrict(read_annotations(path, table.num_classes), table, path)


def decode_tables(data: str, limit, cache: str):
    """Decode train/test once in the driver; children load the uint8 tensors from `cache`."""
    t0 = time.perf_counter()
    train = load_image_table(f"{data}/train.parquet", limit=limit)
    test = load_image_table(f"{data}/test.parquet", limit=limit)
    seconds = time.perf_counter() - t0
    torch.save({"train": train, "test": test}, cache)
    return train, test, seconds


def load_tables(cache: str) -> dict:
    """What `decode_tables` saved, loaded without running code from the file: weights-only,
    with the ImageTable dataclass and NumPy arrays (ids, labels) allow-listed."""
    from coreg_ray.data.tables import ImageTable
    from coreg_ray.safeload import load_state, numpy_array_types

    return load_state(cache, "cpu", "benchmark table cache", allow=[ImageTable, *numpy_array_types()])


def run_children(cmds: dict, deadline: float, log, parallel: int | None = None,
                 env: dict | None = None, t_start: float | None = None) -> dict:
    """Run `cmds` ({key: argv}) in order, at most `parallel` at once (all if None); kill what
    is still running at `deadline` (perf_counter). Returns {key: {"returncode", "wall"}}, with
    returncode None for a killed run and a missing key for one never started."""
    pending = list(cmds.items())
    running: dict = {}
    done: dict = {}
    limit = parallel or len(cmds)
    t_start = t_start or time.perf_counter()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    while (pending or running) and time.perf_counter() < deadline:
        while pending and len(running) < limit:
            key, argv = pending.pop(0)
            running[key] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             env=full_env), time.perf_counter())
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                done[key] = {"returncode": proc.returncode, "wall": round(time.perf_counter() - t0, 1)}
                print(f"{key}: rc={proc.returncode} in {done[key]['wall']} s "
                      f"(t={time.perf_counter() - t_start:.0f} s)", flush=True)
                del running[key]
        time.sleep(1)
    for key, (proc, t0) in running.items():
        proc.kill()
        proc.wait()
        done[key] = {"returncode": None, "wall": round(time.perf_counter() - t0, 1)}
        print(f"{key}: stopped at the budget", flush=True)
    return done
