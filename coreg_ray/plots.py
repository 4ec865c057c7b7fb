"""Pictures next to the Markdown reports (matplotlib, headless: Agg, no pyplot state).

Pure functions taking plain data and a PNG path; each writes the file atomically and returns it:

- `annotation_chart`: an annotation report, as `coreg-ray annotate --report` writes it: the
  candidate-set size histogram, per-class partial accuracy and average set size (bars), and the
  candidate-vs-truth heatmap (rows: true class; cell: share of that class's images whose
  candidate set contains the column's class; the diagonal is the per-class partial accuracy)
  when labels exist. `report_chart(report, path)` takes the report dict.
- `training_curves`: a run's per-epoch history (`metrics.json` "history"): test accuracy and
  pseudo-label accuracy on P and U, the P fraction, the loss terms; warm-up epochs shaded.
- `experiment_chart`: `coreg-ray experiment`'s table as grouped bars (settings x methods,
  mean ± sample std over seeds) from its `results.jsonl` records.
- `experiment_curves`: the same records' per-epoch test accuracy, one panel per setting, one
  line per row (method, shots, seed); rows without epochs (zero-shot) as a dashed level.

Missing optional data (no labels, no test set, a loss term not recorded) leaves that part out.
matplotlib is the `plots` extra (`pip install 'coreg-ray[plots]'`): the functions raise one line
naming it when it is missing; the hooks in the commands (`write_beside`) skip the picture with a
note instead, so a report or a run never fails for want of a picture.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from coreg_ray.errors import CoregError, note, require

ACC_KEYS = (("test_accuracy", "test accuracy"), ("pseudo_accuracy_p", "pseudo-label acc. on P"),
            ("pseudo_accuracy_u", "pseudo-label acc. on U"))
LOSS_KEYS = ("loss", "loss_x", "loss_u", "loss_prot", "loss_cont", "loss_cand")
SHOT_FREE = ("zero_shot", "true_labels")  # methods that do not depend on the number of shots


def _figure(width: float, height: float):
    require("matplotlib", "plots")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path) -> Path:
    from coreg_ray.outputs import atomic_path

    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png")
    return p


def _num(v) -> float:
    """A finite float, or NaN for None / missing / non-numbers."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _tick_size(n: int) -> float:
    return 9 if n <= 12 else 8 if n <= 25 else 7 if n <= 50 else 5


def short_names(names: list[str], width: int = 28) -> list[str]:
    """Axis labels: a prefix every name shares (e.g. "German Traffic Sign: ") dropped, each
    name cut to `width` characters."""
    names = [str(x) for x in names]
    if len(names) > 1:
        pre = os.path.commonprefix(names)
        cut = max(pre.rfind(": "), pre.rfind(" "), pre.rfind("_"), pre.rfind("/"))
        if cut >= 3 and all(len(x) > cut + 1 for x in names):
            names = [x[cut + 1:].strip() for x in names]
    return [x if len(x) <= width else x[: width - 1] + "\u2026" for x in names]


def _class_axis(ax, names: list[str], labels: bool = True) -> None:
    n = len(names)
    names = short_names(names)
    ax.set_xticks(range(n))
    if not labels:
        ax.set_xticklabels([])
        ax.set_xlim(-0.6, n - 0.4)
        return
    longest = max((len(s) for s in names), default=0)
    per_class_px = ax.get_figure().get_figwidth() * 100 * 0.85 / max(n, 1)
    if n <= 12 and longest * 7 < per_class_px * 0.9:
        ax.set_xticklabels(names, fontsize=_tick_size(n))
    elif n <= 12:
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor",
                           fontsize=_tick_size(n))
    else:
        ax.set_xticklabels(names, rotation=90, fontsize=_tick_size(n))
    ax.set_xlim(-0.6, n - 0.4)


