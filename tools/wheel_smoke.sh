#!/usr/bin/env bash
# Installs a thermo_ext wheel into a fresh virtual environment and tests it there as a user
# would have it: no compiler on PATH, no access to the source tree (the tests run from a copy of
# a few test files in a temporary directory), only the wheel and torch from the package index.
#
# Usage: tools/wheel_smoke.sh WHEEL [TORCH_SPEC]      (TORCH_SPEC default torch==2.13.0)
# Runs tools/wheel_smoke.py, then a subset of the suite (SUBSET, default below) with pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
TORCH=${2:-torch==2.13.0}
SUBSET=${SUBSET:-"test_cuda_library.py test_random.py test_schemes.py test_tuning.py"}
T=$(mktemp -d /tmp/te-wheel-smoke.XXXXXX)
trap 'rm -rf "$T"' EXIT
PY=${PYTHON:-python3}

"$PY" -m venv "$T/venv"
"$T/venv/bin/pip" install -q "$TORCH" pytest hypothesis numpy scipy
# --no-index --only-binary: the wheel itself, nothing built (thermo_ext's only dependency,
# torch, is there already)
"$T/venv/bin/pip" install -q --no-index --only-binary=:all: --no-deps "$WHEEL"

mkdir -p "$T/run/tests" "$T/bin"
cp "$ROOT/tools/wheel_smoke.py" "$T/run/"
cp "$ROOT/tests/conftest.py" "$ROOT/tests/helpers.py" "$T/run/tests/"
for f in $SUBSET; do cp "$ROOT/tests/$f" "$T/run/tests/"; done
# A PATH with the venv and a few shell tools: no cc, c++, gcc, g++, nvcc, ld.
for tool in sh bash env cat uname ldconfig; do
  src=$(command -v "$tool" || true)
  [[ -n "$src" ]] && ln -s "$src" "$T/bin/$tool"
done
cd "$T/run"
run() {
  env -i HOME="$T" PATH="$T/venv/bin:$T/bin" CC=/nonexistent CXX=/nonexistent \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$@"
}
run sh -c 'for c in cc c++ gcc g++ nvcc; do command -v $c && exit 1; done; exit 0' ||
  { echo "wheel_smoke.sh: a compiler is on PATH" >&2; exit 1; }
run "$T/venv/bin/python" wheel_smoke.py ${SMOKE_ARGS:-}
run "$T/venv/bin/python" -m pytest -q -p no:cacheprovider tests
