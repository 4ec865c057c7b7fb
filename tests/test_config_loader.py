"""The one YAML loader and the one override parser (issue 13, item 5).

`coreg_ray.config.load_yaml_mapping` reads every user YAML file (config, sweep, experiment, the
quickstart's packaged config) and `coreg_ray.config.parse_override` parses every
`section.key=value` (`--set`, a sweep's or an experiment's overrides; `Config.apply_overrides`
sets them). The last test parses the package with `ast` and fails if another module reads YAML
or splits an override by itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from coreg_ray.config import Config, load_yaml_mapping, parse_override
from coreg_ray.errors import CoregError

PACKAGE = Path(__file__).resolve().parent.parent / "coreg_ray"


# ------------------------------------------------------------------------ parse_override
@pytest.mark.parametrize("item,expected", [
    ("train.epochs=3", ("train.epochs", 3)),
    ("coreg.nested.deeper.key=1", ("coreg.nested.deeper.key", 1)),  # the key's shape is Config.set's
    (" train.epochs = 3 ", ("train.epochs", 3)),  # spaces around the key and value go
    ("train.lr=1.0e-3", ("train.lr", 0.001)),
    # PyYAML reads an exponent without a dot as a string, in a file and in an override alike;
    # Config.set makes it a number for float keys (test below)
    ("train.lr=1e-3", ("train.lr", "1e-3")),
    ("data.hflip=true", ("data.hflip", True)),
    ("data.hflip=False", ("data.hflip", False)),
    ("tracking.run_name=null", ("tracking.run_name", None)),
    ("tracking.run_name=~", ("tracking.run_name", None)),
    ("tracking.run_name=", ("tracking.run_name", None)),  # an empty value is None
    ("tracking.run_name=  ", ("tracking.run_name", None)),
    ("a.b=[1, 2.5, x]", ("a.b", [1, 2.5, "x"])),
    ("a.b={k: 1}", ("a.b", {"k": 1})),
    ("a.b='007'", ("a.b", "007")),
    ("a.b=007x", ("a.b", "007x")),
    ("a=b=c", ("a", "b=c")),  # everything after the first '=' is the value
    ("tracking.experiment=x=1,y=2", ("tracking.experiment", "x=1,y=2")),
])
def test_parse_override(item, expected):
    key, value = parse_override(item)
    assert (key, value) == expected
    assert type(value) is type(expected[1])  # 1 stays int, True stays bool


@pytest.mark.parametrize("item", ["train.epochs", "", "   ", "=3", " =3", "="])
def test_parse_override_refuses_a_missing_equals_or_key(item):
    with pytest.raises(CoregError, match=r"^override '.*' must look like section\.key=value$"):
        parse_override(item)


def test_parse_override_bad_yaml_is_one_line_naming_the_item():
    with pytest.raises(CoregError) as exc:
        parse_override("train.lr=[1, 2")
    msg = str(exc.value)
    assert msg.startswith("override 'train.lr=[1, 2': the value is not valid YAML")
    assert "\n" not in msg


def test_overrides_go_through_config_in_order():
    cfg = Config.load(None, ["train.lr=1e-3", "train.epochs=5", "train.epochs=7",
                             "tracking.run_name=a=b", "tracking.run_name=null"])
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 7 and cfg.tracking.run_name is None
    cfg = Config().apply_overrides(["data.hflip=false"])
    assert cfg.data.hflip is False
    with pytest.raises(CoregError, match=r"config key 'train\.epochs' must be an integer"):
        Config().apply_overrides(["train.epochs=[1, 2]"])  # the range checks stay Config's


def test_update_names_where():
    with pytest.raises(CoregError, match=r"^setting 's': config: section 'train' must be a mapping"):
        Config().update({"train": 3}, where="setting 's': config")


# ------------------------------------------------------------------------ load_yaml_mapping
def test_load_yaml_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n  epochs: 3\ncoreg: {prototypes: true}\nx: null\n")
    assert load_yaml_mapping(f, "config file") == {
        "train": {"lr": "1e-3", "epochs": 3}, "coreg": {"prototypes": True}, "x": None}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml_mapping(str(empty), "config file") == {}


@pytest.mark.parametrize("name,content,pattern", [
    ("missing.yaml", None, r"^sweep file not found: .*missing\.yaml$"),
    ("folder", "DIR", r"^sweep file .*folder: is a folder, not a YAML file$"),
    ("bad.yaml", "train: [1, 2\n", r"^sweep file .*bad\.yaml is not valid YAML: "),
    ("list.yaml", "- 1\n- 2\n", r"^sweep file .*list\.yaml must hold a mapping of sections, got list$"),
    ("scalar.yaml", "3\n", r"^sweep file .*scalar\.yaml must hold a mapping of sections, got int$"),
    ("binary.yaml", b"\xff\xfe\x00bad", r"^sweep file .*binary\.yaml is not a text \(YAML\) file$"),
])
def test_load_yaml_mapping_errors_are_one_line(tmp_path, name, content, pattern):
    p = tmp_path / name
    if content == "DIR":
        p.mkdir()
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(CoregError, match=pattern) as exc:
        load_yaml_mapping(p, "sweep file", "a mapping of sections")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------ nobody else does it
# Modules under coreg_ray/ (besides config.py) allowed to read YAML or split on '=' themselves,
# each with its reason. Today no legitimate non-config YAML read exists (the quickstart's
# packaged config goes through load_yaml_mapping); writing YAML (yaml.safe_dump) is not checked.
#
# NOT_OVERRIDES: '=' parsing that is not a config override (kept as is, not checked for staleness).
NOT_OVERRIDES = {
    # annotator spec options, `simulated:templates=8,seed=0`: typed by the spec's own key table
    "annotate/registry.py": {"partition('=')"},
}
# LEFT_TO_DO: config overrides still parsed by hand. This list only gets shorter: an entry whose
# module no longer does it fails the test until the entry goes.
LEFT_TO_DO = {
    # COREG_VARIANTS' built-in switches ("coreg.prototypes=false", ...) are split by hand; the
    # fix is `cfg.apply_overrides(overrides)`, left to the method-registry change (issue 13,
    # item 4) that is rewriting methods.py.
    "methods.py": {"yaml.safe_load", "split('=')"},
}
YAML_READS = {"safe_load", "load", "full_load", "unsafe_load", "load_all", "safe_load_all"}


def _own_parsing(path: Path) -> set[str]:
    """`yaml.<read>` calls, and `.split/.partition/.rpartition("=")` calls, in one module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        if attr in YAML_READS and isinstance(owner, ast.Name) and owner.id == "yaml":
            found.add(f"yaml.{attr}")
        if (attr in ("split", "rsplit", "partition", "rpartition") and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "="):
            found.add(f"{attr}('=')")
    return found


def test_no_module_but_config_reads_yaml_or_splits_overrides():
    found = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        if rel != "config.py" and (own := _own_parsing(p)):
            found[rel] = own
    extra = {m: sorted(f - NOT_OVERRIDES.get(m, set()) - LEFT_TO_DO.get(m, set()))
             for m, f in found.items()}
    extra = {m: f for m, f in extra.items() if f}
    assert not extra, (
        f"YAML read or override split outside coreg_ray/config.py: {extra}; use "
        "config.load_yaml_mapping / config.parse_override (Config.apply_overrides)")
    stale = {m: sorted(f - found.get(m, set())) for m, f in LEFT_TO_DO.items()}
    stale = {m: f for m, f in stale.items() if f}
    assert not stale, f"no longer done there, remove from LEFT_TO_DO: {stale}"
    assert _own_parsing(PACKAGE / "config.py") == {"yaml.safe_load", "partition('=')"}
