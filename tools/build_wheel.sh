#!/usr/bin/env bash
# The release build: one wheel per CPython (3.9 .. 3.13), each with the CPU engine (_C) and the
# CUDA engine library (thermo_ext/lib/libthermo_ext_cuda<major>.so) built once, with the CUDA
# toolkit on PATH, for every architecture it supports from sm_75 on (SASS) plus PTX of the
# newest; repaired with auditwheel; and an sdist beside them.
#
# Usage: tools/build_wheel.sh                       # wheels and sdist into dist/wheelhouse
# Environment:
#   PYTHONS           interpreters to build for (default: pyenv's 3.9 .. 3.13 found under
#                     /root/.pyenv/versions, else python3)
#   THERMO_EXT_CUDA   OFF: a CPU-only wheel (no CUDA library; what CI builds)
#   TE_CUDA_LIBS      prebuilt libraries to ship instead of building one here (';'-separated),
#                     e.g. dist/cuda/libthermo_ext_cuda13.so;/elsewhere/libthermo_ext_cuda12.so
#                     (a CUDA 12 library built with tools/build_cuda_lib.sh on a machine with a
#                     CUDA 12 toolkit, from the same source: the module refuses one built from
#                     other sources)
#   TE_EXTRA_CUDA_LIBS  libraries added to the one built here (the CUDA 12 one, as above)
#   AUDITWHEEL        0: skip the repair (the wheels stay linux_x86_64)
# Prints a table of the wheels (size, build time, tags) at the end; dist/wheelhouse/BUILD.txt
# keeps it with the CUDA libraries' architectures and driver floors.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT="$ROOT/dist/wheelhouse"
RAW="$ROOT/dist/raw"
rm -rf "$OUT" "$RAW"
mkdir -p "$OUT" "$RAW"
TOOLPY=${TOOLPY:-python3}
LOG="$OUT/BUILD.txt"
: >"$LOG"
note() { echo "$*" | tee -a "$LOG"; }

if [[ -z "${PYTHONS:-}" ]]; then
  PYTHONS=""
  for v in 3.9 3.10 3.11 3.12 3.13; do
    p=$(ls -d /root/.pyenv/versions/$v.*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$p" ]] && PYTHONS+="$p "
  done
  [[ -n "$PYTHONS" ]] || PYTHONS=$(command -v python3)
fi

# 1. The CUDA library, once.
LIBS=""
if [[ "${THERMO_EXT_CUDA:-AUTO}" != "OFF" ]]; then
  if [[ -n "${TE_CUDA_LIBS:-}" ]]; then
    LIBS="$TE_CUDA_LIBS"
  elif command -v nvcc >/dev/null || [[ -n "${THERMO_EXT_CUDA_HOME:-}" ]]; then
    t0=$SECONDS
    lib=$(PYTHON="$TOOLPY" THERMO_EXT_CUDA_ARCHS=${THERMO_EXT_CUDA_ARCHS:-all} \
      "$ROOT/tools/build_cuda_lib.sh" "$ROOT/dist/cuda" 2>"$OUT/cuda_lib.log" | tail -n 1)
    note "CUDA library: $lib, $(stat -c %s "$lib") bytes, built in $((SECONDS - t0)) s"
    LIBS="$lib"
  elif [[ "${THERMO_EXT_CUDA:-AUTO}" == "ON" ]]; then
    echo "build_wheel.sh: THERMO_EXT_CUDA=ON but no nvcc" >&2
    exit 2
  fi
  [[ -n "${TE_EXTRA_CUDA_LIBS:-}" ]] && LIBS="${LIBS:+$LIBS;}$TE_EXTRA_CUDA_LIBS"
fi

# 2. One wheel per Python: the module compiled, the library copied in.
ARGS=(--config-settings "cmake.define.THERMO_EXT_CUDA=OFF")
[[ -n "$LIBS" ]] && ARGS=(--config-settings "cmake.define.THERMO_EXT_CUDA_PREBUILT=$LIBS")
for py in $PYTHONS; do
  t0=$SECONDS
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  "$py" -m pip wheel -q --no-deps -w "$RAW" "${ARGS[@]}" \
    --config-settings "build-dir=build/wheel-$tag" . >"$OUT/wheel-$tag.log" 2>&1 ||
    { tail -n 30 "$OUT/wheel-$tag.log"; exit 1; }
  note "wheel $tag: built in $((SECONDS - t0)) s"
done

# 3. auditwheel: the manylinux tag this machine's glibc and libstdc++ allow. libgomp.so.1 is
# left out on purpose: torch's wheels carry it under that soname and torch is imported first,
# so the CPU engine runs in torch's OpenMP runtime (one thread pool); a vendored, renamed copy
# would be a second runtime.
for whl in "$RAW"/*.whl; do
  if [[ "${AUDITWHEEL:-1}" == 1 ]]; then
    "$TOOLPY" -m auditwheel show "$whl" >"$OUT/$(basename "$whl").show.txt" 2>&1 || true
    "$TOOLPY" -m auditwheel repair --exclude libgomp.so.1 -w "$OUT" "$whl" \
      >>"$OUT/auditwheel.log" 2>&1 || { tail -n 20 "$OUT/auditwheel.log"; exit 1; }
  else
    cp "$whl" "$OUT/"
  fi
done

# 4. The sdist.
"$TOOLPY" - "$OUT" <<'PY'
import sys
from scikit_build_core.build import build_sdist
print("sdist:", build_sdist(sys.argv[1]))
PY

note ""
note "| file | size (MB) |"
note "|---|---|"
for f in "$OUT"/*.whl "$OUT"/*.tar.gz; do
  note "| $(basename "$f") | $(awk "BEGIN{printf \"%.1f\", $(stat -c %s "$f")/1048576}") |"
done
