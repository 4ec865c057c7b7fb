"""One config system: typed dataclasses, loaded from YAML, overridden by `section.key=value`.

Defaults are the paper's and, where it is silent, the authors' code for CIFAR. The resolved config
is saved next to every run (`config.yaml`) and logged to MLflow.

Every key declares its valid values where it is declared (`_key(default, Range(...))`,
`Choices(...)`, `Pattern(...)`; booleans are true/false by type); numbers have sane upper
bounds too, so an absurd value (queue_size=1e12, lr=1e300) is one line, not an allocation or
overflow traceback. They are checked in one
place, `_Section.__setattr__`, so a value is checked however it arrives: a YAML file,
`--set key=value`, a sweep's search space, an experiment file, or code assigning
`cfg.train.epochs = n`. A bad value is one `CoregError` line naming the key, the value and the
valid range. The one rule between keys (warm-up not longer than the run) is `check_schedule`.

Every user YAML file (config, sweep, experiment) is read by `load_yaml_mapping`, and every
`section.key=value` override (`--set`, a sweep's or an experiment's overrides) is parsed by
`parse_override`; nothing else in the package reads one or splits one by itself
(tests/test_config_loader.py checks it).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import yaml

from coreg_ray.errors import CoregError


def load_yaml_mapping(path, what: str, expected: str = "a mapping") -> dict:
    """Read a YAML file that must hold a mapping; one-line errors name the file (`what` says
    which kind: "config file", "sweep file", ...). An empty file is an empty mapping."""
    p = Path(path)
    if p.is_dir():
        raise CoregError(f"{what} {p}: is a folder, not a YAML file")
    if not p.is_file():
        raise CoregError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except UnicodeDecodeError:
        raise CoregError(f"{what} {p} is not a text (YAML) file") from None
    except OSError as exc:
        raise CoregError(f"{what} {p} cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise CoregError(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise CoregError(f"{what} {p} must hold {expected}, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, object]:
    """`"section.key=value"` -> `("section.key", value)`, the value typed by YAML (`1e-3`,
    `true`, `null`, `[1, 2]`; an empty value is None). Everything after the first `=` is the
    value. The key's shape and the value's range are `Config.set`'s to check."""
    key, eq, raw = str(item).partition("=")
    if not eq or not key.strip():
        raise CoregError(f"override '{item}' must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise CoregError(f"override '{item}': the value is not valid YAML: "
                         f"{str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------ valid values
@dataclass(frozen=True)
class Range:
    """Numbers from `lo` to `hi` (None: unbounded); `lo_open`/`hi_open` exclude the bound."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, value) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any finite number"


def _num(x) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Choices:
    """One of a fixed set, or of a registry (`values` a function, read when first needed);
    `noun` names what is chosen in the error ("unknown backbone 'x'")."""
    values: tuple | Callable[[], typing.Iterable]
    noun: str = "value"

    def allowed(self) -> list:
        return list(self.values() if callable(self.values) else self.values)

    def ok(self, value) -> bool:
        return value in self.allowed()

    def __str__(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.allowed())


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` (whole string); `text` says it in words."""
    regex: str
    text: str

    def ok(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value, re.DOTALL) is not None

    def __str__(self) -> str:
        return self.text


NON_EMPTY = Pattern(r".*\S.*", "a non-empty string")
SEED = Range(0, 2**32 - 1)  # NumPy / scikit-learn seeds


def _backbones():
    from coreg_ray.coreg.models import BACKBONES

    return sorted(BACKBONES)


def _key(default, valid):
    """A config field with its valid values (`Range`, `Choices` or `Pattern`)."""
    return field(default=default, metadata={"valid": valid})


def check_value(dotted: str, value, f: dataclasses.Field) -> None:
    """The one range check: `value` (already of the key's type) against the declaration of
    field `f`. None is allowed for optional keys (the type check already decided that)."""
    valid = f.metadata.get("valid")
    if valid is None or value is None or (value == f.default and type(value) is type(f.default)):
        return  # defaults are valid by declaration (tests/test_config_ranges.py checks them)
    if not valid.ok(value):
        if isinstance(valid, Choices):
            raise CoregError(f"config key '{dotted}': unknown {valid.noun} {value!r} (valid: {valid})")
        what = "is out of range" if isinstance(valid, Range) else "is not valid"
        raise CoregError(f"config key '{dotted}': {value!r} {what} (valid: {valid})")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class _Section:
    """Base of the config sections: every assignment to a key is type-coerced and range-checked
    (also the dataclass __init__'s, so a section never holds an invalid value)."""
    SECTION: ClassVar[str] = ""

    def __setattr__(self, name, value):
        f = type(self).__dataclass_fields__.get(name)
        if f is not None:
            dotted = f"{self.SECTION}.{name}"
            value = _coerce(dotted, value, _hints(type(self))[name])
            check_value(dotted, value, f)
        object.__setattr__(self, name, value)


@dataclass
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"
    # the backbones registered in coreg_ray.coreg.models.BACKBONES
    backbone: str = _key("preact_resnet18", Choices(_backbones, "backbone"))
    proj_dim: int = _key(128, Range(1, 8192))


@dataclass
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"
    # None: keep the table's native size; at most 1024 (the table lives on the device as uint8)
    image_size: int | None = _key(None, Range(4, 1024))
    # weak aug: shift by up to this fraction of the side (4 px at 32)
    crop_padding: float = _key(0.125, Range(0, 0.5))
    # random ops per strong view (the authors use one) out of the 14 RandAugment ops
    strong_ops: int = _key(1, Range(0, 14))
    hflip: bool = True  # random horizontal flip in both views (turn off for digits and text)
    # strong view: color = crop/flip + one RandAugment op + Cutout (the reference's for RGB data);
    # grayscale = crop/flip + a black Cutout square, no RandAugment (theirs for F-MNIST/FER2013);
    # auto = grayscale when every training image has R = G = B
    strong_view: str = _key("auto", Choices(("auto", "color", "grayscale"), "strong view"))
    # where the training images live: device (on the training device), host (host memory, pinned
    # on CUDA, each batch gathered by index and copied), auto (device when they fit)
    placement: str = _key("auto", Choices(("auto", "device", "host"), "placement"))


@dataclass
class TrainConfig(_Section):
    SECTION: ClassVar[str] = "train"
    epochs: int = _key(800, Range(1, 100_000))
    # may equal epochs (the warm-up-only method); check_schedule rejects warmup_epochs > epochs
    warmup_epochs: int = _key(50, Range(0, 100_000))
    batch_size: int = _key(256, Range(1, 1 << 20))
    warmup_batch_size: int = _key(512, Range(1, 1 << 20))
    lr: float = _key(0.01, Range(0, 1000, lo_open=True))
    lr_min: float = _key(1e-5, Range(0, 1000))
    momentum: float = _key(0.9, Range(0, 1, hi_open=True))
    weight_decay: float = _key(5e-4, Range(0, 1))
    eval_batch_size: int = _key(2048, Range(1, 1 << 20))
    seed: int = _key(0, SEED)
    device: str = _key("auto", Pattern(r"auto|cpu|mps|cuda(:\d+)?",
                                       "auto, cpu, mps, cuda or cuda:N"))
    # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    precision: str = _key("auto", Choices(("auto", "bf16", "fp32"), "precision"))
    channels_last: bool = True
    # torch.compile the networks (Inductor). Costs ~1 min of compiling at the start. Measured:
    # PreAct ResNet-18 on an H200 within the run-to-run spread of eager (benchmarks/gpu_h200.md);
    # small_cnn on this CPU ~1.8x faster per epoch.
    compile: bool = False
    # several workers: BatchNorm statistics over every worker's rows (the batch one process
    # would normalise by); false: each worker's own rows (plain DDP). No effect on one process.
    sync_batchnorm: bool = True
    # test-set evaluation every N epochs (and always at the end)
    eval_every: int = _key(1, Range(1, 100_000))
    checkpoint_every: int = _key(1, Range(1, 100_000))


@dataclass
class CoRegConfig(_Section):
    SECTION: ClassVar[str] = "coreg"
    sharpen_T: float = _key(0.5, Range(0, 100, lo_open=True))
    mixup_alpha: float = _key(4.0, Range(0, 1000, lo_open=True))  # Beta(alpha, alpha)
    lambda_u: float = _key(1.0, Range(0, 10_000))
    rampup_epochs: int = _key(16, Range(0, 100_000))
    beta1: float = _key(0.1, Range(0, 10_000))  # prototype alignment weight
    beta2: float = _key(0.1, Range(0, 10_000))  # noisy contrastive weight
    # prototype/contrastive terms from epoch warmup_epochs + feature_delay + 1 on (-1: from
    # the first Co-Reg epoch)
    feature_delay: int = _key(10, Range(-1, 100_000))
    proto_gamma: float = _key(0.999, Range(0, 1))
    proto_temp: float = _key(0.3, Range(0, 100, lo_open=True))  # T'
    cont_temp: float = _key(0.07, Range(0, 100, lo_open=True))  # T''
    queue_size: int = _key(8192, Range(1, 1 << 22))
    key_momentum: float = _key(0.999, Range(0, 1))
    division_history: int = _key(5, Range(1, 1000))
    p_threshold: float = _key(0.5, Range(0, 1))
    gmm_max_iter: int = _key(10, Range(1, 100_000))
    gmm_tol: float = _key(1e-2, Range(0, 1))
    gmm_reg_covar: float = _key(5e-4, Range(0, 1, lo_open=True))
    distribution_alignment: bool = True
    # Not in the paper: min-max normalise the division loss within each (candidate-restricted)
    # predicted class before the GMM, so hard classes keep members in P. See benchmarks/.
    class_balanced_split: bool = False
    # Not in the paper (stabilisers against confirmation bias when the student is weak after
    # the warm-up; off = the paper). u_targets_in_candidates: U targets are masked to the
    # candidate set like P's instead of ignoring it. candidate_loss_weight: the warm-up loss
    # (partial CE + negative entropy on the candidate sets) stays on as an extra term on the
    # unmixed strong views of P and U, with this weight.
    u_targets_in_candidates: bool = False
    candidate_loss_weight: float = _key(0.0, Range(0, 10_000))
    # agreement_gate: a P row whose candidate-restricted argmax differs between the two nets is
    # trained as a U row (MSE to the U-style target) and kept out of the prototypes.
    agreement_gate: bool = False
    # Ablation switches (paper Table V): all True is Co-Reg.
    co_pseudo_labels: bool = True  # False: each net labels itself (no peer)
    noisy_contrastive: bool = True  # False: plain SupCon on pseudo-labels, no P/U rules
    contrastive: bool = True
    prototypes: bool = True
    use_unlabeled: bool = True  # False: U samples are dropped from the loss
    # DivideMix's penalty sum_c pi_c log(pi_c / mean_b p_bc) with a uniform prior pi (used by
    # the `dividemix` method, off for Co-Reg as in the paper)
    prior_penalty: bool = False


@dataclass
class FewShotConfig(_Section):
    SECTION: ClassVar[str] = "fewshot"
    # true labels per class, trusted (candidate set = the label, always in P)
    shots: int = _key(0, Range(0, 1_000_000))
    seed: int = _key(0, SEED)


@dataclass
class TrackingConfig(_Section):
    SECTION: ClassVar[str] = "tracking"
    mlflow: bool = True
    # None: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    tracking_uri: str | None = _key(None, NON_EMPTY)
    experiment: str = _key("coreg-ray", NON_EMPTY)
    run_name: str | None = _key(None, NON_EMPTY)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    coreg: CoRegConfig = field(default_factory=CoRegConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> "Config":
        return cls().update(data)

    def update(self, data: dict | None, where: str = "config") -> "Config":
        """Set every key of a `{section: {key: value}}` mapping; errors name `where`. Returns self."""
        for section, values in (data or {}).items():
            if not isinstance(values, dict):
                raise CoregError(f"{where}: section '{section}' must be a mapping, got {values!r}")
            for key, value in values.items():
                self.set(f"{section}.{key}", value)
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None,
             base: dict | None = None) -> "Config":
        """The config of `path` (YAML; else `base`, a `to_dict()` mapping; else the defaults)
        with `section.key=value` overrides on top."""
        data = load_yaml_mapping(path, "config file", "a mapping of sections") if path else base or {}
        return cls.from_dict(data).apply_overrides(overrides)

    def apply_overrides(self, overrides=()) -> "Config":
        """Set each `section.key=value` (`parse_override`) in order; returns self."""
        for item in overrides or ():
            self.set(*parse_override(item))
        return self

    def set(self, dotted: str, value) -> None:
        parts = dotted.split(".")
        if len(parts) != 2:
            raise CoregError(f"config key '{dotted}' must be section.key (e.g. train.epochs)")
        section_name, key = parts
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise CoregError(f"config key '{dotted}': no section '{section_name}' (sections: {names})")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise CoregError(
                f"config key '{dotted}' does not exist (keys of {section_name}: {', '.join(fields)})"
            )
        setattr(section, key, value)  # coerced and range-checked by _Section.__setattr__

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically (never a half-written config.yaml)."""
        from coreg_ray.outputs import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    # --- valid values ---------------------------------------------------------------------
    @classmethod
    def valid_values(cls) -> dict:
        """{'section.key': (dataclasses.Field, its declared Range/Choices/Pattern or None for
        a boolean)} for every key: the declarations the checks (and the tests) use."""
        out = {}
        for sf in dataclasses.fields(cls):
            for f in dataclasses.fields(sf.default_factory):
                out[f"{sf.name}.{f.name}"] = (f, f.metadata.get("valid"))
        return out

    def check_schedule(self) -> None:
        """The rules between keys of a Co-Reg run: the warm-up fits in the run (equal is the
        warm-up-only method), and the cosine schedule goes down (lr_min <= lr). Checked before
        a run touches its inputs or outputs."""
        t = self.train
        if t.warmup_epochs > t.epochs:
            raise CoregError(f"config key 'train.warmup_epochs': {t.warmup_epochs} is out of range "
                             f"(valid: 0 to train.epochs = {t.epochs})")
        if t.lr_min > t.lr:
            raise CoregError(f"config key 'train.lr_min': {t.lr_min:g} is out of range (valid: 0 "
                             f"to train.lr = {t.lr:g}; the cosine schedule decays from lr to lr_min)")


def _coerce(name: str, value, hint):
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise CoregError(f"config key '{name}' cannot be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise CoregError(f"config key '{name}' must be true/false, got {value!r}")
    if base is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # also NumPy integers (sweep samples, computed values)
        if isinstance(value, (str, float)):  # 1e6 (YAML reads it as a string) or 4096.0
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise CoregError(f"config key '{name}' must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads exponents without a dot ("1e-5") as strings
            try:
                return float(value)
            except ValueError:
                pass
        raise CoregError(f"config key '{name}' must be a number, got {value!r}")
    if base is str:
        return str(value)
    return value
