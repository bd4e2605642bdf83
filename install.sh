#!/usr/bin/env bash
# Installs dbc_fast and everything its tests need into the current Python environment.
# torch comes unpinned from the registry if missing, and is never swapped later. For a CUDA build of torch,
# nvcc matching torch's CUDA version comes from pip (nvcc, nvvm, crt and the CUDA C++ core headers, cccl), so
# the CUDA kernels compile even on a machine without a GPU; when they cannot be built, for whatever reason, the
# op library is built with its CPU ops only and one line says why (never a failed install).
# DBC_FAST_NO_CUDA=1 skips the CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
say() { echo "[install.sh] $*"; }
$PY -m pip install -q --upgrade pip || say "could not upgrade pip: going on with $($PY -m pip --version | cut -d' ' -f1-2)"
# The C++ example (csrc/example) needs cmake, libjpeg and libpng; fetched only where missing and possible.
have_example_deps() { command -v cmake >/dev/null && [ -e /usr/include/jpeglib.h ] && [ -e /usr/include/png.h ]; }
if ! have_example_deps && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq cmake libjpeg-dev libpng-dev) >/dev/null \
    || say "could not install cmake/libjpeg-dev/libpng-dev: the C++ example cannot be built"
fi
if ! $PY -c "import torch, torchvision, timm" 2>/dev/null; then
  # An installed torch stays: pin it, so that torchvision/timm come in versions made for it.
  TORCH_PIN=$($PY -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null || echo torch)
  $PY -m pip install -q "$TORCH_PIN" torchvision timm
fi
$PY -m pip install -q numpy pillow pyyaml tqdm opencv-python-headless pytest pytest-benchmark scipy setuptools wheel

CUDA_VER=$($PY -c "import torch; print(torch.version.cuda or '')")
if [ -n "$CUDA_VER" ] && [ "${DBC_FAST_NO_CUDA:-0}" != "1" ]; then
  # pip's CUDA 13 toolkit lands in site-packages/nvidia/cu13, where setup.py finds it. cccl holds nv/target,
  # which cuda_fp16.h includes.
  $PY -m pip install -q "nvidia-cuda-nvcc==${CUDA_VER}.*" "nvidia-nvvm==${CUDA_VER}.*" "nvidia-cuda-crt==${CUDA_VER}.*" \
      "nvidia-cuda-cccl==${CUDA_VER}.*" \
    || say "no CUDA ${CUDA_VER} compiler on pip: the build looks for one in \$CUDA_HOME or /usr/local/cuda"
fi
# DALI (optional extra) so the CPU pipelines are tested; its wheel follows torch's CUDA major version.
DALI_CUDA=$( [ "${CUDA_VER%%.*}" = "12" ] && echo 120 || echo 130 )
$PY -m pip install -q "nvidia-dali-cuda${DALI_CUDA}" || say "DALI not installed: --loader dali unavailable, its tests skip"

# The package and its op library. The build's own lines ("[dbc_fast setup] ...") say what it built.
mkdir -p build
LOG=build/install.log
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . >"$LOG" 2>&1; then
  tail -n 40 "$LOG"
  say "installing dbc_fast failed (whole log: $LOG)"
  exit 1
fi
(grep -o '\[dbc_fast setup\].*' "$LOG" | grep -v 'CUDA kernels failed to build' | awk '!seen[$0]++') || true
if grep -q 'CUDA kernels failed to build' "$LOG"; then
  say "the CUDA kernels did not build, so the op library has its CPU ops only: $(grep -m1 -E 'fatal error|error:|cannot find' "$LOG" | sed 's/^ *//' | cut -c1-300) (whole log: $LOG)"
fi
$PY - <<'PYEOF'
import torch

import dbc_fast
from dbc_fast import ops
from dbc_fast.ops import cpp_backend

try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
path = ops.library_path()
if path:
    ops.available_backends("cpu")  # loads the library
    path += " (with CUDA kernels)" if cpp_backend._has_cuda_kernels() else " (CPU ops only)"
print(f"dbc_fast {dbc_fast.__version__} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"triton {triton_version} | op library: {path or 'not built'}")
PYEOF