# ============================================================================ annotation report
def annotation_chart(path, per_class: list[dict] | None = None,
                     candidate_counts: list[list[int]] | None = None,
                     classes: list[str] | None = None, class_images: list[int] | None = None,
                     set_size_histogram: dict | None = None, title: str = "") -> Path:
    """The annotation report's picture; each part is drawn when its data are given.

    per_class: rows with `class`, `images`, `partial_accuracy` (0-1) and `avg_candidates`
    (None for a class without images); candidate_counts: C x C, [t][c] = images of true class t
    whose candidate set holds class c; classes: names of its rows/columns (default: per_class's,
    else numbers); class_images: images per true class (default: per_class's `images`; without
    them the heatmap shows counts); set_size_histogram: {size: images}."""
    import numpy as np

    per_class = [r for r in (per_class or []) if isinstance(r, dict)]
    hist = {int(k): int(v) for k, v in (set_size_histogram or {}).items()}
    names = [str(r.get("class", i)) for i, r in enumerate(per_class)]
    mat = None
    if candidate_counts is not None and len(candidate_counts):
        mat = np.asarray(candidate_counts, dtype=float)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise CoregError(f"candidate counts: expected a square matrix, got shape "
                             f"{list(mat.shape)}")
        classes = [str(c) for c in (classes or names)]
        if len(classes) != mat.shape[0]:
            classes = [str(i) for i in range(mat.shape[0])]
        if class_images is None and len(per_class) == mat.shape[0]:
            class_images = [r.get("images") for r in per_class]
    n = max(len(names), len(classes or []), 1)
    width = min(26.0, max(8.0, 0.3 * n + 3.5))
    parts = (["hist"] if hist else []) + (["acc", "size"] if per_class else []) + \
        (["heat"] if mat is not None else [])
    parts = parts or ["empty"]
    bar_h = 2.6 + (1.6 if n > 10 else 0)
    heights = {"hist": 2.4, "acc": 2.6 if n > 12 else bar_h, "size": bar_h, "empty": 1.5,
               "heat": min(width - 2.0, max(4.5, 0.26 * n + 3.0))}
    fig = _figure(width, sum(heights[p] for p in parts) + (0.4 if title else 0))
    axes = fig.subplots(len(parts), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [heights[p] for p in parts]})[:, 0]
    if title:
        fig.suptitle(title, fontsize=12)
    for ax, part in zip(axes, parts):
        if part == "hist":
            sizes = sorted(hist)
            total = max(1, sum(hist.values()))
            ax.bar([str(s) for s in sizes], [100.0 * hist[s] / total for s in sizes],
                   color="#4c72b0")
            ax.set_title("Candidate-set size", fontsize=10, loc="left")
            ax.set_xlabel("classes in the candidate set")
            ax.set_ylabel("% of images")
            if len(sizes) > 25:
                ax.tick_params(axis="x", labelsize=_tick_size(len(sizes)), rotation=90)
        elif part == "acc":
            vals = [100.0 * _num(r.get("partial_accuracy")) for r in per_class]
            ax.bar(range(len(vals)), vals, color="#55a868")
            seen = [v for v in vals if not math.isnan(v)]
            if seen:
                m = sum(seen) / len(seen)
                ax.axhline(m, color="0.25", lw=1, ls="--", label=f"mean over classes {m:.1f}%")
                ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
            ax.set_ylim(0, 105)
            ax.set_ylabel("% of the class's images")
            ax.set_title("Partial accuracy per class (true class in the candidate set)",
                         fontsize=10, loc="left")
            _class_axis(ax, names, labels=n <= 12)  # long lists: named once, under the next
        elif part == "size":
            vals = [_num(r.get("avg_candidates")) for r in per_class]
            ax.bar(range(len(vals)), vals, color="#dd8452")
            ax.set_ylabel("classes per image")
            ax.set_title("Average candidate-set size per true class", fontsize=10, loc="left")
            _class_axis(ax, names)
        elif part == "heat":
            _heatmap(fig, ax, mat, classes, class_images)
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, "no annotation statistics to draw", ha="center", va="center")
    return _save(fig, path)


