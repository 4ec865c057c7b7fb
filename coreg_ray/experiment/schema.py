"""The experiment file: `Experiment.load` parses and validates it (schema in the package doc,
`coreg_ray.experiment`), `Setting` is one annotation source (a table column), and
`paper_annotator` builds a setting's paper-calibrated simulated annotator."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from coreg_ray.config import load_yaml_mapping
from coreg_ray.errors import CoregError

TOP_KEYS = ("name", "description", "data", "settings", "methods", "shots", "seeds", "config",
            "params", "resources", "parallel", "labels", "table")
DATA_KEYS = ("images", "test_images", "limit", "test_limit", "image_size")
KINDS = ("synthetic", "simulated_vlm", "paper_annotator", "annotations", "true_labels")
SETTING_KEYS = ("name", *KINDS, "test_annotations", "annotator", "data", "config")
KIND_KEYS = {"synthetic": ("q", "eta", "seed"),
             "simulated_vlm": ("templates", "per_class", "feature_fraction", "seed", "features"),
             "paper_annotator": ("like", "dataset", "partial_acc", "avg_candidates", "zero_shot",
                                 "templates", "features", "seed"),
             "true_labels": ()}
SIMULATED_KINDS = ("simulated_vlm", "paper_annotator")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
# methods whose result cannot depend on few-shot labels: the annotator's own accuracy, and the
# true-labels ceiling (every label is already a true one)
SHOT_FREE = ("zero_shot", "true_labels")
CONFIG_FREE = ("zero_shot",)  # measures the annotator: no training config involved
SIMULATED_NOTE = "simulated VLM annotator — a stand-in, not a VLM"
# Config keys added after results files were recorded, with the default that reproduces the
# behaviour from before they existed. A recorded run whose fingerprint was computed without such
# a key still matches while the key holds that value, so adding a key never reruns a finished
# table. (data.strong_view: "auto" is the colour view for RGB tables, the only view before it;
# data.placement: "auto" keeps the images on the device where they fit, as before it existed;
# train.sync_batchnorm changes nothing on one process, the only kind of run before it existed.)
ADDED_KEYS = ((("data", "strong_view"), "auto"), (("data", "placement"), "auto"),
              (("train", "sync_batchnorm"), True))


# ============================================================================ the experiment file
@dataclass
class Setting:
    name: str
    kind: str
    spec: dict | str  # the kind's parameters, or the annotation table path
    test_annotations: str | None
    annotator: str | None
    data: dict
    config: dict

    def describe_annotator(self) -> str:
        if self.annotator:
            text = self.annotator
        elif self.kind == "synthetic":
            s = self.spec
            text = (f"synthetic noisy partial labels (ALIM protocol: q={s['q']}, η={s['eta']}, "
                    f"seed {s.get('seed', 0)})")
        elif self.kind == "simulated_vlm":
            s = self.spec
            on = "patch features" if s.get("features") == "patches" else "coarse pixels"
            text = (f"{s.get('templates', 8)} weak template classifiers on {on}, "
                    f"{s.get('per_class', 10)} labelled images per class each")
        elif self.kind == "paper_annotator":
            text = paper_annotator(self.spec).spec
        elif self.kind == "true_labels":
            text = "the true labels as one-element candidate sets (the ceiling column)"
        else:
            text = f"annotation table {self.spec}"
        if self.kind in SIMULATED_KINDS:
            text = f"{SIMULATED_NOTE} ({text})"
        return text


@dataclass
class Experiment:
    name: str
    data: dict
    settings: list[Setting]
    methods: list[str]
    shots: list[int]
    seeds: list[int]
    config: dict
    params: dict
    resources: dict
    parallel: int | None
    labels: dict
    columns: str
    source: str | None = None
    overrides: list[str] = field(default_factory=list)
    description: str | None = None

    # -------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source, overrides=(), strict: bool = True) -> "Experiment":
        """Parse and validate an experiment (path or dict). strict=False skips the checks that
        need the files and the method registry (used to lint templates with placeholders)."""
        base_dir = Path.cwd()
        where = "experiment"
        if isinstance(source, (str, os.PathLike)):
            p = Path(source)
            raw = load_yaml_mapping(p, "experiment file")
            base_dir, where, src = p.resolve().parent, str(p), str(p)
        elif isinstance(source, dict):
            raw, src = json.loads(json.dumps(source)), None  # a deep copy of plain data
        else:
            raise CoregError(f"experiment must be a YAML path or a mapping, got {type(source).__name__}")
        if not isinstance(raw, dict):
            raise CoregError(f"{where}: must be a mapping")
        unknown = sorted(set(raw) - set(TOP_KEYS))
        if unknown:
            raise CoregError(f"{where}: unknown key(s) {', '.join(unknown)} (keys: {', '.join(TOP_KEYS)})")

        def resolve(value, what):
            return _resolve_path(value, base_dir, what, where, strict)

        name = str(raw.get("name") or (Path(src).stem if src else "experiment"))
        data = _data_section(raw.get("data") or {}, f"{where}: data")
        config = raw.get("config") or {}
        if isinstance(config, str):
            cp = Path(config) if Path(config).is_file() else base_dir / config
            if not cp.is_file():
                raise CoregError(f"{where}: config file not found: {config}")
            config = load_yaml_mapping(cp, "config file", "a mapping of sections")
        if not isinstance(config, dict):
            raise CoregError(f"{where}: config must be a mapping of sections or a YAML path")

        settings_raw = raw.get("settings")
        if not isinstance(settings_raw, list) or not settings_raw:
            raise CoregError(f"{where}: settings must be a non-empty list (the table's columns)")
        settings, names = [], set()
        for i, s in enumerate(settings_raw):
            settings.append(_setting(s, i, data, where, resolve))
            if settings[-1].name in names:
                raise CoregError(f"{where}: settings[{i}]: duplicate name '{settings[-1].name}'")
            names.add(settings[-1].name)

        methods = raw.get("methods")
        if methods == "all":
            from coreg_ray.methods import method_names

            methods = method_names()
        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise CoregError(f"{where}: methods must be a non-empty list of method names (or 'all')")
        if len(set(methods)) != len(methods):
            raise CoregError(f"{where}: methods: a method is listed twice")
        if strict:
            from coreg_ray.methods import method_names

            known = method_names()
            bad = [m for m in methods if m not in known]
            if bad:
                raise CoregError(f"{where}: unknown method(s) {', '.join(bad)} "
                                 f"(known: {', '.join(known)})")

        shots = _int_list(raw.get("shots", [0]), "shots", where, minimum=0)
        seeds = _int_list(raw.get("seeds", [0]), "seeds", where, minimum=0)
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            raise CoregError(f"{where}: params must map a method to its hyper-parameters")
        resources = raw.get("resources") or {}
        if not isinstance(resources, dict) or set(resources) - set(RESOURCE_KEYS):
            raise CoregError(f"{where}: resources: keys are {', '.join(RESOURCE_KEYS)}, got "
                             f"{resources!r}")
        for k, v in resources.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise CoregError(f"{where}: resources.{k} must be a number >= 0, got {v!r}")
        parallel = raw.get("parallel")
        if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
            raise CoregError(f"{where}: parallel must be an integer >= 1 or null, got {parallel!r}")
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict):
            raise CoregError(f"{where}: labels must map a method to its row label")
        table = raw.get("table") or {}
        if not isinstance(table, dict) or set(table) - {"columns"}:
            raise CoregError(f"{where}: table: only 'columns' (auto | settings | shots) is known")
        columns = table.get("columns", "auto")
        if columns not in ("auto", "settings", "shots"):
            raise CoregError(f"{where}: table.columns must be auto, settings or shots, got {columns!r}")
        exp = cls(name, data, settings, methods, shots, seeds, config, params, resources, parallel,
                  labels, columns, src, list(overrides), raw.get("description"))
        exp.validate(where, strict)
        return exp

    def validate(self, where: str, strict: bool):
        for s in self.settings:
            if not s.data.get("images"):
                raise CoregError(f"{where}: setting '{s.name}': no data.images (set data.images "
                                 "at the top or in the setting)")
            if not s.data.get("test_images"):
                raise CoregError(f"{where}: setting '{s.name}': no data.test_images (the table "
                                 "reports test accuracy)")
            if "zero_shot" in self.methods and s.kind == "annotations" and not s.test_annotations:
                raise CoregError(f"{where}: setting '{s.name}': method zero_shot needs "
                                 "test_annotations (the annotator's table for the test images)")
            self.run_config(s)  # unknown config keys and bad values fail here
        from coreg_ray.methods import COREG_VARIANTS, FEWSHOT

        for m in self.methods:
            if m in FEWSHOT and m not in self.params:
                raise CoregError(f"{where}: method {m} needs params.{m}.model (the annotator "
                                 "model to fine-tune)")
        for m, p in self.params.items():
            if m not in self.methods:
                raise CoregError(f"{where}: params.{m}: '{m}' is not in methods")
            if not isinstance(p, dict):
                raise CoregError(f"{where}: params.{m} must be a mapping")
            if m in FEWSHOT and not p.get("model"):
                raise CoregError(f"{where}: params.{m}.model is required (the annotator model "
                                 "to fine-tune)")
            if p and m == "zero_shot":
                raise CoregError(f"{where}: params.zero_shot: zero-shot has no parameters")
            if p and m in COREG_VARIANTS:
                from coreg_ray.config import Config
                from coreg_ray.methods import apply_variant_params

                apply_variant_params(Config(), p, f"{where}: params.{m}")  # fails on bad keys
            if strict and p:
                from coreg_ray.baselines import METHODS

                if m in METHODS:
                    bad = sorted(set(p) - set(METHODS[m].defaults))
                    if bad:
                        raise CoregError(f"{where}: params.{m}: unknown parameter(s) "
                                         f"{', '.join(bad)} (known: {', '.join(sorted(METHODS[m].defaults))})")

    # -------------------------------------------------------------------- runs
    def run_config(self, setting: Setting):
        """The Config of a setting's runs (before the run's own seed/shots)."""
        from coreg_ray.config import Config

        cfg = Config.from_dict(self.config)
        cfg.update(setting.config, where=f"setting '{setting.name}': config")
        return cfg.apply_overrides(self.overrides)

    def runs(self) -> list[dict]:
        """Every run, the first seed's first (so the table fills early)."""
        out = []
        for seed in self.seeds:
            for s in self.settings:
                base = json.dumps(self.run_config(s).to_dict())
                for k in self.shots:
                    for m in self.methods:
                        if m in SHOT_FREE and k != self.shots[0]:
                            continue
                        shots = 0 if m in SHOT_FREE else k
                        resolved = json.loads(base)  # a copy of the validated config
                        resolved["train"]["seed"] = seed
                        resolved["fewshot"].update(shots=shots, seed=seed)
                        resolved["tracking"]["mlflow"] = False  # the driver logs every run
                        params = self.params.get(m) or {}
                        fp = {k2: v for k2, v in resolved.items() if k2 != "tracking"}
                        if m in CONFIG_FREE:
                            fp, params = None, {}
                        setting = [s.kind, s.spec, s.test_annotations, s.data]
                        fingerprint = _fingerprint(m, setting, fp, params)
                        out.append({"key": run_key(s.name, m, shots, seed), "setting": s.name,
                                    "method": m, "shots": shots, "seed": seed, "config": resolved,
                                    "params": params, "fingerprint": fingerprint,
                                    "accepts": _legacy_fingerprints(m, setting, fp, params)})
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "data": self.data,
                "settings": [_setting_dict(s) for s in self.settings], "methods": self.methods,
                "shots": self.shots, "seeds": self.seeds, "config": self.config,
                "overrides": self.overrides, "params": self.params, "resources": self.resources,
                "parallel": self.parallel, "labels": self.labels,
                "table": {"columns": self.columns}, "source": self.source}


