#!/usr/bin/env bash
# Runs the CUDA engine's tests (tests/test_cuda.py) on a machine without a GPU: builds thermo_ext
# with THERMO_EXT_CUDA_EMULATION=ON (csrc/cuda/engine.cu translated to C++ on the emulation in
# tools/cuda_emu/cuda_emu.h) into a throwaway directory, never the active environment, and runs
# the tests with the emulated engine as the "device". Slow (a std::thread per CUDA thread), and
# not a GPU: see docs/CUDA_EMULATION.md for what it covers and what it cannot.
#
# Usage: tools/cuda_emu.sh [pytest args...]
# Environment: PYTHON (default python3; needs torch, pytest, hypothesis, pybind11 and
#   scikit-build-core), TE_EMU_DIR (build and install directory; default a new mktemp -d,
#   removed afterwards), TE_EMU_REUSE=1 (skip the build, Python package included, when TE_EMU_DIR
#   holds one).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
made_dir=0
if [[ -z "${TE_EMU_DIR:-}" ]]; then
  TE_EMU_DIR=$(mktemp -d /tmp/te-cuda-emu.XXXXXX)
  made_dir=1
fi
SITE="$TE_EMU_DIR/site"
trap '[[ $made_dir == 1 ]] && rm -rf "$TE_EMU_DIR"' EXIT

if [[ "${TE_EMU_REUSE:-0}" == 1 && -d "$SITE/thermo_ext" ]]; then
  echo "== reusing the emulation build in $SITE"
else
  echo "== building thermo_ext with the CUDA engine on the CPU emulation into $SITE"
  rm -rf "$SITE"
  (cd "$ROOT" && "$PY" -m pip install --no-build-isolation --no-deps --quiet --target "$SITE" \
      -C build-dir="$TE_EMU_DIR/build" \
      -C cmake.define.THERMO_EXT_CUDA_EMULATION=ON .)
fi

# What cannot be emulated: CUDA graph capture (no graphs here) and the 2**31-element test
# (memory and time).
DESELECT="not graph and not capturable and not 2_31"
if [[ $# -eq 0 ]]; then
  set -- tests/test_cuda.py -k "$DESELECT"
fi
cd "$ROOT"
export PYTHONPATH="$SITE:$ROOT/tools/cuda_emu${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m pytest -p plugin -p no:cacheprovider -q "$@"
