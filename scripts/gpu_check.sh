#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it checks and measures), on a machine with one or more
# NVIDIA GPUs, in about 5 minutes on one. Run from the repository root after `make install` (or
# `pip install -e '.[vllm]'`, plus `pip install deepspeed` for the ZeRO-3 stage):
#
#     bash scripts/gpu_check.sh [OUT_DIR] [--model NAME_OR_PATH] [--fresh-weights]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT_DIR=${1:-$(mktemp -d)}
shift || true
echo "gpu check: writing to $OUT_DIR"
exec "$PY" scripts/gpu_check.py "$OUT_DIR" "$@"
