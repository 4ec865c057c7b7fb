"""Experiments: a grid of (setting, method, shots, seed) runs on Ray -> a table in the paper's layout.

    coreg-ray experiment --config configs/exp-cifar-cpu.yaml --output runs/cifar-cpu
    ray job submit --working-dir . -- python jobs/experiment.py --config ... --output ...

Every run is one Ray task (`run_method` from `coreg_ray.methods`, the single entry point of every
method). The image tables go into the object store once; annotations are built once per setting
(they do not depend on the run's seed). The driver collects runs as they finish and, for each:
appends one JSON line to `OUTPUT/results.jsonl` (nothing is lost when the job dies; a relaunch
skips the runs recorded there with the same fingerprint and retries failed ones), logs an MLflow
child run under one parent run for the experiment, prints one progress line, and rewrites
`OUTPUT/table.md` and `OUTPUT/table.csv`. A run that raises is recorded with its error and its
cell reads `failed`; the other runs go on.

Experiment file (YAML)
----------------------

    name: cifar10-cpu                   # title of the table, MLflow parent run name
    description: free text              # optional
    data:                               # shared by every setting (a setting may override keys)
      images: ../shared/data/cifar10-jpeg/train.parquet   # any load_image_table source
      test_images: ../shared/data/cifar10-jpeg/test.parquet  # labelled; required
      limit: 1000                       # first N training rows (null: all)
      test_limit: 1000                  # first N test rows (null: all)
      image_size: null                  # resize on load (null: config data.image_size / native)
    settings:                           # table COLUMNS: annotation sources, exactly one kind each
      - {name: "q=0.3, η=0.3", synthetic: {q: 0.3, eta: 0.3, seed: 0}}
      - {name: simulated VLM, simulated_vlm: {templates: 8, per_class: 100,
                                              feature_fraction: 0.5, seed: 0,
                                              features: patches}}   # or pixels (default)
      - {name: CLIP ViT-B/32 (simulated),                 # the paper's annotation statistics
         paper_annotator: {like: clip-vitb32, dataset: gtsrb, seed: 0}}   # (or partial_acc,
                                        # avg_candidates, zero_shot, templates; features, seed)
      - name: CLIP ViT-B/32             # real annotation tables (coreg-ray annotate)
        annotations: ann/cifar10-train.parquet
        test_annotations: ann/cifar10-test.parquet        # needed by zero_shot
        annotator: CLIP ViT-B/32 (openai), 27 templates   # footer text (optional)
        data: {images: ..., test_images: ...}             # optional per-setting data (a dataset column)
        config: {data: {hflip: false}}                    # optional per-setting config sections
    methods: [zero_shot, cc, dividemix, coreg]   # table ROWS (`all`: every registered method)
    shots: [0]                          # few-shot grid (fewshot.shots; true labels per class)
    seeds: [0, 1]                       # train.seed and fewshot.seed of each run
    config: {model: {backbone: small_cnn}, train: {epochs: 20}}   # base Config (or a YAML path)
    params: {pico: {...}}               # per-method hyper-parameters; for a Co-Reg variant,
                                        # dotted config keys applied after its preset
    resources: {num_cpus: 1, num_gpus: 0}   # per run (Ray task); memory: bytes (optional)
    parallel: null                      # at most N runs at once (null: as resources allow)
    labels: {coreg: Ours}               # row labels (default: from methods.describe)
    table: {columns: auto}              # auto | settings | shots

- Relative paths are looked up from the current directory, then from the experiment file's.
- Config precedence per run: `config` < the setting's `config` < `--set` overrides < the run's
  own keys (train.seed, fewshot.shots, fewshot.seed).
- Synthetic settings annotate the test split too (generator seed + 1) so `zero_shot` can be
  measured; a simulated VLM is fitted on the training labels and annotates train and test; a
  paper_annotator (`coreg_ray.annotate.simulated`) is calibrated on the training table to the
  paper's statistics and annotates both splits with that calibration.
  `zero_shot` does not depend on shots: it runs once per (setting, seed), with shots 0.
- Table layout: rows = methods, columns = settings; with several `shots` and one setting the
  columns are shots ("1-shot", ...). With several shots and settings-columns, rows are
  "method k-shot" (the paper's Table I). Cells are mean ± sample std over seeds of the final
  test accuracy in percent; the best per column is bold.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coreg_ray.config import load_yaml_mapping
from coreg_ray.errors import CoregError

TOP_KEYS = ("name", "description", "data", "settings", "methods", "shots", "seeds", "config",
            "params", "resources", "parallel", "labels", "table")
DATA_KEYS = ("images", "test_images", "limit", "test_limit", "image_size")
KINDS = ("synthetic", "simulated_vlm", "paper_annotator", "annotations")
SETTING_KEYS = ("name", *KINDS, "test_annotations", "annotator", "data", "config")
KIND_KEYS = {"synthetic": ("q", "eta", "seed"),
             "simulated_vlm": ("templates", "per_class", "feature_fraction", "seed", "features"),
             "paper_annotator": ("like", "dataset", "partial_acc", "avg_candidates", "zero_shot",
                                 "templates", "features", "seed")}
SIMULATED_KINDS = ("simulated_vlm", "paper_annotator")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
SHOT_FREE = ("zero_shot",)  # methods whose result cannot depend on few-shot labels
SHORT_LABELS = {"zero_shot": "Zero-shot (annotator, test)", "warmup_only": "Warm-up loss only",
                "dividemix": "DivideMix (ensemble label)", "coreg": "Co-Reg",
                "coreg_balanced": "Co-Reg, class-balanced split", "kd_unsup": "KD_unsup",
                "coreg_no_copl": "Co-Reg w/o co-pseudo-labels", "coreg_supcon": "Co-Reg, plain SupCon",
                "coreg_no_proto": "Co-Reg w/o prototypes", "coreg_no_u": "Co-Reg w/o U",
                "cc": "CC", "proden": "PRODEN", "rc": "RC", "lws": "LWS", "cr_dpll": "CR-DPLL",
                "pico": "PiCO", "pico_plus": "PiCO+", "alim_onehot": "ALIM-Onehot",
                "alim_scale": "ALIM-Scale", "coop": "CoOp", "lora": "LoRA"}
SIMULATED_NOTE = "simulated VLM annotator — a stand-in, not a VLM"


# ============================================================================ the table (pure)
@dataclass
class Table:
    """A formatted result table. `cells[(row, column)]` holds mean/std (percent), n, failed."""

    title: str
    columns: list[str]
    rows: list[str]
    grid: list[list[str]]  # cell texts (no bold), one list per row
    cells: dict = field(default_factory=dict)
    best: set = field(default_factory=set)  # (row, column) pairs in bold
    stat_rows: int = 0  # leading rows that are annotation statistics, not methods
    header: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # filled by run_experiment

    @property
    def markdown(self) -> str:
        lines = [f"# {self.title}", ""] if self.title else []
        if self.header:
            lines += [*self.header, ""]
        lines.append("| Method | " + " | ".join(_md(c) for c in self.columns) + " |")
        lines.append("| --- |" + " ---: |" * len(self.columns))
        for r, (row, texts) in enumerate(zip(self.rows, self.grid)):
            out = [f"**{t}**" if (row, col) in self.best else t
                   for col, t in zip(self.columns, texts)]
            label = f"*{_md(row)}*" if r < self.stat_rows else _md(row)
            lines.append(f"| {label} | " + " | ".join(out) + " |")
        if self.footer:
            lines += ["", *self.footer]
        return "\n".join(lines) + "\n"

    @property
    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", *self.columns])
        for row, texts in zip(self.rows, self.grid):
            w.writerow([row, *texts])
        return buf.getvalue()


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def shot_label(k: int) -> str:
    return f"{k}-shot"


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # sample std (ddof=1)
    return mean, math.sqrt(var)


def format_table(rows: list[dict], methods: list[str] | None = None,
                 settings: list[str] | None = None, shots: list[int] | None = None,
                 columns: str = "auto", labels: dict | None = None, stats: dict | None = None,
                 expected_seeds: int | None = None, title: str = "", header=(), footer=(),
                 digits: int = 1, shot_free=SHOT_FREE) -> Table:
    """Aggregate run records into the paper's layout; pure (no I/O).

    rows: dicts with `method`, `setting`, `shots` (default 0), `seed`, and `test_accuracy`
    (a fraction) or `status: failed`. Orders default to first appearance. `stats` maps a setting
    to its annotation statistics (`partial_accuracy`, `avg_candidates`): shown as the first rows
    when the columns are settings. `expected_seeds`: cells with fewer finished seeds say so.
    A cell is `mean ± std` (percent, sample std; the mean alone for one seed), `failed` when
    every run of it failed, `–` when none has run; `(k failed)` marks partly failed cells.
    The best mean per column (as displayed) is bold, ties included.
    """
    labels = labels or {}

    def order(key, given, default=None):
        if given is not None:
            return list(given)
        seen = []
        for r in rows:
            v = r.get(key, default)
            if v not in seen:
                seen.append(v)
        return seen

    methods = order("method", methods)
    settings = order("setting", settings)
    shots = order("shots", shots, 0) or [0]
    if columns == "auto":
        columns = "shots" if len(shots) > 1 and len(settings) == 1 else "settings"
    if columns not in ("settings", "shots"):
        raise CoregError(f"table.columns must be auto, settings or shots, got {columns!r}")

    def label(m):
        return labels.get(m) or method_label(m)

    # (row label, column label) -> predicate over records
    row_keys, col_keys = [], []
    if columns == "settings":
        col_keys = [(s, s) for s in settings]
        many = len(shots) > 1 or shots != [0]
        for i, k in enumerate(shots):
            for m in methods:
                if m in shot_free:
                    if i == 0:
                        row_keys.append((label(m), m, None, None))
                    continue
                row_keys.append((f"{label(m)} {shot_label(k)}" if many and k else label(m),
                                 m, k, None))
    else:
        col_keys = [(shot_label(k), k) for k in shots]
        for s in settings:
            for m in methods:
                row_keys.append((label(m) if len(settings) == 1 else f"{label(m)} ({s})",
                                 m, None, s))

    def matches(r, rk, ck):
        _, m, k, s = rk
        if r.get("method") != m:
            return False
        if columns == "settings":
            if r.get("setting") != ck[1]:
                return False
            return k is None or r.get("shots", 0) == k
        if r.get("setting") != s:
            return False
        return m in shot_free or r.get("shots", 0) == ck[1]

    grid, cells, col_labels = [], {}, [c[0] for c in col_keys]
    row_labels = []
    stat_rows = 0
    if stats and columns == "settings":
        def pct(v):
            return "–" if v is None else f"{100 * v:.{digits}f}"

        def num(v):
            return "–" if v is None else f"{v:.2f}"

        for name, key, fmt in (("Partial Acc. (train)", "partial_accuracy", pct),
                               ("Avg. num", "avg_candidates", num)):
            if any((stats.get(s) or {}).get(key) is not None for s in settings):
                row_labels.append(name)
                grid.append([fmt((stats.get(s) or {}).get(key)) for s in settings])
                stat_rows += 1
    best_val: dict[str, float] = {}
    for rk in row_keys:
        texts = []
        for ck in col_keys:
            recs = [r for r in rows if matches(r, rk, ck)]
            vals = [100.0 * float(r["test_accuracy"]) for r in recs
                    if r.get("status", "ok") != "failed" and r.get("test_accuracy") is not None]
            failed = sum(1 for r in recs if r.get("status") == "failed")
            not_applicable = bool(recs) and all(r.get("status") == "n/a" for r in recs)
            cell = {"n": len(vals), "failed": failed, "mean": None, "std": None}
            if vals:
                mean, std = _stats(vals)
                cell.update(mean=mean, std=std)
                text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
                if failed:
                    text += f" ({failed} failed)"
                elif expected_seeds and len(vals) < expected_seeds:
                    text += f" (n={len(vals)})"
                shown = round(mean, digits)
                best_val[ck[0]] = max(best_val.get(ck[0], -math.inf), shown)
            else:
                text = "n/a" if not_applicable else ("failed" if failed else "–")
            cell["text"] = text
            cells[(rk[0], ck[0])] = cell
            texts.append(text)
        row_labels.append(rk[0])
        grid.append(texts)
    best = {(rk[0], ck[0]) for rk in row_keys for ck in col_keys
            if cells[(rk[0], ck[0])]["mean"] is not None
            and round(cells[(rk[0], ck[0])]["mean"], digits) == best_val.get(ck[0])}
    return Table(title, col_labels, row_labels, grid, cells, best, stat_rows, list(header),
                 list(footer))


def method_label(name: str) -> str:
    """Short row label: the method's description up to its first ':' or trailing '(...)'."""
    if name in SHORT_LABELS:
        return SHORT_LABELS[name]
    try:
        from coreg_ray.methods import describe

        text = describe(name)
    except Exception:  # unknown now (e.g. a method of a newer version): its name
        return name
    text = text.split(":")[0].strip()
    if text.endswith(")") and " (" in text:
        text = text[:text.rindex(" (")].strip()
    return text or name


