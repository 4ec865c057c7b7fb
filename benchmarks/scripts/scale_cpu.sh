#!/usr/bin/env bash
# The scale measurements of benchmarks/scale_cpu.md, resumable (each run already in the results
# file is skipped). Usage: bash benchmarks/scripts/scale_cpu.sh SOURCE_TABLE POOLS_DIR [SIZES...]
#   SOURCE_TABLE: a Parquet image table to re-crop (e.g. DATA/gtsrb32/train.parquet)
#   POOLS_DIR: where the generated pools go; SIZES default: 100000 300000
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
src="$1"; pools="$2"; shift 2
sizes=("${@:-100000 300000}")
py="${PYTHON:-python}"
results="$here/benchmarks/results/scale_cpu.jsonl"
for n in ${sizes[@]}; do
  pool="$pools/pool$n"
  "$py" "$here/benchmarks/scripts/scale_pool.py" --source "$src" --rows "$n" --out "$pool"
  "$py" "$here/benchmarks/scripts/scale_memory.py" --pool "$pool" --workers 2 --results "$results"
  if [ "$n" = 300000 ]; then
    "$py" "$here/benchmarks/scripts/scale_memory.py" --pool "$pool" --workers 1 --results "$results"
  fi
done
