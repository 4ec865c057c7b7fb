"""Annotation quality report (JSON + Markdown).

Always: number of images, average candidate-set size ("Avg. num"), set-size distribution,
skipped (unreadable) images. With ground-truth labels: partial accuracy (truth in the set),
ensemble accuracy (argmax of the mean template probabilities), majority-vote accuracy, each
template's zero-shot accuracy, a per-class breakdown and the most common confusions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coreg_ray.data.annotations import AnnotationTable, annotation_stats, ensemble_prediction


def quality(ann: AnnotationTable, labels: np.ndarray | None, classes: list[str],
            template_names: list[str] | None = None, top_confusions: int = 10) -> dict:
    """Statistics of one annotation table; `labels` aligned with `ann.ids` (or None)."""
    st = annotation_stats(ann, labels)
    out = {"images": st["images"], "avg_candidates": st["avg_candidates"],
           "set_size_histogram": {str(k): v for k, v in st["set_size_histogram"].items()}}
    if labels is None or len(ann) == 0:
        return out
    labels = np.asarray(labels, np.int64)
    out["partial_accuracy"] = st["partial_accuracy"]
    out["ensemble_accuracy"] = st["ensemble_accuracy"]
    if "vote_accuracy" in st:
        out["vote_accuracy"] = st["vote_accuracy"]
        names = template_names or [f"template {k}" for k in range(len(st["template_accuracy"]))]
        out["template_accuracy"] = [{"template": n, "accuracy": a}
                                    for n, a in zip(names, st["template_accuracy"])]
    pred = ensemble_prediction(ann)
    sizes = ann.candidates.sum(1)
    hit = ann.candidates[np.arange(len(labels)), labels]
    per_class = []
    for c, name in enumerate(classes):
        m = labels == c
        n = int(m.sum())
        per_class.append({"class": name, "images": n,
                          "partial_accuracy": float(hit[m].mean()) if n else None,
                          "ensemble_accuracy": float((pred[m] == c).mean()) if n else None,
                          "avg_candidates": float(sizes[m].mean()) if n else None})
    out["per_class"] = per_class
    from coreg_ray.plots import candidate_counts  # [true][candidate] image counts: the heatmap

    out["candidate_counts"] = candidate_counts(ann.candidates, labels, len(classes))
    wrong = pred != labels
    conf = []
    if wrong.any():
        pairs, counts = np.unique(np.stack([labels[wrong], pred[wrong]], 1), axis=0,
                                  return_counts=True)
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top_confusions]
        per_true = np.bincount(labels, minlength=len(classes))
        for i in order:
            t, p = int(pairs[i, 0]), int(pairs[i, 1])
            conf.append({"true": classes[t], "predicted": classes[p], "count": int(counts[i]),
                         "share_of_true_class": float(counts[i] / max(1, per_true[t]))})
    out["confusions"] = conf
    return out


def _num(x):
    return "–" if x is None else f"{x:.3f}"


def _pct(x):
    return "–" if x is None else f"{100.0 * x:.2f}%"


def to_markdown(report: dict) -> str:
    L = ["# Annotation report", ""]
    L += [f"- source: `{report.get('source', '')}`",
          f"- annotators: {', '.join('`' + a + '`' for a in report.get('annotators', []))}",
          f"- merge: {report.get('merge', 'n/a')}; candidate mode: {report.get('candidate_mode')}",
          f"- templates: {report.get('num_templates')}; classes: {report.get('num_classes')}",
          f"- output: `{report.get('output', '')}`"]
    t = report.get("timing", {})
    if t:
        L.append(f"- time: {t.get('seconds', 0):.1f} s for {t.get('images_annotated', 0)} newly "
                 f"annotated images ({t.get('images_per_s', 0):.1f} images/s); shards computed "
                 f"{t.get('shards_computed', 0)}, reused {t.get('shards_reused', 0)}")
    q = report["quality"]
    L += ["", "## Summary", "", "| metric | value |", "| --- | --- |",
          f"| images | {q['images']} |", f"| skipped (unreadable) | {report.get('skipped', 0)} |",
          f"| Avg. num (candidates per image) | {_num(q['avg_candidates'])} |"]
    for key, name in (("partial_accuracy", "partial accuracy (truth in set)"),
                      ("ensemble_accuracy", "template-ensemble accuracy"),
                      ("vote_accuracy", "majority-vote accuracy")):
        if key in q:
            L.append(f"| {name} | {_pct(q[key])} |")
    L += ["", "## Candidate-set size", "", "| size | images | share |", "| --- | --- | --- |"]
    n = max(1, q["images"])
    for k, v in q["set_size_histogram"].items():
        L.append(f"| {k} | {v} | {100.0 * v / n:.1f}% |")
    if len(report.get("per_annotator", [])) > 1:
        L += ["", "## Per annotator", "", "| annotator | Avg. num | partial acc. | ensemble acc. |",
              "| --- | --- | --- | --- |"]
        for a in report["per_annotator"]:
            aq = a["quality"]
            L.append(f"| `{a['annotator']}` | {_num(aq['avg_candidates'])} | "
                     f"{_pct(aq.get('partial_accuracy'))} | {_pct(aq.get('ensemble_accuracy'))} |")
    if "template_accuracy" in q:
        L += ["", "## Zero-shot accuracy per template", "", "| # | template | accuracy |",
              "| --- | --- | --- |"]
        for i, row in enumerate(q["template_accuracy"]):
            L.append(f"| {i} | `{row['template']}` | {_pct(row['accuracy'])} |")
    if "per_class" in q:
        L += ["", "## Per class", "", "| class | images | partial acc. | ensemble acc. | Avg. num |",
              "| --- | --- | --- | --- | --- |"]
        for row in q["per_class"]:
            avg = "–" if row["avg_candidates"] is None else f"{row['avg_candidates']:.2f}"
            L.append(f"| {row['class']} | {row['images']} | {_pct(row['partial_accuracy'])} | "
                     f"{_pct(row['ensemble_accuracy'])} | {avg} |")
    if q.get("confusions"):
        L += ["", "## Most common confusions (template ensemble)", "",
              "| true | predicted | images | share of true class |", "| --- | --- | --- | --- |"]
        for row in q["confusions"]:
            L.append(f"| {row['true']} | {row['predicted']} | {row['count']} | "
                     f"{_pct(row['share_of_true_class'])} |")
    sk = report.get("skipped_images", [])
    if sk:
        L += ["", "## Skipped images", "", "| id | error |", "| --- | --- |"]
        for row in sk[:50]:
            L.append(f"| {str(row['id']).replace('|', '/')} | {str(row['error']).replace('|', '/')} |")
        if len(sk) > 50:
            L.append(f"| ... | {len(sk) - 50} more in the JSON report |")
    return "\n".join(L) + "\n"


def report_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """'x.json' or 'x.md' or 'x' -> (x.json, x.md)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".md") else p
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def write_report(report: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    from coreg_ray.outputs import to_json, write_text_atomic

    jp, mp = report_paths(path)
    from coreg_ray.plots import report_chart, with_picture  # X.png beside X.md, embedded in it

    md = with_picture(to_markdown(report), mp, report_chart, report, alt="annotation report",
                      before="## Candidate-set size")
    for p, text in ((jp, to_json(report, indent=2)), (mp, md)):
        write_text_atomic(p, text)
    return jp, mp
