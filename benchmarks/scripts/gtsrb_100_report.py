"""The GTSRB table at the paper's schedule (benchmarks/scripts/gtsrb_cpu_100.sh) from its raw
rows, beside the 20-epoch table's seed-0 rows: Markdown on stdout, and the per-epoch test
accuracy of every row of each setting in one PNG (curves.png beside the raw rows). A cell not
run yet reads "not run".

    python benchmarks/scripts/gtsrb_100_report.py [benchmarks/results]
"""
import json
import sys
from pathlib import Path

from coreg_ray.plots import experiment_curves

root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
SETTINGS = ["CLIP ViT-B/32 (simulated)", "LLaVA-1.5 (simulated)"]
ROWS = [("true_labels", 0, "true labels (ceiling)"), ("zero_shot", 0, "zero-shot (annotator)"),
        ("warmup_only", 0, "warm-up loss only"), ("proden", 0, "PRODEN"),
        ("alim_scale", 0, "ALIM-Scale"), ("coreg", 0, "Co-Reg"),
        ("coreg", 4, "Co-Reg, 4 true labels per class"), ("dividemix", 0, "DivideMix"),
        ("pico", 0, "PiCO")]


def latest(path):
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        out[r["key"]] = r  # the last record of a run wins
    return {k: r for k, r in out.items() if r.get("status") == "ok"}


long_rows = latest(root / "gtsrb-cpu-100" / "results.jsonl")
short = {**latest(root / "gtsrb-cpu" / "exp-gtsrb-cpu" / "results.jsonl"),
         **latest(root / "gtsrb-cpu" / "exp-gtsrb-cpu-fewshot" / "results.jsonl")}


def get(rows, method, shots, setting, seed=0):
    return rows.get(f"{setting}|{method}|{shots}|{seed}")


def pct(r):
    return f"{100 * r['test_accuracy']:.1f}" if r else "not run"


def warm_end(r):
    """Test accuracy at the last warm-up epoch (epoch 49 of 100) and the first after it."""
    h = {x["epoch"]: x["test_accuracy"] for x in (r or {}).get("test_history") or []}
    if 49 not in h or 50 not in h:
        return ""
    return f"{100 * h[49]:.1f} → {100 * h[50]:.1f}"


print("| method | " + " | ".join(f"{s}: 100 ep. (20 ep.)" for s in SETTINGS) + " |")
print("| --- | " + " | ".join("---:" for _ in SETTINGS) + " |")
for method, shots, name in ROWS:
    cells = []
    for s in SETTINGS:
        a, b = get(long_rows, method, shots, s), get(short, method, shots, s)
        cells.append(f"{pct(a)} ({pct(b) if method != 'true_labels' else 'not run'})")
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
print("Co-Reg at the end of the warm-up (epoch 49) → its first Co-Reg epoch (50):",
      "; ".join(f"{s}: {warm_end(get(long_rows, 'coreg', 0, s)) or 'not run'}" for s in SETTINGS))
for s in SETTINGS:
    r = get(long_rows, "coreg", 0, s)
    if r:
        h = [round(100 * x["test_accuracy"], 1) for x in r.get("test_history") or []]
        print(f"\nCo-Reg, {s}, every 10th epoch: {h[9::10]}; best {max(h)} at epoch {h.index(max(h))}")
if long_rows:
    png = experiment_curves(list(long_rows.values()), root / "gtsrb-cpu-100" / "curves.png",
                            methods=[m for m, _, _ in ROWS], settings=SETTINGS,
                            labels={m: n for m, k, n in ROWS if not k},
                            title="GTSRB 4k/2k, small_cnn, 100 epochs (50 warm-up), seed 0, "
                                  "simulated annotators")
    print(f"\ncurves: {png}")
