"""Summarise the GTSRB CPU experiment (benchmarks/scripts/gtsrb_cpu.sh) from its raw rows:
the main table with the few-shot rows added, the x3-length runs, and Co-Reg's per-epoch curves
(test accuracy, P fraction, P/U pseudo-label accuracy). Markdown on stdout.

    python benchmarks/scripts/gtsrb_report.py [benchmarks/results/gtsrb-cpu]
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gtsrb-cpu")


def rows(name):
    path = root / name / "results.jsonl"
    latest = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        latest[r["key"]] = r  # the last record of a run wins
    return [r for r in latest.values() if r.get("status") == "ok"]


def cell(values):
    if not values:
        return "—"
    m = 100 * statistics.mean(values)
    s = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{m:.1f}{s} (n={len(values)})"


main, few, length = rows("exp-gtsrb-cpu"), rows("exp-gtsrb-cpu-fewshot"), rows("exp-gtsrb-cpu-length")
settings = sorted({r["setting"] for r in main + few}, key=lambda s: ("LLaVA" in s, s))
acc = defaultdict(list)
for r in main + few:
    label = r["method"] + (f" {r['shots']}-shot" if r["shots"] else "")
    acc[(label, r["setting"])].append(r["test_accuracy"])
order = ["zero_shot", "warmup_only", "proden", "dividemix", "pico", "alim_scale", "coreg",
         "coreg 1-shot", "coreg 4-shot"]
print("| method | " + " | ".join(settings) + " |")
print("| --- |" + " ---: |" * len(settings))
for m in order:
    print(f"| {m} | " + " | ".join(cell(acc[(m, s)]) for s in settings) + " |")
print()
print("Per seed (test accuracy, %):")
print()
for s in settings:
    for m in order:
        per = sorted((r["seed"], r["test_accuracy"]) for r in main + few
                     if r["setting"] == s and (r["method"] + (f" {r['shots']}-shot" if r["shots"] else "")) == m)
        if per:
            print(f"- {s} · {m}: " + ", ".join(f"seed {k} {100 * v:.1f}" for k, v in per))
print()
if length:
    print("x3 length (60 epochs, warm-up 30), seed 0, test accuracy %:")
    print()
    for r in sorted(length, key=lambda r: (r["setting"], -r["test_accuracy"])):
        curve = [h["test_accuracy"] for h in r.get("test_history", [])]
        marks = ", ".join(f"ep {i + 1}: {100 * a:.1f}" for i, a in enumerate(curve) if (i + 1) % 10 == 0)
        print(f"- {r['setting']} · {r['method']}: final {100 * r['test_accuracy']:.1f}"
              + (f" ({marks})" if marks else ""))
    print()
print("Co-Reg per epoch (after the warm-up): test acc / P fraction / P pseudo-label acc / U pseudo-label acc, %:")
print()
for r in sorted(main + few + length, key=lambda r: (r["setting"], r["method"], r["shots"], r["seed"])):
    hist = [h for h in r.get("history") or [] if h.get("phase") == "coreg"]
    if not r["method"].startswith("coreg") or not hist:
        continue
    shots = f" {r['shots']}-shot" if r["shots"] else ""
    tag = f"{r['setting']} · {r['method']}{shots} · seed {r['seed']} · {r['epochs']} epochs"
    print(f"- {tag}:")
    print("  " + "; ".join(
        f"ep {h['epoch'] + 1}: {100 * h.get('test_accuracy', float('nan')):.1f} / "
        f"{100 * h.get('p_fraction', float('nan')):.0f} / {100 * h.get('pseudo_accuracy_p', float('nan')):.0f} / "
        f"{100 * h.get('pseudo_accuracy_u', float('nan')):.0f}" for h in hist))
