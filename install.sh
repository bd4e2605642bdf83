#!/usr/bin/env bash
# Installs dbc_fast and everything its tests need into the current Python environment.
# torch comes unpinned from the registry (never swapped later); a CUDA compiler matching torch's CUDA
# comes from pip so the CUDA kernels compile even on a machine with no GPU (skipped if unavailable).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
$PY -m pip install -q --upgrade pip
# The C++ example (csrc/example) needs cmake, libjpeg and libpng; fetched only where missing and possible.
if ! dpkg -s cmake libjpeg-dev libpng-dev >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq cmake libjpeg-dev libpng-dev) >/dev/null \
    || echo "[install.sh] could not install cmake/libjpeg-dev/libpng-dev: the C++ example tests will skip"
fi
$PY -c "import torch, torchvision, timm" 2>/dev/null || $PY -m pip install -q torch torchvision timm
$PY -m pip install -q numpy pillow pyyaml tqdm opencv-python-headless pytest pytest-benchmark scipy setuptools wheel

CUDA_VER=$($PY -c "import torch; print(torch.version.cuda or '')")
if [ -n "$CUDA_VER" ] && [ "${DBC_FAST_NO_CUDA:-0}" != "1" ]; then
  if $PY -m pip install -q "nvidia-cuda-nvcc==${CUDA_VER}.*" "nvidia-nvvm==${CUDA_VER}.*" "nvidia-cuda-crt==${CUDA_VER}.*"; then
    NV=$($PY -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu' + '${CUDA_VER}'.split('.')[0]))")
    # The wheels ship only libcudart.so.N; the linker wants libcudart.so.
    [ -e "$NV/lib/libcudart.so" ] || ln -s "$(basename "$(ls "$NV"/lib/libcudart.so.* | head -1)")" "$NV/lib/libcudart.so"
    export CUDA_HOME="$NV"
  else
    echo "[install.sh] no nvcc ${CUDA_VER} on pip: the CUDA kernels will be skipped"
  fi
fi
# DALI (optional extra) so the CPU pipelines are tested; its wheel follows torch's CUDA major version.
DALI_CUDA=$( [ "${CUDA_VER%%.*}" = "12" ] && echo 120 || echo 130 )
$PY -m pip install -q "nvidia-dali-cuda${DALI_CUDA}" || echo "[install.sh] DALI not installed: --loader dali unavailable, its tests skip"
$PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import dbc_fast, dbc_fast.ops as o; print('dbc_fast', dbc_fast.__version__, '| op library:', o.library_path() or 'not built')"