def method_description(name: str) -> str:
    """One paragraph about a method (a baseline's docstring paragraph, else describe())."""
    from coreg_ray.baselines import METHODS
    from coreg_ray.methods import describe

    if name in METHODS and METHODS[name].__doc__:
        return " ".join(METHODS[name].__doc__.strip().split("\n\n")[0].split())
    try:
        return describe(name)
    except CoregError:
        return name


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
        for section, values in (setting.config or {}).items():
            if not isinstance(values, dict):
                raise CoregError(f"setting '{setting.name}': config section '{section}' must be a mapping")
            for k, v in values.items():
                cfg.set(f"{section}.{k}", v)
        for item in self.overrides:
            if "=" not in item:
                raise CoregError(f"override '{item}' must look like section.key=value")
            k, v = item.split("=", 1)
            cfg.set(k.strip(), yaml.safe_load(v) if v.strip() else None)
        return cfg

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
                        if m in SHOT_FREE:  # measures the annotator: no config involved
                            fp, params = None, {}
                        fingerprint = hashlib.sha1(json.dumps(
                            {"method": m, "setting": [s.kind, s.spec, s.test_annotations, s.data],
                             "config": fp, "params": params}, sort_keys=True, default=str
                        ).encode()).hexdigest()[:16]
                        out.append({"key": run_key(s.name, m, shots, seed), "setting": s.name,
                                    "method": m, "shots": shots, "seed": seed, "config": resolved,
                                    "params": params, "fingerprint": fingerprint})
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "data": self.data,
                "settings": [_setting_dict(s) for s in self.settings], "methods": self.methods,
                "shots": self.shots, "seeds": self.seeds, "config": self.config,
                "overrides": self.overrides, "params": self.params, "resources": self.resources,
                "parallel": self.parallel, "labels": self.labels,
                "table": {"columns": self.columns}, "source": self.source}


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