def _fingerprint(method, setting, config, params) -> str:
    return hashlib.sha1(json.dumps({"method": method, "setting": setting, "config": config,
                                    "params": params}, sort_keys=True, default=str
                                   ).encode()).hexdigest()[:16]


def _legacy_fingerprints(method, setting, config, params) -> set[str]:
    """The run's fingerprint plus those it had before each of ADDED_KEYS existed (cumulatively,
    newest first), as long as those keys hold their behaviour-preserving default."""
    accepted = {_fingerprint(method, setting, config, params)}
    if config is None:
        return accepted
    cfg = json.loads(json.dumps(config))
    for (section, key), default in reversed(ADDED_KEYS):
        if cfg.get(section, {}).get(key, default) != default:
            break
        cfg.get(section, {}).pop(key, None)
        accepted.add(_fingerprint(method, setting, cfg, params))
    return accepted


def run_key(setting: str, method: str, shots: int, seed: int) -> str:
    return f"{setting}|{method}|{shots}|{seed}"


def _setting_dict(s: Setting) -> dict:
    d = {"name": s.name, s.kind: s.spec, "data": s.data}
    if s.test_annotations:
        d["test_annotations"] = s.test_annotations
    if s.annotator:
        d["annotator"] = s.annotator
    if s.config:
        d["config"] = s.config
    return d


