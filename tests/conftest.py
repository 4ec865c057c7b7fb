"""Fixtures shared by the test modules: the digits tables (with synthetic candidate sets), one
in-process Ray runtime per session, and per-test MLflow stores copied from one created per
session; `tiny_config` for small Co-Reg runs and `tiny_student`, a trained model.pt."""
import contextlib
import logging
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------- small tables
@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits as (train, test) image tables (1,438 / 359 images, 8x8, 10 classes)."""
    from coreg_ray.data import load_image_table

    return load_image_table("digits:train"), load_image_table("digits:test")


@pytest.fixture(scope="session")
def digits_synthetic(digits):
    """(train, annotations, test): digits with synthetic noisy candidate sets (q=0.3, eta=0.1,
    seed 0). Shared by every module: use `.subset(...)` rather than changing it."""
    from coreg_ray.data import synthetic_annotations

    train, test = digits
    return train, synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0), test


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, digits):
    """model.pt of a tiny CNN student trained for 2 epochs (1 warm-up) on the first 600 digits
    images with synthetic candidate sets (q=0.2, eta=0.1): a few seconds, made once. Copy it
    rather than writing beside it."""
    import numpy as np

    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data import synthetic_annotations

    train = digits[0].subset(np.arange(600))
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.2, eta=0.1, seed=0)
    trainer = CoReg(tiny_config(**{"model.backbone": "tiny_cnn", "train.epochs": 2,
                                   "train.warmup_epochs": 1}), progress=False)
    trainer.fit(train, ann)
    path = tmp_path_factory.mktemp("tiny-student") / "model.pt"
    trainer.save_model(path)
    return path


def tiny_config(**over):
    from coreg_ray.config import Config

    base = {"model.backbone": "mlp", "data.hflip": False, "train.epochs": 6,
            "train.warmup_epochs": 2, "train.batch_size": 64, "train.warmup_batch_size": 128,
            "coreg.feature_delay": 1, "coreg.queue_size": 256, "tracking.mlflow": False}
    base.update(over)
    return Config.load(overrides=[f"{k}={v}" for k, v in base.items()])


def run_gloo_ranks(target, tmp_path, world=2, timeout=300):
    """Run `target(rank, store, tmp_path)` in `world` spawned processes (each makes its own
    gloo group from the file `store`), wait for them and check every one ended cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, tmp_path / "store", tmp_path))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


# ------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_runtime():
    """One in-process Ray for the session (2 CPUs, no dashboard, workers' logs not forwarded),
    started by the first test that asks and stopped at the end; a runtime already running in
    this process is shared as it is. Tests that need other settings start their own (the job
    submission test in test_distributed.py runs a separate `ray start --head`)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths are limited in length
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty SQLite MLflow store with its tables created, made once per session."""
    mlflow = pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow-template")
    with contextlib.chdir(folder):  # the Default experiment's artifact folder: here, not the repo
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlruns.db'}").search_experiments()
    return folder / "mlruns.db"


@pytest.fixture
def mlflow_store(_mlflow_template, tmp_path):
    """The URI of this test's own MLflow store, `sqlite:///<tmp_path>/mlruns.db`: also the default
    store of a run whose working folder is tmp_path. The file is a copy of the session's empty
    store (MLflow creates and migrates a new store's tables in about 5 s; a copy is instant), so
    experiments, runs and artifacts are still the test's alone."""
    shutil.copyfile(_mlflow_template, tmp_path / "mlruns.db")
    return f"sqlite:///{tmp_path / 'mlruns.db'}"
