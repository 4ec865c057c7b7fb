"""Issue 12, category 2: config values are checked against the valid values each key declares.

The per-key cases are generated from the declarations (`Config.valid_values()`): for every
numeric range, the values just outside each bound are rejected with one line naming the key,
the value and the range, and the bounds themselves (or the values just inside an open bound)
are accepted — through `--set` strings, a config mapping and plain attribute assignment. Then
the issue's cases through the command line, and every other way a config is built.
"""
from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coreg_ray.cli import main
from coreg_ray.config import Choices, Config, Pattern, Range
from coreg_ray.errors import CoregError

ROOT = Path(__file__).resolve().parents[1]
KEYS = Config.valid_values()


def _is_int(f) -> bool:
    return str(f.type).startswith("int")  # "int" or "int | None" (postponed annotations)


def _edge_cases(r: Range, is_int: bool):
    """(outside, inside) values at each finite bound of `r`."""
    outside, inside = [], []
    for bound, open_, down in ((r.lo, r.lo_open, True), (r.hi, r.hi_open, False)):
        if bound is None:
            continue
        if is_int:
            step = -1 if down else 1
            outside.append(int(bound) if open_ else int(bound) + step)
            inside.append(int(bound) - step if open_ else int(bound))
        else:
            away = -math.inf if down else math.inf
            outside.append(float(bound) if open_ else math.nextafter(float(bound), away))
            inside.append(math.nextafter(float(bound), -away) if open_ else float(bound))
    return outside, inside


RANGE_CASES = [(key, out, inn) for key, (f, v) in KEYS.items() if isinstance(v, Range)
               for out, inn in [_edge_cases(v, _is_int(f))]]
