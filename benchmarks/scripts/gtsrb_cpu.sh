#!/usr/bin/env bash
# The GTSRB CPU table (issue: Co-Reg on the paper's own ground), resumable: rerun this script
# and every finished run is skipped (results.jsonl; a missing runs/<name>/results.jsonl is first
# seeded from the recorded copy in benchmarks/results/gtsrb-cpu/). Order: seed 0 of the main
# table and its few-shot rows; the x3-length table without DivideMix (the slowest method);
# seeds 1 and 2 of the main table without DivideMix, then with it; the x3-length DivideMix rows;
# the few-shot rows of seeds 1 and 2. Raw rows are copied to benchmarks/results/gtsrb-cpu/ after
# each phase.
#   nohup bash benchmarks/scripts/gtsrb_cpu.sh > runs/gtsrb_cpu.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
RES=benchmarks/results/gtsrb-cpu
mkdir -p runs/tmp "$RES"
variant() {  # $1 config, $2 seeds (YAML list or ""), $3 method to leave out (or ""), $4 parallel
  local out="runs/tmp/$(basename "$1" .yaml)-$(echo "$2-$3-$4" | tr -dc 'a-z0-9-').yaml"
  "$PY" - "$1" "$2" "$3" "$4" "$out" <<'PY'
import sys, yaml
src, seeds, drop, parallel, out = sys.argv[1:]
d = yaml.safe_load(open(src))
if seeds:
    d["seeds"] = yaml.safe_load(seeds)
if drop:
    d["methods"] = [m for m in d["methods"] if m != drop]
if parallel:
    d["parallel"] = int(parallel)
yaml.safe_dump(d, open(out, "w"), sort_keys=False, allow_unicode=True)
PY
  echo "$out"
}
run() {  # $1 config, $2 output name
  if [ ! -f "runs/$2/results.jsonl" ] && [ -f "$RES/$2/results.jsonl" ]; then
    mkdir -p "runs/$2" && cp "$RES/$2/results.jsonl" "runs/$2/"
  fi
  "$PY" -m coreg_ray.cli experiment --config "$1" --output "runs/$2" --no-mlflow
  mkdir -p "$RES/$2"
  cp "runs/$2/results.jsonl" "runs/$2/table.md" "runs/$2/table.csv" "$RES/$2/" 2>/dev/null
}
MAIN=configs/exp-gtsrb-cpu.yaml FEW=configs/exp-gtsrb-cpu-fewshot.yaml
LEN=configs/exp-gtsrb-cpu-length.yaml
run "$(variant $MAIN '[0]' '' '')" exp-gtsrb-cpu
run "$(variant $FEW '[0]' '' '')" exp-gtsrb-cpu-fewshot
run "$(variant $LEN '' dividemix '')" exp-gtsrb-cpu-length
run "$(variant $MAIN '' dividemix '')" exp-gtsrb-cpu
run $MAIN exp-gtsrb-cpu
run $LEN exp-gtsrb-cpu-length
run $FEW exp-gtsrb-cpu-fewshot