# ============================================================================ data + annotations
def _data_key(d: dict, image_size) -> str:
    return json.dumps({**{k: d.get(k) for k in DATA_KEYS}, "image_size": image_size}, sort_keys=True)


def paper_annotator(spec: dict, where: str = "paper_annotator"):
    """A `PaperLikeAnnotator` from a setting's spec: a preset (`like` + `dataset`) or explicit
    targets (`partial_acc`, `avg_candidates`, `zero_shot`, `templates`)."""
    from coreg_ray.annotate.simulated import PaperLikeAnnotator, paper_targets

    spec = dict(spec or {})
    try:
        if spec.get("like") is not None or spec.get("dataset") is not None:
            if spec.get("like") is None or spec.get("dataset") is None:
                raise CoregError("a preset needs both like (annotator) and dataset")
            k, (pa, avg, zs) = paper_targets(str(spec["like"]), str(spec["dataset"]))
            name = f"{spec['like']}/{spec['dataset']}"
        else:
            missing = [k for k in ("partial_acc", "avg_candidates", "zero_shot") if k not in spec]
            if missing:
                raise CoregError("give a preset (like and dataset) or all three targets "
                                 f"partial_acc, avg_candidates, zero_shot (missing: {', '.join(missing)})")
            k, pa, avg, zs, name = 27, spec["partial_acc"], spec["avg_candidates"], spec["zero_shot"], ""
        return PaperLikeAnnotator(float(spec.get("partial_acc", pa)),
                                  float(spec.get("avg_candidates", avg)),
                                  float(spec.get("zero_shot", zs)), int(spec.get("templates", k)),
                                  spec.get("features", "pixels"), int(spec.get("seed", 0)), name)
    except (TypeError, ValueError) as exc:
        raise CoregError(f"{where}: {exc}") from None
    except CoregError as exc:
        raise CoregError(f"{where}: {exc}") from None


