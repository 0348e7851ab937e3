#!/usr/bin/env bash
# The GPU check of thermo_ext on a CUDA machine without network (an H200: sm_90).
#
#   bash bench/gpu_check.sh            # from the repository root; logs to $OUT when set
#
# Installs the wheel of this machine's Python from dist/wheelhouse (tools/build_wheel.sh, built
# on the CPU machine and carried over: `carry: ["dist/wheelhouse"]`), as a pip user would; only
# where there is no such wheel does it build the package from source for sm_90 (and says so).
# Then it prints the build info (which engine library was chosen and why, and whether it runs on
# this GPU) and the GPU, runs the CUDA tests (and the CPU engine tests when time allows), then the
# step benchmark. The CUDA tests
# include what only a GPU can check: graph capture and replay (a replay that follows in-place
# changes of the device hyperparameters, as a scheduler makes them; the optimizer's capturable
# steps and skipped-step counter), the device math library against the host's, and with two
# GPUs the device guard (no primary context created on a GPU the thread never used). Every
# stage runs under a timeout carved from one budget (TOTAL_S, default 330 s), so the whole
# script stays under 6 minutes; a failed stage does not stop the later ones, and the script
# exits non-zero at the end when any stage failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-330}"
LOG_DIR="${OUT:-}"
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR="$(mktemp -d /tmp/thermo_ext_gpu_check.XXXXXX)"
fi
mkdir -p "$LOG_DIR"
START=$SECONDS
FAILED=()
NOTES=()

say() { printf '\n=== %s (t=%ds)\n' "$*" "$((SECONDS - START))"; }

# Seconds left for a stage: at most $1, leaving $2 for the stages after it.
budget() {
  local want=$1 reserve=$2 left
  left=$((TOTAL_S - (SECONDS - START) - reserve))
  ((left > want)) && left=$want
  echo "$left"
}

# run_stage NAME MAX_S RESERVE_S CMD...: runs CMD under a timeout, logs it, records a failure.
# QUIET=1 shows only the log's tail (the build's verbose output).
run_stage() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local t rc log="$LOG_DIR/$name.log"
  t=$(budget "$max" "$reserve")
  say "$name (timeout ${t}s)"
  if ((t < 10)); then
    echo "skipped: no time left" | tee "$log"
    FAILED+=("$name(no time)")
    return 0
  fi
  set +e
  if [[ "${QUIET:-0}" == 1 ]]; then
    timeout --kill-after=10 "$t" "$@" >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
  else
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  set -e
  if ((rc == 124 || rc == 137)) && [[ "${OPTIONAL:-0}" == 1 ]]; then
    echo "[$name timed out after ${t}s: optional, not counted as a failure]"
    NOTES+=("$name(timed out)")
  elif ((rc != 0)); then
    if ((rc == 124 || rc == 137)); then echo "[$name timed out after ${t}s]"; fi
    echo "[$name failed: exit status $rc]"
    FAILED+=("$name(rc=$rc)")
  fi
  return 0
}

# pip install in place; retried with --break-system-packages (then as a user install) only when
# pip refuses an externally managed interpreter, not after a compile error.
install_pkg() {
  set -o pipefail  # runs in a child bash (bash -c install_pkg)
  local tag wheel
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=$(ls dist/wheelhouse/thermo_ext-*-"$tag"-*manylinux*.whl 2>/dev/null | head -n 1 || true)
  if [[ -n "$wheel" ]]; then
    echo "[installing the wheel $wheel: no compiler involved]"
    "$PY" -m pip install --no-index --no-deps --force-reinstall "$wheel" && return 0
    "$PY" -m pip install --break-system-packages --no-index --no-deps --force-reinstall \
      "$wheel" && return 0
    "$PY" -m pip install --user --break-system-packages --no-index --no-deps --force-reinstall \
      "$wheel" && return 0
    return 1
  fi
  echo "[no $tag wheel in dist/wheelhouse: building from source for sm_90 instead]"
  # Its own build directory: the sm_90-only CMake cache must not leak into later builds.
  local args=(--no-build-isolation --no-deps -v -C build-dir=build/gpu_check
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C cmake.define.THERMO_EXT_CUDA=ON)
  local out
  out=$(mktemp)
  if "$PY" -m pip install "${args[@]}" . 2>&1 | tee "$out"; then return 0; fi
  grep -qi "externally.managed" "$out" || return 1
  echo "[pip refused the system interpreter; retrying with --break-system-packages]"
  if "$PY" -m pip install --break-system-packages "${args[@]}" . 2>&1 | tee "$out"; then
    return 0
  fi
  grep -qiE "permission|read-only" "$out" || return 1
  echo "[retrying as a user install]"
  "$PY" -m pip install --user --break-system-packages "${args[@]}" .
}

# CMake finds nvcc on PATH; add the usual toolkit location when it is not there.
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

say "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader ||
    echo "nvidia-smi failed"
  echo "GPUs: $(nvidia-smi -L 2>/dev/null | wc -l) (the device-guard test needs two)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "no nvcc on PATH"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())' || true
} 2>&1 | tee "$LOG_DIR/machine.log"

# Leave ~2.5 min for the tests and the benchmark.
export PY
export -f install_pkg
QUIET=1 run_stage build 200 150 bash -c install_pkg

run_stage build_info 30 140 bash -c "cd /tmp && \"$PY\" -m thermo_ext info"

run_stage test_cuda 150 70 "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider \
  tests/test_cuda.py

# torch.compile with CUDA graphs (mode="reduce-overhead") over a capturable optimizer.
run_stage test_compile_cuda 60 60 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_compile.py -k reduce_overhead

if [[ -f tests/test_engine.py ]]; then  # the CPU engine's tests: optional, when time allows
  OPTIONAL=1 run_stage test_engine 60 60 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_engine.py
fi

if [[ -f bench/step.py ]]; then
  run_stage bench 120 0 "$PY" bench/step.py --device cuda
else
  say "bench"
  echo "bench/step.py not found" | tee "$LOG_DIR/bench.log"
  FAILED+=("bench(missing)")
fi

# compute-sanitizer memcheck on a few small CUDA tests, when the runtime allows it (on some
# virtualised machines it refuses the device: that is a note, not a failure). Without torch's
# caching allocator every tensor is its own allocation, so an access past a tensor's end is seen.
memcheck() {
  local out rc
  out=$(PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    -k "fill_normal_matches_cpu or sharded_offsets or (float32_matches_cpu and tensor) or bf16_matches or (device_hyper_matches and default)" 2>&1)
  rc=$?
  echo "$out" | tail -n 15
  if grep -qE "Device not supported|LibraryNotLoaded|Target application terminated before first instrumented API call" <<<"$out"; then
    echo "[memcheck: compute-sanitizer cannot instrument this machine; not counted]"
    return 0
  fi
  return $rc
}
if command -v compute-sanitizer >/dev/null; then
  export -f memcheck
  OPTIONAL=1 run_stage memcheck 60 0 bash -c memcheck
fi

say "summary"
{
  echo "elapsed: $((SECONDS - START)) s; logs in $LOG_DIR"
  if ((${#NOTES[@]})); then echo "notes: ${NOTES[*]}"; fi
  if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
  else
    echo "all stages passed"
  fi
} | tee "$LOG_DIR/summary.txt"
((${#FAILED[@]} == 0))
