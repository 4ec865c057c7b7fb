import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits():
    from coreg_ray.data import load_image_table

    return load_image_table("digits:train"), load_image_table("digits:test")


def tiny_config(**over):
    from coreg_ray.config import Config

    base = {"model.backbone": "mlp", "data.hflip": False, "train.epochs": 6,
            "train.warmup_epochs": 2, "train.batch_size": 64, "train.warmup_batch_size": 128,
            "coreg.feature_delay": 1, "coreg.queue_size": 256, "tracking.mlflow": False}
    base.update(over)
    return Config.load(overrides=[f"{k}={v}" for k, v in base.items()])
