"""The result table (pure, no I/O): run records -> the paper's layout (`format_table`, `Table`
as Markdown/CSV) and the methods' row labels and descriptions."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from coreg_ray.errors import CoregError
from coreg_ray.experiment.schema import SHOT_FREE

REFERENCE_ROWS = ("true_labels",)  # rows that measure what the labels allow, not a method
from coreg_ray.method_registry import MethodView


def _load_methods() -> None:
    from coreg_ray.methods import load_methods
    load_methods()


# name -> short row label: a view of the one method registry (`coreg_ray.method_registry`),
# where every method is registered with its label
SHORT_LABELS = MethodView(lambda info: info.label, load=_load_methods)


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
    The best mean per column (as displayed) is bold, ties included; the true-labels ceiling
    (`REFERENCE_ROWS`) is shown but never bold.
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
                if rk[1] not in REFERENCE_ROWS:  # the ceiling is a yardstick, not a contender
                    best_val[ck[0]] = max(best_val.get(ck[0], -math.inf), shown)
            else:
                text = "n/a" if not_applicable else ("failed" if failed else "–")
            cell["text"] = text
            cells[(rk[0], ck[0])] = cell
            texts.append(text)
        row_labels.append(rk[0])
        grid.append(texts)
    best = {(rk[0], ck[0]) for rk in row_keys for ck in col_keys
            if rk[1] not in REFERENCE_ROWS and cells[(rk[0], ck[0])]["mean"] is not None
            and round(cells[(rk[0], ck[0])]["mean"], digits) == best_val.get(ck[0])}
    return Table(title, col_labels, row_labels, grid, cells, best, stat_rows, list(header),
                 list(footer))


def method_label(name: str) -> str:
    """Short row label: the label the method is registered with (`register_method`); a name
    unknown here (e.g. a method of a newer version) is its own label."""
    return SHORT_LABELS.get(name, name)


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
