#!/usr/bin/env bash
# Builds the CUDA engine library alone: libthermo_ext_cuda<major>.so, the major being the
# toolkit's. Built once and shared by every Python's wheel (its interface is plain C:
# csrc/cuda/cuda_capi.h), so tools/build_wheel.sh calls this once.
#
# Usage: tools/build_cuda_lib.sh [OUT_DIR]        (default dist/cuda; prints the library's path)
# Environment:
#   THERMO_EXT_CUDA_HOME  the toolkit's root (default: the nvcc on PATH). A CUDA 12 library for
#                         the same wheel is built on a machine with a CUDA 12 toolkit, e.g.
#                         THERMO_EXT_CUDA_HOME=/usr/local/cuda-12.8 tools/build_cuda_lib.sh
#   THERMO_EXT_CUDA_ARCHS all (default: every architecture of the toolkit from sm_75 on as SASS,
#                         plus PTX of the newest), or a TORCH_CUDA_ARCH_LIST-style list
#   NVCC_THREADS          architectures compiled in parallel by nvcc (default: the cores)
#   PYTHON                the interpreter CMake runs cmake/cuda_archs.py with (default python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/dist/cuda}
PY=${PYTHON:-python3}
if [[ -n "${THERMO_EXT_CUDA_HOME:-}" ]]; then
  NVCC="$THERMO_EXT_CUDA_HOME/bin/nvcc"
else
  NVCC=$(command -v nvcc || true)
fi
[[ -x "$NVCC" ]] || { echo "build_cuda_lib.sh: no nvcc (set THERMO_EXT_CUDA_HOME or PATH)" >&2; exit 2; }
MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
BUILD="$ROOT/build/cudalib$MAJOR"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
mkdir -p "$OUT"
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DTHERMO_EXT_CUDA_LIBRARY_ONLY=ON -DTHERMO_EXT_CUDA=ON \
  -DTHERMO_EXT_CUDA_ARCHS="${THERMO_EXT_CUDA_ARCHS:-all}" -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DCMAKE_CUDA_FLAGS="--threads ${NVCC_THREADS:-$(nproc)}" -DPython_EXECUTABLE="$(command -v "$PY")" >&2
cmake --build "$BUILD" >&2
cp "$BUILD/libthermo_ext_cuda$MAJOR.so" "$OUT/"
echo "$OUT/libthermo_ext_cuda$MAJOR.so"
