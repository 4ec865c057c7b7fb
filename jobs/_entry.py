"""Shared by the job entrypoints: make the submitted working directory importable (so a job runs
the code it was submitted with, even where the project is not installed) and run a CLI command."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run(command: str, argv: list[str]) -> int:
    from coreg_ray.cli import main

    return main([command, *argv])