def _resolve_path(value, base_dir: Path, what: str, where: str, strict: bool):
    if value is None:
        return None
    value = str(value)
    if value.split(":")[0] == "digits" or value.startswith("torchvision:") or "://" in value:
        return value
    p = Path(value).expanduser()
    if p.exists():
        return str(p)
    if not p.is_absolute() and (base_dir / p).exists():
        return str(base_dir / p)
    if strict:
        raise CoregError(f"{where}: {what}: not found: {value}")
    return value


def _data_section(d, where) -> dict:
    if not isinstance(d, dict):
        raise CoregError(f"{where} must be a mapping")
    bad = sorted(set(d) - set(DATA_KEYS))
    if bad:
        raise CoregError(f"{where}: unknown key(s) {', '.join(bad)} (keys: {', '.join(DATA_KEYS)})")
    for k in ("limit", "test_limit", "image_size"):
        v = d.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise CoregError(f"{where}.{k} must be a positive integer or null, got {v!r}")
    return dict(d)


def _setting(s, i, data, where, resolve) -> Setting:
    at = f"{where}: settings[{i}]"
    if not isinstance(s, dict):
        raise CoregError(f"{at} must be a mapping with a name and one of {', '.join(KINDS)}")
    if not s.get("name"):
        raise CoregError(f"{at}: needs a name (the column header)")
    at = f"{where}: setting '{s['name']}'"
    bad = sorted(set(s) - set(SETTING_KEYS))
    if bad:
        raise CoregError(f"{at}: unknown key(s) {', '.join(bad)} (keys: {', '.join(SETTING_KEYS)})")
    kinds = [k for k in KINDS if k in s]
    if len(kinds) != 1:
        raise CoregError(f"{at}: give exactly one of {', '.join(KINDS)} (got "
                         f"{', '.join(kinds) or 'none'})")
    kind = kinds[0]
    spec = s[kind]
    merged = {**data, **_data_section(s.get("data") or {}, f"{at}: data")}
    for k in ("images", "test_images"):
        if merged.get(k):
            merged[k] = resolve(merged[k], f"data.{k}" if k not in (s.get("data") or {})
                                else f"setting '{s['name']}': data.{k}")
    test_ann = None
    if kind == "annotations":
        if not isinstance(spec, str) or not spec:
            raise CoregError(f"{at}: annotations must be the path of an annotation table")
        spec = resolve(spec, f"setting '{s['name']}': annotations")
        if s.get("test_annotations"):
            test_ann = resolve(s["test_annotations"], f"setting '{s['name']}': test_annotations")
    else:
        if s.get("test_annotations"):
            raise CoregError(f"{at}: test_annotations only goes with annotations (a {kind} "
                             "setting annotates the test images itself)")
        spec = dict(spec or {})
        bad = sorted(set(spec) - set(KIND_KEYS[kind]))
        if bad:
            raise CoregError(f"{at}: {kind}: unknown key(s) {', '.join(bad)} "
                             f"(keys: {', '.join(KIND_KEYS[kind])})")
        if kind == "synthetic":
            for k in ("q", "eta"):
                v = spec.get(k)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                    raise CoregError(f"{at}: synthetic.{k} must be a number in [0, 1], got {v!r}")
        elif kind == "paper_annotator":
            paper_annotator(spec, at)  # validates
        elif kind == "true_labels":
            pass  # no parameters: `true_labels: {}`
        else:
            for k in ("templates", "per_class"):
                v = spec.get(k)
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise CoregError(f"{at}: simulated_vlm.{k} must be a positive integer, got {v!r}")
            if spec.get("features", "pixels") not in ("pixels", "patches"):
                raise CoregError(f"{at}: simulated_vlm.features must be pixels or patches, got "
                                 f"{spec.get('features')!r}")
    config = s.get("config") or {}
    if not isinstance(config, dict):
        raise CoregError(f"{at}: config must be a mapping of sections")
    return Setting(str(s["name"]), kind, spec, test_ann, s.get("annotator"), merged, config)


def _int_list(v, key, where, minimum=0) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if (not isinstance(v, list) or not v
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)):
        raise CoregError(f"{where}: {key} must be a non-empty list of integers >= {minimum}, got {v!r}")
    if len(set(v)) != len(v):
        raise CoregError(f"{where}: {key}: a value is listed twice")
    return list(v)


def paper_annotator(spec: dict, where: str = "paper_annotator"):
    """A `PaperLikeAnnotator` from a setting's spec: a preset (`like` + `dataset`) or explicit
    targets (`partial_acc`, `avg_candidates`, `zero_shot`, `templates`); errors start with
    `where`."""
    from coreg_ray.annotate.simulated import PaperLikeAnnotator

    spec = dict(spec or {})
    like, dataset = spec.pop("like", None), spec.pop("dataset", None)
    try:
        if (like is None) != (dataset is None):
            raise CoregError("a preset needs both like (annotator) and dataset")
        preset = None if like is None else (str(like), str(dataset))
        return PaperLikeAnnotator.from_options(spec, preset, "like and dataset")
    except (TypeError, ValueError, CoregError) as exc:
        raise CoregError(f"{where}: {exc}") from None
