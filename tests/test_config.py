"""Tests for coreg_ray/config.py: defaults from paper-method.md, YAML + overrides, errors."""
from __future__ import annotations

import pytest

from coreg_ray.config import Config
from coreg_ray.errors import CoregError


def test_defaults_match_paper_method():
    c = Config()
    t, r, m, d = c.train, c.coreg, c.model, c.data
    # Optimiser and schedule
    assert (t.lr, t.lr_min, t.momentum, t.weight_decay) == (0.01, 1e-5, 0.9, 5e-4)
    assert (t.batch_size, t.warmup_batch_size) == (256, 512)
    assert (t.epochs, t.warmup_epochs) == (800, 50)
    # Pseudo-labels, MixUp, U loss
    assert r.sharpen_T == 0.5 and r.mixup_alpha == 4.0
    assert r.lambda_u == 1.0 and r.rampup_epochs == 16
    # Division / GMM
    assert r.division_history == 5 and r.p_threshold == 0.5
    assert (r.gmm_max_iter, r.gmm_tol, r.gmm_reg_covar) == (10, 1e-2, 5e-4)
    assert r.distribution_alignment is True
    # Prototypes and contrastive term
    assert (r.beta1, r.beta2, r.feature_delay) == (0.1, 0.1, 10)
    assert (r.proto_gamma, r.proto_temp) == (0.999, 0.3)
    assert (r.queue_size, r.cont_temp, r.key_momentum) == (8192, 0.07, 0.999)
    assert m.proj_dim == 128
    # Augmentation: 4 px at 32 px, one strong op
    assert d.crop_padding * 32 == 4 and d.strong_ops == 1
    # Co-Reg itself: every ablation switch on, no extras
    assert r.co_pseudo_labels and r.noisy_contrastive and r.contrastive and r.prototypes
    assert r.use_unlabeled and not r.class_balanced_split
    assert c.fewshot.shots == 0


def test_yaml_load_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  epochs: 5\n  lr: 0.1\ncoreg:\n  sharpen_T: 1\n"
                 "data:\n  image_size: 32\n")
    c = Config.load(p, ["train.epochs=3", "coreg.noisy_contrastive=false", "data.image_size=",
                        "train.device=cuda:1", "coreg.beta1=0.5"])
    assert c.train.epochs == 3  # override beats the file
    assert c.train.lr == 0.1  # from the file
    assert c.coreg.sharpen_T == 1.0 and isinstance(c.coreg.sharpen_T, float)  # int -> float
    assert c.coreg.noisy_contrastive is False
    assert c.data.image_size is None  # empty value -> None for an optional key
    assert c.train.device == "cuda:1"
    assert c.coreg.beta1 == 0.5
    assert c.train.batch_size == 256  # untouched default
    assert c.flat()["train.epochs"] == 3


def test_exponent_floats_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-5" as a string; the config must still take it as a number.
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  lr_min: 1e-5\n")
    c = Config.load(p, ["train.lr=2e-3"])
    assert c.train.lr_min == 1e-5 and isinstance(c.train.lr_min, float)
    assert c.train.lr == 2e-3


def test_save_load_round_trip(tmp_path):
    c = Config.load(None, ["train.epochs=7", "fewshot.shots=4", "tracking.run_name=abc"])
    c.save(tmp_path / "config.yaml")
    back = Config.load(tmp_path / "config.yaml")
    assert back.to_dict() == c.to_dict()
    assert back.train.epochs == 7 and back.fewshot.shots == 4


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert Config.load(p).to_dict() == Config().to_dict()


@pytest.mark.parametrize("override,pattern", [
    ("train.epoch=3", r"config key 'train\.epoch' does not exist"),
    ("trainer.epochs=3", r"config key 'trainer\.epochs': no section 'trainer'"),
    ("epochs=3", r"config key 'epochs' must be section\.key"),
    ("train.epochs=abc", r"config key 'train\.epochs' must be an integer"),
    ("train.epochs=3.5", r"config key 'train\.epochs' must be an integer"),
    ("train.epochs=true", r"config key 'train\.epochs' must be an integer"),
    ("train.lr=fast", r"config key 'train\.lr' must be a number"),
    ("coreg.prototypes=2", r"config key 'coreg\.prototypes' must be true/false"),
    ("train.epochs=", r"config key 'train\.epochs' cannot be empty"),
    ("train.epochs", r"override 'train\.epochs' must look like section\.key=value"),
])
def test_bad_overrides_raise_naming_the_key(override, pattern):
    with pytest.raises(CoregError, match=pattern):
        Config.load(None, [override])


def test_yaml_errors_name_the_key_or_file(tmp_path):
    with pytest.raises(CoregError, match="config file not found: .*missing.yaml"):
        Config.load(tmp_path / "missing.yaml")
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("coreg:\n  queue: 10\n")
    with pytest.raises(CoregError, match=r"'coreg\.queue' does not exist"):
        Config.load(bad_key)
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("train:\n  batch_size: big\n")
    with pytest.raises(CoregError, match=r"'train\.batch_size' must be an integer"):
        Config.load(bad_type)
    not_map = tmp_path / "not_map.yaml"
    not_map.write_text("train: 3\n")
    with pytest.raises(CoregError, match="section 'train' must be a mapping"):
        Config.load(not_map)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    with pytest.raises(CoregError, match="not valid YAML"):
        Config.load(bad_yaml)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(CoregError, match="must hold a mapping"):
        Config.load(a_list)
