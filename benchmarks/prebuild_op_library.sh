#!/usr/bin/env bash
# Builds the op library (dbc_fast/_C.so, CUDA kernels for sm_90) HERE for a GPU machine's torch, so a lease does
# not spend a minute and a half of device time compiling:
#   bash benchmarks/prebuild_op_library.sh            # TORCH=2.11.0 (the lent machines'), about 3 GB of wheels once
# writes .carry/lib-torch$TORCH/_C.so (+ BUILD.txt: versions, commit, sha256). On the device:
#   DBC_FAST_PREBUILT_LIB=$PWD/.carry/lib-torch2.11.0/_C.so bash benchmarks/gpu_suite.sh ...   (carry that folder)
# The library has no Python bindings, so a build against the same torch release loads under another Python; the
# suite checks that it loads with its CUDA kernels and builds from source otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
WORK=${WORK:-/tmp/dbc_fast_prebuild_$TORCH}
DEST=.carry/lib-torch$TORCH
mkdir -p "$WORK"
[ -x "$WORK/venv/bin/python" ] || python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==$TORCH" numpy setuptools wheel ninja
CUDA=$("$PY" -c "import torch; print(torch.version.cuda)")
# nvcc for torch's CUDA from pip; cccl holds nv/target; torch's own wheels bring the library headers (cusparse.h...)
"$PY" -m pip install -q "nvidia-cuda-nvcc==$CUDA.*" "nvidia-nvvm==$CUDA.*" "nvidia-cuda-crt==$CUDA.*" \
    "nvidia-cuda-cccl==$CUDA.*"
NV=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu${CUDA%%.*}'))")
[ -e "$NV/lib/libcudart.so" ] || ln -s "$(basename "$(ls "$NV"/lib/libcudart.so.* | head -1)")" "$NV/lib/libcudart.so"

SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"   # the committed tree: what the device runs
(cd "$SRC" && CUDA_HOME="$NV" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace) \
    > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; echo "build failed: $WORK/build.log"; exit 1; }
"$PY" - "$SRC/dbc_fast/_C.so" <<'EOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
if not torch._C._dispatch_has_kernel_for_dispatch_key("dbc_fast::masked_pool", "CUDA"):
    sys.exit(f"{sys.argv[1]} has no CUDA kernels (see the build log)")
EOF
mkdir -p "$DEST"
cp "$SRC/dbc_fast/_C.so" "$DEST/_C.so"
{
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)'), nvcc $("$NV/bin/nvcc" --version | grep -o 'release [0-9.]*')"
  echo "TORCH_CUDA_ARCH_LIST=9.0, commit $(git rev-parse HEAD)"
  sha256sum "$DEST/_C.so"
} > "$DEST/BUILD.txt"
cat "$DEST/BUILD.txt"
echo "wrote $DEST/_C.so ($(du -h "$DEST/_C.so" | cut -f1)); carry $DEST and set DBC_FAST_PREBUILT_LIB=\$PWD/$DEST/_C.so"
