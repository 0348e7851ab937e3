#!/usr/bin/env bash
# Builds thermo_ext's CPU engine with AddressSanitizer + UndefinedBehaviorSanitizer into a
# throwaway directory (never into the active environment) and runs the engine tests under it.
# CI-optional; see docs/SANITIZERS.md for what it does, why, and the last recorded result.
#
# Usage: tools/sanitize.sh [pytest args...]      (default: the engine, RNG and optimizer tests)
# Environment:
#   PYTHON          interpreter with torch, pytest, hypothesis, scikit-build-core, pybind11
#                   (default: python3 on PATH)
#   TE_SAN_DIR      where to build and install (default: a new mktemp -d under /tmp; reusing
#                   one keeps the CMake build directory, so a rebuild is incremental)
#   TE_SAN_KEEP=1   keep TE_SAN_DIR afterwards (it is removed when this script made it)
#   TE_SAN_REUSE=1  skip the build when TE_SAN_DIR already holds one
#   CC, CXX         compilers (default gcc, g++; the runtime libraries come from $CXX)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
CC=${CC:-gcc}
export CC CXX

made_dir=0
if [[ -z "${TE_SAN_DIR:-}" ]]; then
  TE_SAN_DIR=$(mktemp -d /tmp/te-sanitize.XXXXXX)
  made_dir=1
fi
BUILD="$TE_SAN_DIR/build"
SITE="$TE_SAN_DIR/site"
cleanup() {
  if [[ $made_dir == 1 && "${TE_SAN_KEEP:-0}" != 1 ]]; then rm -rf "$TE_SAN_DIR"; fi
}
trap cleanup EXIT

SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

if [[ "${TE_SAN_REUSE:-0}" == 1 && -d "$SITE/thermo_ext" ]]; then
  echo "== reusing the sanitizer build in $SITE"
else
  echo "== building thermo_ext with ASan+UBSan into $SITE (build dir $BUILD)"
  rm -rf "$SITE"
  # RelWithDebInfo: pybind11 adds neither LTO nor strip for it (LTO objects would be compiled
  # without the sanitizer instrumentation at link time, strip would drop the symbols of the
  # reports); IPO is switched off explicitly as well. CUDA off: the sanitizers cover host code.
  (cd "$ROOT" && "$PY" -m pip install --no-build-isolation --no-deps --quiet \
      --target "$SITE" \
      -C build-dir="$BUILD" \
      -C cmake.build-type=RelWithDebInfo \
      -C cmake.define.THERMO_EXT_CUDA=OFF \
      -C cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
      -C "cmake.define.CMAKE_CXX_FLAGS=$SAN_FLAGS" \
      -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined" \
      -C "cmake.define.CMAKE_MODULE_LINKER_FLAGS=-fsanitize=address,undefined" \
      .)
fi

SO=$(ls "$SITE"/thermo_ext/_C*.so)
SYMS=$(nm -D "$SO")  # (not piped into grep -q: with pipefail, nm's SIGPIPE would fail the test)
for rt in __asan_ __ubsan_; do
  if [[ "$SYMS" != *"$rt"* ]]; then
    echo "error: $SO is not instrumented (no $rt symbols)" >&2
    exit 2
  fi
done

# The interpreter is not instrumented, so the runtimes must come first in the process.
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
  [[ -e "$lib" ]] || { echo "error: sanitizer runtime $lib not found" >&2; exit 2; }
done

if [[ $# -eq 0 ]]; then
  set -- tests/test_engine.py tests/test_random.py tests/test_optim.py
fi

# detect_leaks=0: CPython and torch keep allocations alive until exit (interned objects, caching
# allocators), which LeakSanitizer would list by the thousand; the engine allocates nothing per
# step, and tests/test_hardening.py measures that with RSS instead.
# halt_on_error / -fno-sanitize-recover: the first finding fails the run with a non-zero exit.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:print_summary=1:strict_string_checks=0:${ASAN_OPTIONS_EXTRA:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:${UBSAN_OPTIONS_EXTRA:-}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"

cd "$ROOT"
# Prove the instrumented copy is the one imported (the tests then use it, subprocesses too:
# they inherit PYTHONPATH and LD_PRELOAD).
"$PY" -c "import thermo_ext, sys; f = thermo_ext._C.__file__; print('== thermo_ext._C from', f); sys.exit(0 if f.startswith('$SITE') else 3)"

# Canary: an out-of-bounds read through the raw-pointer API (philox of 5 rows into buffers of 4)
# must be reported, else the sanitizer is not live and a clean run below would mean nothing.
if [[ "${TE_SAN_CANARY:-1}" == 1 ]]; then
  set +e
  canary=$("$PY" -c "
import torch, thermo_ext
c = torch.zeros(4, 4, dtype=torch.int64); k = torch.zeros(4, 2, dtype=torch.int64)
o = torch.empty(4, 4, dtype=torch.int64)
thermo_ext._C.philox(c.data_ptr(), k.data_ptr(), o.data_ptr(), 5)
" 2>&1)
  crc=$?
  set -e
  if [[ $crc != 86 || "$canary" != *"heap-buffer-overflow"* ]]; then
    echo "error: the canary overflow was not reported (exit $crc); the sanitizer is not live" >&2
    echo "$canary" | tail -5 >&2
    exit 2
  fi
  echo "== canary: AddressSanitizer reported the deliberate heap-buffer-overflow (good)"
fi

echo "== ASAN_OPTIONS=$ASAN_OPTIONS"
echo "== UBSAN_OPTIONS=$UBSAN_OPTIONS"
echo "== LD_PRELOAD=$LD_PRELOAD"
set +e
"$PY" -m pytest -p no:cacheprovider -q "$@"
rc=$?
set -e
echo "== pytest exit status $rc (86: AddressSanitizer report, 87: UBSan report)"
exit $rc
