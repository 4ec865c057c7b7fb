"""Ray job entrypoint for sweeps: the `coreg-ray tune` command, unchanged arguments.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep-digits.yaml
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("tune", sys.argv[1:]))
