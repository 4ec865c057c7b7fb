"""One config system: typed dataclasses, loaded from YAML, overridden by `section.key=value`.

Defaults are those of `shared/paper-method.md` (the authors' code for CIFAR). The resolved config
is saved next to every run (`config.yaml`) and logged to MLflow.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coreg_ray.errors import CoregError


def load_yaml_mapping(path, what: str, expected: str = "a mapping") -> dict:
    """Read a YAML file that must hold a mapping; one-line errors name the file (`what` says
    which kind: "config file", "sweep file", ...). An empty file is an empty mapping."""
    p = Path(path)
    if not p.is_file():
        raise CoregError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CoregError(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise CoregError(f"{what} {p} must hold {expected}, got {type(data).__name__}")
    return data


@dataclass
class ModelConfig:
    backbone: str = "preact_resnet18"  # see coreg_ray.coreg.models.BACKBONES
    proj_dim: int = 128


@dataclass
class DataConfig:
    image_size: int | None = None  # None: keep the table's native size
    crop_padding: float = 0.125  # weak aug: shift by up to this fraction of the side (4 px at 32)
    strong_ops: int = 1  # random ops per strong view (the authors use one)
    hflip: bool = True  # random horizontal flip in both views (turn off for digits and text)


@dataclass
class TrainConfig:
    epochs: int = 800
    warmup_epochs: int = 50
    batch_size: int = 256
    warmup_batch_size: int = 512
    lr: float = 0.01
    lr_min: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 2048
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    # torch.compile the networks (Inductor). Costs ~1 min of compiling at the start. Measured:
    # PreAct ResNet-18 on an H200 within the run-to-run spread of eager (benchmarks/gpu_h200.md);
    # small_cnn on this CPU ~1.8x faster per epoch.
    compile: bool = False
    eval_every: int = 1  # test-set evaluation every N epochs (and always at the end)
    checkpoint_every: int = 1


@dataclass
class CoRegConfig:
    sharpen_T: float = 0.5
    mixup_alpha: float = 4.0
    lambda_u: float = 1.0
    rampup_epochs: int = 16
    beta1: float = 0.1  # prototype alignment weight
    beta2: float = 0.1  # noisy contrastive weight
    feature_delay: int = 10  # prototype/contrastive terms start this many epochs after warm-up
    proto_gamma: float = 0.999
    proto_temp: float = 0.3  # T'
    cont_temp: float = 0.07  # T''
    queue_size: int = 8192
    key_momentum: float = 0.999
    division_history: int = 5
    p_threshold: float = 0.5
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
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
    candidate_loss_weight: float = 0.0
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
class FewShotConfig:
    shots: int = 0  # true labels per class, trusted (candidate set = the label, always in P)
    seed: int = 0


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    experiment: str = "coreg-ray"
    run_name: str | None = None


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
        cfg = cls()
        for section, values in (data or {}).items():
            if not isinstance(values, dict):
                raise CoregError(f"config: section '{section}' must be a mapping, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "Config":
        data = load_yaml_mapping(path, "config file", "a mapping of sections") if path else {}
        cfg = cls.from_dict(data)
        for item in overrides or []:
            if "=" not in item:
                raise CoregError(f"override '{item}' must look like section.key=value")
            key, raw = item.split("=", 1)
            cfg.set(key.strip(), yaml.safe_load(raw) if raw.strip() else None)
        return cfg

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
        hint = typing.get_type_hints(type(section))[key]
        setattr(section, key, _coerce(dotted, value, hint))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise CoregError(f"config key '{name}' must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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
