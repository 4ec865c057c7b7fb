#!/usr/bin/env bash
# Sharded training's accuracy (issue 22): 2 Ray Train workers, each owning half the pool, against
# one process, on the GTSRB table of configs/exp-gtsrb-cpu.yaml (4,000 train / 2,000 test images,
# CLIP-like SIMULATED annotator, small_cnn, 20 epochs with 10 warm-up), seeds 0 1 2, through the
# commands a user runs:
#   coreg-ray simulate-annotator  (once: the preset's candidate sets for the 4,000 rows)
#   coreg-ray train ...            (one process; equal bit for bit to 1 Ray worker, tests/test_sharded.py)
#   coreg-ray train ... --workers 2                 (BatchNorm over both workers' rows: the default)
#   coreg-ray train ... --workers 2 --set train.sync_batchnorm=false   (PER_RANK=1: plain DDP)
# Rows of earlier code are kept (folders w2pr-*, w2sb-*, w2fi-*; see VARIANTS below).
# Resumable: a run whose output holds metrics.json is skipped. Rows, one JSON line per
# run, go to benchmarks/results/gtsrb_workers.jsonl (rewritten from the runs each time).
#   DATA=../shared/data/gtsrb32 nohup bash benchmarks/scripts/gtsrb_workers.sh > runs/gtsrb_workers.log 2>&1 &
# DATA: a folder with train.parquet and test.parquet (the GTSRB image tables).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/coreg-ray}
DATA=${DATA:-../shared/data/gtsrb32}
OUT=${OUT:-runs/gtsrb-workers}
SEEDS=${SEEDS:-"0 1 2"}
RES=benchmarks/results/gtsrb_workers.jsonl
mkdir -p "$OUT"
SETS=(--set model.backbone=small_cnn --set data.hflip=false --set train.epochs=20
      --set train.warmup_epochs=10 --set train.batch_size=64 --set train.warmup_batch_size=128
      --set train.lr=0.05 --set train.eval_every=1 --set coreg.feature_delay=2
      --set coreg.rampup_epochs=3 --set coreg.queue_size=4096)

# the experiment's test split: the first 2,000 rows of the test table (classes.json beside it)
[ -f "$OUT/test/test.parquet" ] || "$PY" - "$DATA" "$OUT/test" <<'PY'
import shutil, sys
from pathlib import Path
import pyarrow.parquet as pq
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
pq.write_table(pq.read_table(src / "test.parquet").slice(0, 2000), dst / "test.parquet")
shutil.copy(src / "classes.json", dst / "classes.json")
PY
[ -f "$OUT/clip-like.parquet" ] || "$CLI" simulate-annotator --images "$DATA/train.parquet" \
    --limit 4000 --like clip-vitb32 --dataset gtsrb --seed 0 --output "$OUT/clip-like.parquet"
[ -n "${PREP_ONLY:-}" ] && exit 0

run() {  # $1 workers (0: one process), $2 seed, $3 "nb": per-rank BatchNorm
  local dir="$OUT/w$1${3:-}-s$2" extra=()
  [ -f "$dir/metrics.json" ] && return
  [ "$1" -gt 0 ] && extra=(--workers "$1")
  [ "${3:-}" = nb ] && extra+=(--set train.sync_batchnorm=false)
  echo "== workers $1 seed $2: $(date -u +%H:%M)"
  "$CLI" train --images "$DATA/train.parquet" --limit 4000 --annotations "$OUT/clip-like.parquet" \
      --test-images "$OUT/test/test.parquet" "${SETS[@]}" --set train.seed="$2" \
      --output "$dir" --overwrite --no-mlflow "${extra[@]}" > "$dir.log" 2>&1 \
      || { echo "failed: see $dir.log"; tail -3 "$dir.log"; }
}
collect() {
  "$PY" - "$OUT" "$RES" <<'PY'
import json, sys
from pathlib import Path
out, res = Path(sys.argv[1]), Path(sys.argv[2])
# folders w2<tag>-s<seed>: runs of earlier code are kept under a tag saying what they ran
VARIANTS = {
    "": "BatchNorm over every worker's rows; every rank's P pass as long as the largest rank's; "
        "distribution alignment in one process's chunk order",
    "nb": "BatchNorm per worker (train.sync_batchnorm=false); otherwise as the default",
    "fi": "BatchNorm over every worker's rows; P pass as long as the largest rank's; alignment "
          "chunks interleaved rank by rank (commit 6eb60e9, before 88e9657)",
    "sb": "BatchNorm over every worker's rows; P pass cut to the smallest rank's (code of 2026-12-06, before the P fill)",
    "pr": "BatchNorm per worker; P pass cut to the smallest rank's (commit 486fbf2)",
}
rows = []
for d in sorted(out.glob("w*-s*")):
    f = d / "metrics.json"
    if not d.is_dir() or not f.exists():
        continue
    m = json.loads(f.read_text())
    w, s = d.name[1:].split("-s")
    tag = w.lstrip("0123456789")
    w = w[:len(w) - len(tag)]
    rows.append({"workers": int(w) or 1, "path": "one process" if w == "0" else "ray train",
                 "code": VARIANTS[tag] if w != "0" else "one process",
                 "seed": int(s), "test_accuracy": m.get("test_accuracy"),
                 "partial_accuracy": m.get("partial_accuracy"),
                 "seconds": m.get("wall_seconds"),
                 "curve": [round(h["test_accuracy"], 4) for h in m.get("history", [])
                           if h.get("test_accuracy") is not None]})
res.write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"{len(rows)} rows -> {res}")
PY
}
# one-process runs two at a time (one core each), then the 2-worker runs one at a time
set -- $SEEDS
while [ $# -gt 0 ]; do
  run 0 "$1" & [ $# -gt 1 ] && run 0 "$2"; wait; shift; [ $# -gt 0 ] && shift
  collect
done
for s in $SEEDS; do run 2 "$s"; collect; done
if [ -n "${PER_RANK:-}" ]; then for s in $SEEDS; do run 2 "$s" nb; collect; done; fi
