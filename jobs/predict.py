"""Ray job entrypoint for batch prediction: the `coreg-ray predict` command, unchanged arguments.

    ray job submit --working-dir . -- python jobs/predict.py \
        --model /mnt/shared/runs/cifar10/model.pt --images /mnt/shared/pool/ \
        --output /mnt/shared/pool-predictions.parquet --actors 8

Inside a job `ray.init()` joins the cluster: one GPU actor per GPU (or `--actors` CPU actors).
Finished shards are kept in OUTPUT.parts/, so submitting the same job again after a failure
computes only the missing ones.
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("predict", sys.argv[1:]))
