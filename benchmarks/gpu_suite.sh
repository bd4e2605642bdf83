#!/usr/bin/env bash
# One command for a GPU lease (see benchmarks/README.md):
#   bash benchmarks/gpu_suite.sh [--budget SECONDS] [--parts a,b,c] [--out DIR] [--dry-run] [--list]
# The parts, their order and time limits are in benchmarks/gpu_suite.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
exec "$PY" benchmarks/gpu_suite.py "$@"
