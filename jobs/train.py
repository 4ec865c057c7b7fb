"""Ray job entrypoint for training: the `coreg-ray train` command, unchanged arguments.

    ray job submit --working-dir . -- python jobs/train.py \
        --images s3://bucket/train.parquet --annotations s3://bucket/ann.parquet \
        --config configs/cifar10-clip.yaml --workers 4 --gpus-per-worker 1 \
        --storage-path s3://bucket/ray --output /mnt/shared/runs/cifar10

Inside a job `ray.init()` joins the cluster; MLflow logs to $MLFLOW_TRACKING_URI (the head's
tracking server on a cluster launched with cluster.yaml).
"""
import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))