# Pattern keys are not enumerable: examples per key, and a test that every Pattern key has some
PATTERN_EXAMPLES = {
    "train.device": (["banana", "", "gpu", "cuda:", "cuda:x", "CPU"],
                     ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"]),
    "tracking.tracking_uri": (["", "   "], ["sqlite:///mlruns.db", "http://host:5000"]),
    "tracking.experiment": (["", "  \t"], ["coreg-ray", "table 1"]),
    "tracking.run_name": (["", " "], ["abc", "seed 0"]),
}


def _set_three_ways(key: str, value):
    """Set `key` through a --set string, a config mapping, and attribute assignment."""
    section, name = key.split(".")
    text = repr(value) if isinstance(value, float) else str(value)
    yield "--set", lambda: Config.load(None, [f"{key}={text}"])
    yield "mapping", lambda: Config.from_dict({section: {name: value}})
    yield "attribute", lambda: setattr(getattr(Config(), section), name, value)


# ------------------------------------------------------------------- the declarations
def test_every_key_declares_its_valid_values_and_its_default_is_valid():
    assert len(KEYS) > 50
    for key, (f, valid) in KEYS.items():
        if str(f.type) == "bool":
            assert valid is None, key  # true/false by type
            continue
        assert isinstance(valid, (Range, Choices, Pattern)), f"{key} declares no valid values"
        if f.default is None:
            assert "None" in str(f.type), key
        else:
            assert valid.ok(f.default), (key, f.default, str(valid))
    assert set(PATTERN_EXAMPLES) == {k for k, (_, v) in KEYS.items() if isinstance(v, Pattern)}


@pytest.mark.parametrize("key, outside, inside", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_range_edges_generated_from_the_declaration(key, outside, inside):
    f, valid = KEYS[key]
    assert outside and inside
    for value in outside:
        shown = repr(int(value) if _is_int(f) else float(value))
        for how, do in _set_three_ways(key, value):
            with pytest.raises(CoregError) as info:
                do()
            assert str(info.value) == (f"config key '{key}': {shown} is out of range "
                                       f"(valid: {valid})"), how
    for value in inside:
        for how, do in _set_three_ways(key, value):
            do()  # accepted
        assert getattr(getattr(Config.from_dict({key.split(".")[0]: {key.split(".")[1]: value}}),
                               key.split(".")[0]), key.split(".")[1]) == value


@pytest.mark.parametrize("key", [k for k, (f, v) in KEYS.items()
                                 if isinstance(v, Range) and not str(f.type).startswith("int")])
def test_float_keys_reject_nan_and_infinity(key):
    for text in (".nan", ".inf", "-.inf"):
        with pytest.raises(CoregError, match=f"config key '{key}'"):
            Config.load(None, [f"{key}={text}"])


@pytest.mark.parametrize("key", [k for k, (_, v) in KEYS.items() if isinstance(v, Choices)])
def test_choices_accept_each_value_and_reject_others(key):
    valid = KEYS[key][1]
    for value in valid.allowed():
        for _, do in _set_three_ways(key, value):
            do()
    for value in ("no-such-" + key.split(".")[1], ""):
        with pytest.raises(CoregError) as info:
            Config.from_dict({key.split(".")[0]: {key.split(".")[1]: value}})
        msg = str(info.value)
        assert f"config key '{key}'" in msg and f"unknown {valid.noun} {value!r}" in msg, msg
        assert str(valid) in msg and "\n" not in msg


@pytest.mark.parametrize("key", sorted(PATTERN_EXAMPLES))
def test_patterns_from_examples(key):
    bad, good = PATTERN_EXAMPLES[key]
    section, name = key.split(".")
    for value in bad:
        with pytest.raises(CoregError) as info:
            Config.from_dict({section: {name: value}})
        assert f"config key '{key}': {value!r} is not valid (valid: {KEYS[key][1]})" == str(info.value)
    for value in good:
        assert getattr(getattr(Config.from_dict({section: {name: value}}), section), name) == value


def test_optional_keys_take_empty_and_numpy_values_are_taken():
    import numpy as np

    c = Config.load(None, ["data.image_size=", "tracking.run_name=", "tracking.tracking_uri="])
    assert c.data.image_size is None and c.tracking.run_name is None
    c.set("train.epochs", np.int64(7))
    c.set("train.lr", np.float32(0.5))
    assert c.train.epochs == 7 and type(c.train.epochs) is int and c.train.lr == 0.5
    with pytest.raises(CoregError, match="'train.epochs': 0 is out of range"):
        c.set("train.epochs", np.int64(0))


def test_warmup_may_equal_epochs_but_not_exceed_them():
    c = Config.load(None, ["train.epochs=5", "train.warmup_epochs=5"])
    c.check_schedule()  # the warm-up-only method
    c.train.warmup_epochs = 6  # each key alone is fine (set order must not matter) ...
    with pytest.raises(CoregError, match=r"config key 'train.warmup_epochs': 6 is out of range "
                                         r"\(valid: 0 to train.epochs = 5\)"):
        c.check_schedule()  # ... the rule between them is checked before a run


def test_the_cosine_schedule_must_decay():
    c = Config.load(None, ["train.lr=0.02", "train.lr_min=0.02"])
    c.check_schedule()  # a constant rate is allowed
    c.train.lr_min = 0.05
    with pytest.raises(CoregError, match=r"config key 'train.lr_min': 0.05 is out of range "
                                         r"\(valid: 0 to train.lr = 0.02"):
        c.check_schedule()


# ------------------------------------------------------------------- the issue's cases
ISSUE_CASES = [
    (["--set", "train.lr=-1"], "config key 'train.lr': -1.0 is out of range (valid: (0, 1000])"),
    (["--set", "train.batch_size=0"], "config key 'train.batch_size': 0 is out of range (valid: [1, 1048576])"),
    (["--set", "train.epochs=0"], "config key 'train.epochs': 0 is out of range (valid: [1, 100000])"),
    (["--set", "train.epochs=-1"], "config key 'train.epochs': -1 is out of range (valid: [1, 100000])"),
    (["--set", "coreg.lambda_u=-1"], "config key 'coreg.lambda_u': -1.0 is out of range (valid: [0, 10000])"),
    (["--set", "train.eval_every=0"], "config key 'train.eval_every': 0 is out of range (valid: [1, 100000])"),
    (["--set", "coreg.candidate_loss_weight=-0.5"],
     "config key 'coreg.candidate_loss_weight': -0.5 is out of range (valid: [0, 10000])"),
    (["--set", "train.epochs=3", "--set", "train.warmup_epochs=4"],
     "config key 'train.warmup_epochs': 4 is out of range (valid: 0 to train.epochs = 3)"),
    (["--set", "train.precision=fp16"], "unknown precision 'fp16'"),
    (["--set", "model.backbone=resnet9000"], "unknown backbone 'resnet9000'"),
]


@pytest.mark.parametrize("extra, message", ISSUE_CASES, ids=[c[1].split("'")[1] for c in ISSUE_CASES])
def test_issue_cases_on_the_command_line(tmp_path, capsys, extra, message):
    """Checked when the config is built: one line, exit 2, before any input is read (the
    annotation table does not even exist) and before the output folder is made."""
    rc = main(["train", "--images", "digits:train", "--annotations", str(tmp_path / "none.parquet"),
               "--output", str(tmp_path / "out"), "--no-mlflow", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("coreg-ray: error: config key ") and message in err, err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()


def test_issue_case_as_a_user_runs_it_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "coreg_ray.cli", "train", "--images", "digits:train",
                          "--annotations", "a.parquet", "--output", "out", "--set", "train.lr=-1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip() == ("coreg-ray: error: config key 'train.lr': -1.0 is out of range "
                                  "(valid: (0, 1000])"), res.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_file_with_a_bad_value(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train: {epochs: 10, batch_size: 0}\n")
    assert main(["train", "--images", "digits:train", "--annotations", "a.parquet", "--config",
                 str(tmp_path / "c.yaml"), "--output", str(tmp_path / "o"), "--no-mlflow"]) == 2
    assert "config key 'train.batch_size': 0 is out of range (valid: [1, 1048576])" in capsys.readouterr().err


def test_warmup_only_run_is_accepted(tmp_path, capsys):
    """warmup_epochs == epochs is the warm-up-only method: it trains."""
    assert main(["synth", "--images", "digits:train", "--limit", "200", "--q", "0.1", "--eta", "0",
                 "--output", str(tmp_path / "a.parquet")]) == 0
    assert main(["train", "--images", "digits:train", "--limit", "200", "--annotations",
                 str(tmp_path / "a.parquet"), "--output", str(tmp_path / "o"), "--no-mlflow",
                 "--set", "model.backbone=mlp", "--set", "data.hflip=false",
                 "--set", "train.epochs=1", "--set", "train.warmup_epochs=1",
                 "--set", "train.batch_size=64", "--set", "coreg.queue_size=256"]) == 0
    assert (tmp_path / "o" / "model.pt").exists()


# ------------------------------------------------------------------- every other way in
def test_experiment_file_config_and_params_are_checked():
    from coreg_ray.experiment import Experiment

    exp = yaml.safe_load((ROOT / "configs" / "exp-digits-smoke.yaml").read_text())
    exp["config"]["train"]["lr"] = -1
    with pytest.raises(CoregError, match=r"config key 'train.lr': -1.0 is out of range"):
        Experiment.load(exp, strict=False)
    exp = yaml.safe_load((ROOT / "configs" / "exp-digits-smoke.yaml").read_text())
    exp["params"] = {"coreg": {"coreg.lambda_u": -2}}
    with pytest.raises(CoregError, match=r"params.coreg: config key 'coreg.lambda_u': -2.0 is out"):
        Experiment.load(exp, strict=False)
    exp = yaml.safe_load((ROOT / "configs" / "exp-digits-smoke.yaml").read_text())
    with pytest.raises(CoregError, match=r"'train.eval_every': 0 is out of range"):
        Experiment.load(exp, overrides=["train.eval_every=0"], strict=False)


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"loguniform": [-0.1, 0.05]}},
     "sweep: search.train.lr = {'loguniform': [-0.1, 0.05]}: config key 'train.lr': -0.1 is out of "
     "range (valid: (0, 1000])"),
    ({"coreg.sharpen_T": {"choice": [0.1, 0.0]}},
     "config key 'coreg.sharpen_T': 0.0 is out of range (valid: (0, 100])"),
    ({"coreg.p_threshold": {"uniform": [0.2, 1.5]}},
     "config key 'coreg.p_threshold': 1.5 is out of range (valid: [0, 1])"),
    ({"train.batch_size": {"randint": [0, 64]}},  # randint's upper bound is exclusive
     "config key 'train.batch_size': 0 is out of range (valid: [1, 1048576])"),
    ({"coreg.beta1": -1}, "sweep: search.coreg.beta1 = -1: config key 'coreg.beta1': -1.0 is out"),
])
def test_sweep_search_space_bounds_are_checked(tmp_path, space, message):
    from coreg_ray.distributed.tune import Sweep

    sweep = yaml.safe_load((ROOT / "configs" / "sweep-digits.yaml").read_text())
    sweep["search"] = space
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(CoregError) as info:
        Sweep.load(tmp_path / "s.yaml")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    # randint's upper bound is exclusive: [1, 65) reaches 64, fine
    sweep["search"] = {"train.batch_size": {"randint": [1, 65]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    Sweep.load(tmp_path / "s.yaml")


def test_quickstart_epochs_are_checked():
    from coreg_ray.quickstart import quickstart_config

    with pytest.raises(CoregError, match=r"'train.epochs': 0 is out of range"):
        quickstart_config(epochs=0)
    assert quickstart_config(epochs=3).train.warmup_epochs == 1


def _shipped_yaml():
    files = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")) + glob.glob(str(ROOT / "coreg_ray" / "*.yaml")))
    assert files
    return files


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: str(Path(p).relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    """Config files, experiment files (their config, every setting's config and params) and
    sweep files (base config and search-space bounds) all pass the range checks."""
    name = Path(path).name
    if name.startswith("exp-"):
        from coreg_ray.experiment import Experiment

        exp = Experiment.load(path, strict=False)
        for s in exp.settings:
            exp.run_config(s).check_schedule()
    elif name.startswith("sweep-"):
        from coreg_ray.distributed.tune import Sweep

        Sweep.load(path).base_config().check_schedule()
    else:
        Config.load(path).check_schedule()