def _heatmap(fig, ax, counts, classes: list[str], class_images) -> None:
    import numpy as np

    rows = counts.shape[0]
    totals = None
    if class_images is not None and len(class_images) == rows:
        totals = np.array([_num(v) for v in class_images], dtype=float).reshape(-1, 1)
        totals = np.where(np.isnan(totals), 0.0, totals)
    if totals is not None:
        value = np.divide(100.0 * counts, totals, out=np.full_like(counts, np.nan),
                          where=totals > 0)
        im = ax.imshow(value, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        what, fmt = "% of the true class's images", "{:.0f}"
    else:
        value = counts
        im = ax.imshow(value, cmap="viridis", vmin=0, interpolation="nearest")
        what, fmt = "images", "{:.0f}"
    ax.set_title("Candidate vs truth: " + ("% of each true class's images" if totals is not None
                                           else "images of each true class")
                 + "\nwhose candidate set holds the class", fontsize=10, loc="left")
    fs = _tick_size(rows)
    classes = short_names(classes)
    ax.set_xticks(range(rows))
    ax.set_yticks(range(rows))
    ax.set_xticklabels(classes, rotation=90, fontsize=fs)
    ax.set_yticklabels(classes, fontsize=fs)
    ax.set_xlabel("class in the candidate set")
    ax.set_ylabel("true class")
    if rows <= 12:
        top = np.nanmax(value) if np.isfinite(value).any() else 1.0
        for t in range(rows):
            for c in range(rows):
                v = value[t, c]
                if np.isfinite(v):
                    ax.text(c, t, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * top else "white")
    fig.colorbar(im, ax=ax, shrink=0.8, label=what)


def report_chart(report: dict, path) -> Path:
    """`annotation_chart` from an annotation report dict (`coreg_ray.annotate.report`)."""
    q = report.get("quality") or {}
    src = report.get("source")
    if isinstance(src, (list, tuple)):
        src = ", ".join(map(str, src[:2])) + (" ..." if len(src) > 2 else "")
    annot = report.get("annotators") or []
    title = "Annotation report" + (f": {', '.join(map(str, annot[:3]))}" if annot else "") + \
        (f" on {src}" if src else "")
    return annotation_chart(path, q.get("per_class"), q.get("candidate_counts"),
                            report.get("classes"), None, q.get("set_size_histogram"),
                            title=_short(title, 140))


def candidate_counts(candidates, labels, num_classes: int) -> list[list[int]]:
    """C x C counts: [t][c] = images of true class t whose candidate set holds class c."""
    import numpy as np

    cand = np.asarray(candidates, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t in range(num_classes):
        m = labels == t
        if m.any():
            out[t] = cand[m].sum(0)
    return out.tolist()


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ============================================================================ training curves
def _finish_panel(ax, title: str, ylabel: str, filled: bool, empty: str,
                  legend_size: int = 8) -> None:
    """A panel's title, y label, grid, and its legend (or `empty` in its middle)."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if filled:
        ax.legend(fontsize=legend_size, loc="best", framealpha=0.9)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="0.4")


def training_curves(history: list[dict], path, title: str = "") -> Path:
    """A run's per-epoch curves: accuracies (test; pseudo-labels on P and U), P fraction, loss
    terms. Keys absent from every epoch are left out; warm-up epochs are shaded."""
    rows = [h for h in (history or []) if isinstance(h, dict)]
    xs = [_num(h.get("epoch", i)) for i, h in enumerate(rows)]
    xs = [i if math.isnan(x) else x for i, x in enumerate(xs)]

    def series(key, scale=1.0):
        pts = [(x, scale * _num(h.get(key))) for x, h in zip(xs, rows)]
        pts = [(x, y) for x, y in pts if not math.isnan(y)]
        return pts

    acc = [(label, series(k, 100.0)) for k, label in ACC_KEYS]
    acc = [(label, s) for label, s in acc if s]
    pfrac = series("p_fraction", 100.0)
    per_net = [(f"net {k}", series(f"p_fraction_net{k}", 100.0)) for k in (1, 2)]
    losses = [(k, series(k)) for k in LOSS_KEYS]
    losses = [(k, s) for k, s in losses if s and any(abs(y) > 0 for _, y in s)]
    warm = [x for x, h in zip(xs, rows) if h.get("phase") == "warmup"]

    fig = _figure(8.5, 9.0 + (0.4 if title else 0))
    axes = fig.subplots(3, 1, sharex=True)
    if title:
        fig.suptitle(title, fontsize=12)
    panels = ((axes[0], acc, "accuracy (%)", "Accuracy"),
              (axes[1], ([("P fraction (mean of nets)", pfrac)] if pfrac else []) +
               [(lab, s) for lab, s in per_net if s and not pfrac], "% of training images",
               "P fraction (images whose pseudo-label is trusted)"),
              (axes[2], losses, "loss", "Loss terms (epoch means)"))
    for k, (ax, lines, ylabel, name) in enumerate(panels):
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.92", zorder=0,
                       label="warm-up" if k == 0 else None)
        for label, pts in lines:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o" if len(pts) <= 30 else None, ms=3, lw=1.5, label=label)
        _finish_panel(ax, name, ylabel, bool(lines), "not recorded")
    for ax in axes[:2]:
        if ax.get_lines():
            lo = min(0.0, *(min(l.get_ydata()) for l in ax.get_lines()))
            ax.set_ylim(lo, 102)
    axes[2].set_xlabel("epoch")
    if xs:
        from matplotlib.ticker import MaxNLocator

        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


# ============================================================================ experiment table
def experiment_chart(records: list[dict], path, methods: list[str] | None = None,
                     settings: list[str] | None = None, labels: dict | None = None,
                     title: str = "") -> Path:
    """Grouped bars: one group per setting (per setting and shot count when shots vary), one bar
    per method: mean test accuracy (%) over the finished seeds, ± sample std when there are two
    or more. Failed and not-applicable runs are left out (a cell with none reads `failed` or
    `n/a`). `labels` maps a method to its legend name."""
    recs = [r for r in (records or []) if isinstance(r, dict) and r.get("method") is not None]
    if any("key" in r for r in recs):  # results.jsonl: the last record of a run wins
        last = {}
        for i, r in enumerate(recs):
            last[r.get("key", i)] = r
        recs = list(last.values())

    def order(key, given):
        if given is not None:
            return list(given)
        seen = []
        for r in recs:
            if r.get(key) not in seen:
                seen.append(r.get(key))
        return seen

    methods, settings = order("method", methods), order("setting", settings)
    shots = sorted({int(r.get("shots") or 0) for r in recs}) or [0]
    groups = [(s, k) for s in settings for k in shots] if len(shots) > 1 else \
        [(s, None) for s in settings]
    labels = labels or {}
    cells = {}
    for m in methods:
        for g in groups:
            s, k = g
            rs = [r for r in recs if r.get("method") == m and r.get("setting") == s
                  and (k is None or m in SHOT_FREE or int(r.get("shots") or 0) == k)]
            vals = [100.0 * _num(r.get("test_accuracy")) for r in rs
                    if r.get("status", "ok") == "ok"]
            vals = [v for v in vals if not math.isnan(v)]
            status = None if vals else ("n/a" if rs and all(r.get("status") == "n/a" for r in rs)
                                        else "failed" if any(r.get("status") == "failed"
                                                             for r in rs) else None)
            if vals:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
                    if len(vals) > 1 else None
                cells[(m, g)] = (mean, std, len(vals), None)
            elif status:
                cells[(m, g)] = (None, None, 0, status)
    nm, ng = max(1, len(methods)), max(1, len(groups))
    width = min(26.0, max(7.5, ng * (0.35 * nm + 0.8) + 2.5))
    fig = _figure(width, 5.2 + (0.4 if title else 0))
    ax = fig.subplots()
    if title:
        fig.suptitle(_short(title, 120), fontsize=12)
    bar = 0.8 / nm
    show_values = nm * ng <= 40
    import matplotlib

    if nm > 10:  # tab20 in the order dark colours first, then their light twins
        tab = matplotlib.colormaps["tab20"]
        colors = [tab(2 * i if i < 10 else 2 * (i - 10) + 1) for i in range(20)]
    else:
        tab = matplotlib.colormaps["tab10"]
        colors = [tab(i) for i in range(10)]
    for i, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, g in enumerate(groups):
            x = j - 0.4 + bar * (i + 0.5)
            mean, std, nseed, status = cells.get((m, g), (None, None, 0, None))
            if mean is not None:
                xs.append(x), ys.append(mean), errs.append(std or 0.0)
                if show_values:
                    ax.text(x, mean + (std or 0) + 1.0, f"{mean:.1f}", ha="center",
                            va="bottom", fontsize=7, rotation=90 if nm > 3 else 0)
            elif status:
                ax.text(x, 1.0, status, ha="center", va="bottom", fontsize=7, rotation=90,
                        color="0.35")
        ax.bar(xs, ys, bar * 0.95, yerr=errs if any(errs) else None, capsize=2,
               color=colors[i % len(colors)], label=labels.get(m) or str(m),
               error_kw={"elinewidth": 1, "ecolor": "0.2"})
    ax.set_xticks(range(len(groups)))
    glabels = [str(s) if k is None else f"{s}\n{k}-shot" for s, k in groups]
    rotate = ng > 6 or max((len(g) for g in glabels), default=0) > 18
    ax.set_xticklabels(glabels, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=_tick_size(ng) + 1)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    tops = [c[0] + (c[1] or 0) for c in cells.values() if c[0] is not None]
    ax.set_ylim(0, min(110.0, max(tops, default=90.0) * 1.12 + 6))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if methods:  # explicit handles: a method without a bar (failed, n/a) keeps its colour
        from matplotlib.patches import Patch

        handles = [Patch(color=colors[i % len(colors)], label=labels.get(m) or str(m))
                   for i, m in enumerate(methods)]
        ax.legend(handles=handles, fontsize=8, ncol=1 if nm <= 12 else 2, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=8)
    seeds = sorted({r.get("seed") for r in recs if r.get("seed") is not None}, key=str)
    ax.set_title(f"mean ± sample std over seeds ({', '.join(map(str, seeds)) or 'none'})",
                 fontsize=9, loc="left")
    if not recs:
        ax.text(0.5, 0.5, "no runs finished yet", transform=ax.transAxes, ha="center",
                va="center", color="0.4")
    return _save(fig, path)


def experiment_curves(records: list[dict], path, methods: list[str] | None = None,
                      settings: list[str] | None = None, labels: dict | None = None,
                      title: str = "") -> Path:
    """Per-epoch test accuracy (%) of every finished row of each setting, one panel per setting
    (from the records' `test_history`): a line per (method, shots, seed), the true-labels
    ceiling in black, a row with no epochs (zero-shot) as a dashed level at its accuracy."""
    last = {}
    for i, r in enumerate(r for r in (records or []) if isinstance(r, dict)):
        last[r.get("key", i)] = r
    recs = [r for r in last.values() if r.get("status", "ok") == "ok"
            and not math.isnan(_num(r.get("test_accuracy")))]
    settings = list(settings) if settings is not None else \
        list(dict.fromkeys(r.get("setting") for r in recs))
    rank = {m: i for i, m in enumerate(methods or [])}
    recs.sort(key=lambda r: (rank.get(r.get("method"), len(rank)), int(r.get("shots") or 0),
                             int(r.get("seed") or 0)))
    seeds = {r.get("seed") for r in recs}
    labels = labels or {}
    fig = _figure(8.5, 0.4 + 4.2 * max(1, len(settings)) + (0.4 if title else 0))
    axes = fig.subplots(max(1, len(settings)), 1, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title, fontsize=11)
    for ax, setting in zip(axes, settings or [None]):
        rows = [r for r in recs if r.get("setting") == setting]
        end = max([len(r.get("test_history") or []) for r in rows] + [1])
        for r in rows:
            m = r.get("method")
            name = labels.get(m) or m
            if int(r.get("shots") or 0) and m not in SHOT_FREE:
                name += f", {int(r['shots'])}-shot"
            if len(seeds) > 1:
                name += f", seed {r.get('seed')}"
            pts = [(_num(h.get("epoch")), 100 * _num(h.get("test_accuracy")))
                   for h in r.get("test_history") or []]
            pts = [(x, y) for x, y in pts if not (math.isnan(x) or math.isnan(y))]
            style = {"color": "black", "lw": 2.0} if m == "true_labels" else {"lw": 1.4}
            if pts:
                ax.plot(*zip(*pts), label=f"{name}: {100 * _num(r['test_accuracy']):.1f}",
                        **style)
            else:
                ax.axhline(100 * _num(r["test_accuracy"]), ls="--", color="0.45", lw=1.2,
                           label=f"{name}: {100 * _num(r['test_accuracy']):.1f}")
        ax.set_xlim(0, end)
        _finish_panel(ax, str(setting), "test accuracy (%)", bool(rows), "no finished rows", 7)
    axes[-1].set_xlabel("epoch")
    return _save(fig, path)


# ============================================================================ hooks
def embed(markdown: str, image: str, alt: str, before: str | None = None) -> str:
    """`markdown` with `![alt](image)` inserted before the line `before` (a heading), else after
    the last table row, else at the end."""
    lines = markdown.rstrip("\n").split("\n")
    tag = [f"![{alt}]({image})", ""]
    if before is not None and before in lines:
        i = lines.index(before)
        lines[i:i] = tag
    else:
        rows = [i for i, line in enumerate(lines) if line.startswith("|")]
        if rows:
            i = rows[-1] + 1
            lines[i:i] = ["", *tag[:-1]]
        else:
            lines += ["", *tag[:-1]]
    return "\n".join(lines) + "\n"


_warned: set = set()


def write_beside(fn, *args, **kwargs) -> Path | None:
    """`fn(*args, **kwargs)` for a command's automatic picture: returns the PNG's path, or None
    with one note on stderr (once per reason) if matplotlib is missing or drawing failed, so the
    report or run it illustrates never fails because of its picture."""
    try:
        return fn(*args, **kwargs)
    except CoregError as exc:  # matplotlib missing, bad data
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed run
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    if reason not in _warned:
        _warned.add(reason)
        note(f"picture skipped ({reason})")
    return None


def with_picture(markdown: str, md_path, chart, *args, alt: str = "chart",
                 before: str | None = None, **kwargs) -> str:
    """Draw `chart(*args, png, **kwargs)` with png = `md_path` with suffix .png, and return
    `markdown` embedding it (unchanged if the picture could not be made). Used by the report
    writers (annotation report, experiment table)."""
    png = Path(md_path).with_suffix(".png")
    made = write_beside(chart, *args, png, **kwargs)
    if made is None:
        return markdown
    rel = os.path.relpath(made, Path(md_path).parent)
    return embed(markdown, rel, alt, before)
