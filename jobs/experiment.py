"""Ray job entrypoint for experiments: the `coreg-ray experiment` command, unchanged arguments.

    ray job submit --working-dir . -- python jobs/experiment.py \
        --config configs/exp-table1-clip-vitb32.yaml --output /mnt/shared/runs/table1-b32

Inside a job `ray.init()` joins the cluster and each (setting, method, shots, seed) run is a Ray
task with the experiment's `resources`; MLflow logs to $MLFLOW_TRACKING_URI. The job runs in a
copy of the working directory: give data and annotation paths that every node can read
(absolute, shared storage) and an --output on shared storage. Submitting the same command again
resumes: runs already in OUTPUT/results.jsonl are skipped.
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("experiment", sys.argv[1:]))
