"""PiCO, PiCO+ and ALIM learn on a tiny noisy-partial-label problem (8x8 digits, MLP)."""
from __future__ import annotations

import math

import pytest

from coreg_ray.config import Config
from coreg_ray.methods import run_method


@pytest.fixture(scope="module")
def problem(digits_synthetic):
    train, ann, test = digits_synthetic
    cfg = Config.load(overrides=["model.backbone=mlp", "train.epochs=8", "train.batch_size=64",
                                 "data.hflip=false", "tracking.mlflow=false"])
    return cfg, train, ann, test


@pytest.mark.parametrize("name", ["pico", "pico_plus", "alim_onehot", "alim_scale"])
def test_method_learns_digits(problem, name):
    cfg, train, ann, test = problem
    out = run_method(name, cfg, train, ann, test)
    assert out["method"] == name and out["epochs"] == 8 and len(out["history"]) == 8
    # chance is 0.1; these reach ~0.7-0.9 in 8 epochs
    assert out["test_accuracy"] > 0.6, out["test_accuracy"]
    last = out["history"][-1]
    assert math.isfinite(last["loss"])
    if name.startswith("alim"):
        assert 0.0 < last["noise_level"] < 0.5 and 0.0 <= last["lambda"] <= 1.0
    if name == "pico_plus":
        assert abs(last["reliable_fraction"] - 0.6) < 0.01
