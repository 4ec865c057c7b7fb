#!/usr/bin/env bash
# The GTSRB table at the paper's schedule (configs/exp-gtsrb-cpu-100.yaml: 100 epochs, 50 warm-up),
# resumable: rerun it and every finished run is skipped (runs/exp-gtsrb-cpu-100/results.jsonl,
# seeded from benchmarks/results/gtsrb-cpu-100/ when missing), and a Co-Reg run that was killed
# continues from its last epoch (runs/exp-gtsrb-cpu-100/checkpoints/). On 2 cores a Co-Reg row takes
# about 1.5 h, so the rows go in the order that fills the table's most telling cells first:
#   1. Co-Reg, both columns at once
#   2. true-labels ceiling, zero-shot, warm-up-only, PRODEN, ALIM-Scale
#   3. Co-Reg with 4 true labels per class
#   4. DivideMix, PiCO
# each a copy of the config with only those methods (or shots) in runs/tmp/; raw rows are copied
# to benchmarks/results/gtsrb-cpu-100/ after each step; `python benchmarks/scripts/gtsrb_100_report.py`
# prints the table from them and draws its curves (curves.png there).
#   nohup bash benchmarks/scripts/gtsrb_cpu_100.sh > runs/gtsrb_cpu_100.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/coreg-ray}
CONFIG=configs/exp-gtsrb-cpu-100.yaml
OUT=runs/exp-gtsrb-cpu-100
RES=benchmarks/results/gtsrb-cpu-100
mkdir -p runs/tmp "$OUT" "$RES"
[ -f "$OUT/results.jsonl" ] || { [ -f "$RES/results.jsonl" ] && cp "$RES/results.jsonl" "$OUT/"; }
step() {  # $1 name, $2 methods (YAML list), $3 shots (YAML list)
  local cfg="runs/tmp/exp-gtsrb-cpu-100-$1.yaml"
  "$PY" - "$CONFIG" "$2" "$3" "$cfg" <<'PY'
import sys, yaml
src, methods, shots, out = sys.argv[1:]
d = yaml.safe_load(open(src))
d["methods"], d["shots"] = yaml.safe_load(methods), yaml.safe_load(shots)
yaml.safe_dump(d, open(out, "w"), sort_keys=False, allow_unicode=True)
PY
  echo "== step $1: $(date -u +%H:%M)"
  "$CLI" experiment --config "$cfg" --output "$OUT" --no-mlflow
  cp "$OUT/results.jsonl" "$RES/results.jsonl"
}
step coreg "[coreg]" "[0]"
step baselines "[true_labels, zero_shot, warmup_only, proden, alim_scale]" "[0]"
step fewshot "[coreg]" "[4]"
step slow "[dividemix, pico]" "[0]"