def build_annotations(setting: Setting, train, test):
    """(train annotations, test annotations or None) of a setting."""
    from coreg_ray.data import SimulatedVLM, read_annotations, synthetic_annotations

    c = train.num_classes
    if setting.kind in ("synthetic", *SIMULATED_KINDS) and train.labels is None:
        raise CoregError(f"setting '{setting.name}': {setting.kind} annotations need labelled "
                         "training images")
    if setting.kind == "synthetic":
        s = setting.spec
        seed = int(s.get("seed", 0))
        ann = synthetic_annotations(train.ids, train.labels, c, s["q"], s["eta"], seed)
        test_ann = synthetic_annotations(test.ids, test.labels, c, s["q"], s["eta"], seed + 1)
    elif setting.kind == "simulated_vlm":
        s = setting.spec
        vlm = SimulatedVLM(s.get("templates", 8), s.get("per_class", 10),
                           s.get("feature_fraction", 0.5), s.get("seed", 0),
                           s.get("features", "pixels"))
        vlm.fit(train.images, train.labels, c)
        ann, test_ann = vlm.annotate(train.images, train.ids), vlm.annotate(test.images, test.ids)
    elif setting.kind == "paper_annotator":
        vlm = paper_annotator(setting.spec, f"setting '{setting.name}'")
        vlm.fit(train.images, train.labels, c)
        ann = vlm.annotate(train.images, train.labels, train.ids)
        test_ann = vlm.annotate(test.images, test.labels, test.ids)
    else:
        ann = read_annotations(setting.spec, c).align_to(train.ids, str(setting.spec))
        test_ann = None
        if setting.test_annotations:
            test_ann = read_annotations(setting.test_annotations, c).align_to(
                test.ids, str(setting.test_annotations))
    return ann, test_ann


