#!/usr/bin/env bash
# CPU-sized accuracy check: annotator vs warm-up-only vs Co-Reg on the same data, backbone,
# epochs and seed. Usage:
#   bash benchmarks/scripts/accuracy_cpu.sh OUTDIR N_TRAIN EPOCHS WARMUP PER_CLASS [extra --set args...]
# COREG_DATA: the folder holding train.parquet and test.parquet; the defaults (OUTDIR
# runs/bench-cifar, the CIFAR-10 copy the configs name) are taken from the repository root.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$repo/runs/bench-cifar}; n=${2:-2000}; ep=${3:-30}; wu=${4:-10}; pc=${5:-10}
shift 5 || true
data=${COREG_DATA:-$repo/../shared/data/cifar10-jpeg}
mkdir -p "$out"
coreg-ray simulate-annotator --images "$data/train.parquet" --limit "$n" --templates 8 \
  --per-class "$pc" --output "$out/ann.parquet" --test-images "$data/test.parquet" \
  --test-output "$out/test-ann.parquet" | tee "$out/annotator.json"
common=(--images "$data/train.parquet" --limit "$n" --annotations "$out/ann.parquet"
        --test-images "$data/test.parquet" --no-mlflow --set model.backbone=small_cnn
        --set train.epochs="$ep" --set train.batch_size=64 --set train.warmup_batch_size=128
        --set coreg.queue_size=1024 --set coreg.feature_delay=2 --set train.eval_every=5 "$@")
coreg-ray train "${common[@]}" --set train.warmup_epochs="$ep" --output "$out/warmup-only" | tee "$out/warmup-only.json"
coreg-ray train "${common[@]}" --set train.warmup_epochs="$wu" --output "$out/coreg" | tee "$out/coreg.json"