def device_name(device: str = "auto") -> str:
    """The torch device a run of `train.device` uses, in words (for the table header)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        return torch.cuda.get_device_name(index)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU ({model}, {n} thread{'s' if n != 1 else ''})"


# ============================================================================ one run (a Ray task)
def execute_run(run: dict, train, test, annotations, test_annotations) -> dict:
    """Run one (setting, method, shots, seed) and return its outcome; never raises."""
    import warnings

    # ray.get gives read-only NumPy arrays (zero copy); the trainers only read them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    t0 = time.perf_counter()
    out: dict = {"status": "ok", "error": None}
    try:
        import torch

        from coreg_ray.config import Config
        from coreg_ray.methods import run_method

        cpus = run.get("num_cpus")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        out["device"] = device_name(run["config"]["train"]["device"])
        cfg = Config.from_dict(run["config"])
        label = f"{run['method']} · {run['setting']} · seed {run['seed']}"

        def progress(epoch, stats, trainer):  # one line per test pass: long runs show life
            if "test_accuracy" in stats:
                print(f"  {label}: epoch {epoch + 1}/{cfg.train.epochs}, test "
                      f"{100 * stats['test_accuracy']:.1f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

        res = run_method(run["method"], cfg, train, annotations, test, test_annotations,
                         params=run["params"] or None, callbacks=[progress])
        out.update({k: _plain(v) for k, v in res.items()})
        if out.get("test_accuracy") is None:
            raise CoregError("the method reported no test accuracy")
    except BaseException as exc:  # noqa: BLE001 - recorded, the experiment goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        from coreg_ray.errors import NotApplicable

        out.update(status="n/a" if isinstance(exc, NotApplicable) else "failed", test_accuracy=None,
                   error=f"{type(exc).__name__}: {msg}"[:1000],
                   traceback=traceback.format_exc()[-4000:])
    out["wall_seconds"] = time.perf_counter() - t0
    return out


HISTORY_KEYS = ("epoch", "phase", "test_accuracy", "p_fraction", "p_precision_net1",
                "p_precision_net2", "pseudo_accuracy_p", "pseudo_accuracy_u", "loss", "loss_x",
                "loss_u", "loss_prot", "loss_cont", "loss_cand", "epoch_seconds")


def epoch_rows(history: list[dict]) -> list[dict]:
    """The per-epoch curve a results.jsonl record keeps: test accuracy, the P/U split and
    pseudo-label accuracy (when truth exists) and the loss terms, rounded."""
    return [{k: (round(h[k], 5) if isinstance(h[k], float) else h[k])
             for k in HISTORY_KEYS if k in h} for h in history]


def _plain(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ============================================================================ MLflow (driver)
class _Tracker:
    """One parent run per experiment output (reused on relaunch) and a child run per run."""

    def __init__(self, exp: Experiment, cfg, out: Path, resume: bool, log):
        from coreg_ray.distributed.tracking import tracking_uri
        from coreg_ray.errors import require

        require("mlflow", "mlflow")
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.log, self.warned = log, False
        self.uri = tracking_uri(cfg.tracking.tracking_uri)
        self.client = MlflowClient(self.uri)
        exp_obj = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.exp_id = exp_obj.experiment_id if exp_obj else \
            self.client.create_experiment(cfg.tracking.experiment)
        key = str(out.resolve())
        found = []
        if resume:
            found = self.client.search_runs(
                [self.exp_id], filter_string=f"tags.`coreg.experiment_output` = '{key}'",
                max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.parent = found[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            from mlflow.entities import Param

            run = self.client.create_run(self.exp_id, run_name=exp.name,
                                         tags={"coreg.experiment_output": key,
                                               "coreg.experiment": exp.name})
            self.parent = run.info.run_id
            ps = {"experiment.name": exp.name, "experiment.source": exp.source or "(dict)",
                  "experiment.settings": json.dumps([s.name for s in exp.settings], ensure_ascii=False),
                  "experiment.methods": json.dumps(exp.methods), "experiment.seeds": json.dumps(exp.seeds),
                  "experiment.shots": json.dumps(exp.shots),
                  "experiment.overrides": json.dumps(exp.overrides),
                  "experiment.resources": json.dumps(exp.resources)}
            self.client.log_batch(self.parent, params=[Param(k, v[:6000]) for k, v in ps.items()])

    def log_run(self, run: dict, rec: dict, history: list[dict], annotator: str) -> str | None:
        try:
            return self._log_run(run, rec, history, annotator)
        except Exception as exc:  # tracking must not stop the experiment
            if not self.warned:
                self.log(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); "
                         "results.jsonl still has every run")
                self.warned = True
            return None

    def _log_run(self, run, rec, history, annotator):
        from mlflow.entities import Metric, Param

        name = f"{rec['method']} · {rec['setting']} · seed {rec['seed']}" + \
            (f" · {rec['shots']}-shot" if rec["shots"] else "")
        child = self.client.create_run(self.exp_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent, "coreg.run_key": rec["key"],
            "coreg.fingerprint": rec["fingerprint"], "coreg.status": rec["status"]})
        cid = child.info.run_id
        flat = {"method": rec["method"], "setting": rec["setting"], "seed": rec["seed"],
                "shots": rec["shots"], "annotator": annotator,
                **{f"{s}.{k}": v for s, sec in run["config"].items() if s != "tracking"
                   for k, v in sec.items()},
                **{f"params.{k}": v for k, v in (run["params"] or {}).items()}}
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(cid, params=params[i:i + 100])
        ts = int(time.time() * 1000)
        ms = []
        for h in history or []:
            step = int(h.get("epoch", 0))
            ms += [Metric(k, float(v), ts, step) for k, v in h.items()
                   if k != "epoch" and _finite(v)]
        final = {"test_accuracy": rec.get("test_accuracy"), "seconds": rec.get("seconds"),
                 "wall_seconds": rec.get("wall_seconds")}
        ms += [Metric(f"final_{k}" if k == "test_accuracy" and history else k, float(v), ts,
                      int(rec.get("epochs") or 0)) for k, v in final.items() if _finite(v)]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(cid, metrics=ms[i:i + 1000])
        if rec["status"] in ("failed", "n/a"):
            self.client.set_tag(cid, "error" if rec["status"] == "failed" else "not_applicable",
                                str(rec.get("error"))[:5000])
        # n/a is a finished answer (the method cannot apply), not a failure
        self.client.set_terminated(cid, "FAILED" if rec["status"] == "failed" else "FINISHED")
        return cid

    def finish(self, status: str, summary: dict, files: list[Path]):
        from mlflow.entities import Metric

        try:
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, 0) for k, v in summary.items() if _finite(v)]
            if ms:
                self.client.log_batch(self.parent, metrics=ms)
            for f in files:
                if f.exists():
                    self.client.log_artifact(self.parent, str(f))
        finally:
            self.client.set_terminated(self.parent, status)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ============================================================================ driver
def _read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: the run is redone
            continue
    return out


def _append(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _write_atomic(path: Path, text: str):
    from coreg_ray.outputs import write_text_atomic

    write_text_atomic(path, text)


def _start_ray(log):
    from coreg_ray.errors import require

    ray = require("ray", "ray")
    if not ray.is_initialized():
        import logging

        # RAY_ADDRESS set (inside `ray job submit`, or by the user): join that cluster;
        # otherwise start a local Ray with this machine's resources.
        ray.init(logging_level=logging.WARNING)
    return ray


def run_experiment(config, output_dir, overrides=(), parallel: int | None = None,
                   resume: bool = True, mlflow: bool | None = None, log=print) -> Table:
    """Run (or finish) an experiment; returns the table (also in OUTPUT/table.{md,csv}).

    config: experiment YAML path or dict (schema in the module doc). overrides: `key=value`
    applied to the base config of every run. parallel: at most N runs at once. resume: skip
    runs already in OUTPUT/results.jsonl (False: set that file aside and run everything).
    mlflow: False turns tracking off (None: the config's tracking.mlflow).
    """
    exp = Experiment.load(config, overrides)
    if parallel is not None and parallel < 1:
        raise CoregError(f"--parallel must be >= 1, got {parallel}")
    parallel = parallel or exp.parallel
    # Nothing is written until the experiment, its output folder, every table and every
    # setting's annotations have been checked: a bad input is one line and leaves OUTPUT as it was.
    from coreg_ray.outputs import check_output_dir, check_output_file

    out = check_output_dir(output_dir)
    for name in ("results.jsonl", "experiment.yaml", "table.md", "table.csv"):
        check_output_file(out / name)
    results_path = out / "results.jsonl"

    runs = exp.runs()
    fingerprints = {r["key"]: r["fingerprint"] for r in runs}
    latest: dict[str, dict] = {}
    for rec in _read_results(results_path) if resume else []:  # the last record of a run wins
        if fingerprints.get(rec.get("key")) == rec.get("fingerprint"):
            latest[rec["key"]] = rec
    todo = [r for r in runs if latest.get(r["key"], {}).get("status") not in ("ok", "n/a")]
    done_before = len(runs) - len(todo)

    # the data: each distinct table loaded once; annotations once per setting
    base_cfg = exp.run_config(exp.settings[0])
    tables, setting_data, stats, annotator = {}, {}, {}, {}
    for s in exp.settings:
        size = s.data.get("image_size") or exp.run_config(s).data.image_size
        from coreg_ray.data import load_image_table

        key = _data_key(s.data, size)
        if key not in tables:
            train = load_image_table(s.data["images"], size, s.data.get("limit"))
            test = load_image_table(s.data["test_images"], size, s.data.get("test_limit"))
            if test.labels is None:
                raise CoregError(f"{s.data['test_images']}: the test table has no labels")
            if test.num_classes != train.num_classes:
                raise CoregError(f"setting '{s.name}': test table has {test.num_classes} classes, "
                                 f"train {train.num_classes}")
            tables[key] = (train, test)
        setting_data[s.name] = key
        annotator[s.name] = s.describe_annotator()

    def header_lines(records):
        seen, data_lines = set(), []
        for s in exp.settings:
            k = setting_data[s.name]
            if k in seen:
                continue
            seen.add(k)
            tr, te = tables[k]
            where = f" ({s.name})" if len(exp.settings) > 1 and len({*setting_data.values()}) > 1 else ""
            data_lines.append(f"train `{s.data['images']}` {len(tr)} images, test "
                              f"`{s.data['test_images']}` {len(te)} images, {tr.num_classes} "
                              f"classes, {tr.image_size}×{tr.image_size} px{where}")
        t = base_cfg.train
        devices = sorted({r.get("device") for r in records if r.get("device")})
        res = exp.resources
        n_ok = sum(r["status"] == "ok" for r in records)
        n_failed = sum(r["status"] == "failed" for r in records)
        n_na = sum(r["status"] == "n/a" for r in records)
        return [
            f"Test accuracy (%) of the trained classifier (zero-shot: the annotator itself) on "
            f"the labelled test split; mean ± sample std over seeds {', '.join(map(str, exp.seeds))}; "
            f"best per column in **bold**.",
            "",
            "- data: " + "; ".join(data_lines),
            f"- backbone: {base_cfg.model.backbone}; {t.epochs} epoch{'s' if t.epochs != 1 else ''} "
            f"(warm-up {t.warmup_epochs}), "
            f"batch {t.batch_size}, lr {t.lr}"
            + (f"; overrides: {', '.join(exp.overrides)}" if exp.overrides else ""),
            f"- seeds: {', '.join(map(str, exp.seeds))}"
            + (f"; shots per class: {', '.join(map(str, exp.shots))}" if exp.shots != [0] else ""),
            f"- hardware: {', '.join(devices) or 'not known yet'}; one Ray task per run "
            f"({res.get('num_cpus', 1)} CPU, {res.get('num_gpus', 0)} GPU)",
            f"- runs: {n_ok} of {len(runs)} finished, {n_failed} failed"
            + (f", {n_na} not applicable (n/a)" if n_na else ""),
        ]

    def footer_lines():
        lines = ["Annotators:", ""]
        lines += [f"- {s.name}: {annotator[s.name]}" for s in exp.settings]
        lines += ["", "Methods:", ""]
        for m in exp.methods:
            lines.append(f"- `{m}`: {method_description(m)}")
        lines += ["", f"Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by "
                      f"`coreg-ray experiment`; one line per run in results.jsonl."]
        return lines

    def write_table():
        records = [latest[r["key"]] for r in runs if r["key"] in latest]
        table = format_table(records, exp.methods, [s.name for s in exp.settings], exp.shots,
                             exp.columns, exp.labels, stats, len(exp.seeds), exp.name,
                             header_lines(records), footer_lines())
        from coreg_ray.plots import experiment_chart, with_picture  # table.png, embedded

        _write_atomic(out / "table.md", with_picture(
            table.markdown, out / "table.md", experiment_chart, records, alt="results chart",
            methods=exp.methods, settings=[s.name for s in exp.settings], title=exp.name,
            labels={m: (exp.labels or {}).get(m) or method_label(m) for m in exp.methods}))
        _write_atomic(out / "table.csv", table.csv)
        return table, records

    # annotations (driver side: cheap) and their statistics for the table's first rows
    anns = {}
    from coreg_ray.data import annotation_stats

    for s in exp.settings:
        train, test = tables[setting_data[s.name]]
        ann, test_ann = build_annotations(s, train, test)
        anns[s.name] = (ann, test_ann)
        st = annotation_stats(ann, train.labels)
        stats[s.name] = {"partial_accuracy": st.get("partial_accuracy"),
                         "avg_candidates": st.get("avg_candidates")}
        if ann.meta.get("annotator") and not s.annotator and s.kind == "annotations":
            annotator[s.name] = f"{ann.meta['annotator']} (table `{s.spec}`)"

    # ---- everything checked: from here on the experiment writes
    out.mkdir(parents=True, exist_ok=True)
    if not resume and results_path.exists():
        aside = out / time.strftime("results-%Y%m%d-%H%M%S.jsonl")
        os.replace(results_path, aside)
        log(f"--no-resume: earlier results moved to {aside}")
    _write_atomic(out / "experiment.yaml",
                  yaml.safe_dump(exp.to_dict(), sort_keys=False, allow_unicode=True))

    log(f"experiment {exp.name}: {len(runs)} runs ({len(exp.settings)} settings × "
        f"{len(exp.methods)} methods × {len(exp.shots)} shots × {len(exp.seeds)} seeds"
        + (", zero_shot once per shots grid" if "zero_shot" in exp.methods and len(exp.shots) > 1 else "")
        + f"); {done_before} already in {results_path}, {len(todo)} to run")

    use_mlflow = base_cfg.tracking.mlflow if mlflow is None else (mlflow and base_cfg.tracking.mlflow)
    tracker = _Tracker(exp, base_cfg, out, resume, log) if use_mlflow and todo else None
    table, records = write_table()
    n_failed = 0
    in_flight: dict = {}
    if todo:
        try:
            ray = _start_ray(log)
            res = exp.resources
            opts = {"num_cpus": res.get("num_cpus", 1), "num_gpus": res.get("num_gpus", 0),
                    "max_retries": 0}
            if res.get("memory"):
                opts["memory"] = res["memory"]
            remote = ray.remote(execute_run).options(**opts)
            refs = {k: tuple(ray.put(x) for x in v) for k, v in tables.items()}
            ann_refs = {k: tuple(None if x is None else ray.put(x) for x in v) for k, v in anns.items()}
            log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs; each run {opts['num_cpus']} CPU, "
                f"{opts['num_gpus']} GPU" + (f", at most {parallel} at once" if parallel else ""))
            have = ray.cluster_resources()
            for key, want in (("CPU", opts["num_cpus"]), ("GPU", opts["num_gpus"])):
                if want and have.get(key, 0) < want:
                    log(f"warning: each run asks for {want:g} {key}, the cluster has "
                        f"{have.get(key, 0):g} now: runs wait until an autoscaler adds them")
            pending = list(todo)
            cap = parallel or len(todo)
            finished = 0
            width = len(str(len(todo)))
            mw = max(len(m) for m in exp.methods)
            while pending or in_flight:
                while pending and len(in_flight) < cap:
                    run = pending.pop(0)
                    tr, te = refs[setting_data[run["setting"]]]
                    a, ta = ann_refs[run["setting"]]
                    task = {**run, "num_cpus": opts["num_cpus"]}
                    in_flight[remote.remote(task, tr, te, a, ta)] = run
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    run = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the worker died (OOM, killed): record it
                        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        result = {"status": "failed", "test_accuracy": None,
                                  "error": f"{type(exc).__name__}: {msg}"[:1000]}
                    history = result.pop("history", None) or []
                    rec = {"key": run["key"], "experiment": exp.name, "setting": run["setting"],
                           "method": run["method"], "shots": run["shots"], "seed": run["seed"],
                           "fingerprint": run["fingerprint"], **result,
                           "test_history": [{"epoch": h.get("epoch"), "test_accuracy": h["test_accuracy"]}
                                            for h in history if "test_accuracy" in h],
                           "history": epoch_rows(history),
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    if tracker is not None:
                        rec["mlflow_run_id"] = tracker.log_run(run, rec, history,
                                                               annotator[run["setting"]])
                    _append(results_path, rec)
                    latest[run["key"]] = rec
                    finished += 1
                    n_failed += rec["status"] == "failed"
                    if rec["status"] == "ok":
                        what = (f"{100 * rec['test_accuracy']:5.1f}% in "
                                f"{rec.get('seconds') or 0:.1f} s")
                    elif rec["status"] == "n/a":
                        what = f"n/a ({rec['error']})"
                    else:
                        what = f"FAILED ({rec['error']})"
                    shots = f" · {run['shots']}-shot" if exp.shots != [0] else ""
                    log(f"[{finished:>{width}}/{len(todo)}] {run['method']:<{mw}} · "
                        f"{run['setting']} · seed {run['seed']}{shots} · {what}")
                    table, records = write_table()
        except BaseException as exc:
            for ref in in_flight:
                ray.cancel(ref, force=True)  # in_flight is only filled once ray is up
            if tracker is not None:
                tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                               {}, [])
            raise
    table, records = write_table()
    summary = {"runs": len(runs), "runs_finished": sum(r["status"] == "ok" for r in records),
               "runs_failed": sum(r["status"] == "failed" for r in records),
               "ran_now": len(todo), "skipped": done_before, "failed_now": n_failed}
    if tracker is not None:
        tracker.finish("FINISHED", summary, [out / "table.md", out / "table.csv", results_path,
                                             out / "experiment.yaml", out / "table.png"])
        summary["mlflow_parent_run_id"] = tracker.parent
    table.summary = summary
    return table
