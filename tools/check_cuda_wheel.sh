#!/usr/bin/env bash
# Checks the CUDA wheel on a machine without a GPU (not CI: the build takes ~20 min on 2 cores).
#
#   tools/check_cuda_wheel.sh            # builds dist/wheelhouse first (tools/build_wheel.sh)
#   WHEELHOUSE=dist/wheelhouse tools/check_cuda_wheel.sh   # checks what is there
#
# 1. the architectures in each CUDA library (cuobjdump --list-elf / --list-ptx; cuobjdump from
#    the toolkit, else from PyPI's nvidia-cuda-cuobjdump in a tools environment);
# 2. the shared-library dependencies of _C and of each library: no libcudart, no libcuda (the
#    runtime is linked statically; the driver is opened by it only at the first CUDA call);
# 3. the wheel for this Python installed beside a CUDA build of torch (TORCH_CUDA_SPEC, default
#    torch==2.14.1, from local disk) in a fresh environment: import, CPU steps (no CUDA code
#    loaded), build_info(), the run-time choice of library (torch's CUDA major; the environment's
#    overrides; never across majors) and, with no GPU here, the verdict and the fallback
#    (CUDA_VENV=/path reuses an environment that has that torch);
# 4. the loader, the C interface and the driver floor through the CUDA emulation
#    (tools/cuda_emu.sh, a source build of the emulated library: a few parity tests through the
#    loader, and a pretend CUDA 12.8 driver against the CUDA 13 runtime refused, with the fix,
#    by the library and by the run-time verdict); EMU=0 skips it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
TOOLPY=${TOOLPY:-$PY}
if [[ -z "${WHEELHOUSE:-}" ]]; then
  tools/build_wheel.sh
  WHEELHOUSE=dist/wheelhouse
fi
WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
T=$(mktemp -d /tmp/te-cuda-check.XXXXXX)
trap 'rm -rf "$T"' EXIT
FAILED=()
say() { printf '\n=== %s\n' "$*"; }

say "1. architectures of each CUDA library"
CUOBJDUMP=$(command -v cuobjdump || true)
if [[ -z "$CUOBJDUMP" ]]; then
  "$TOOLPY" -m venv "$T/tools" && "$T/tools/bin/pip" install -q "nvidia-cuda-cuobjdump>=13"
  CUOBJDUMP=$(find "$T/tools" -name cuobjdump -type f | head -n 1)
fi
mkdir -p "$T/whl"
for whl in "$WHEELHOUSE"/*.whl; do
  d="$T/whl/$(basename "$whl" .whl)"
  mkdir -p "$d" && (cd "$d" && "$TOOLPY" -m zipfile -e "$whl" .)
done
first=$(ls -d "$T"/whl/*/ | head -n 1)
for lib in "$first"thermo_ext/lib/libthermo_ext_cuda*.so; do
  [[ -f "$lib" ]] || { echo "no CUDA library in $(basename "$first")"; FAILED+=(no-lib); break; }
  sass=$("$CUOBJDUMP" --list-elf "$lib" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/p' | sort -uV |
    tr '\n' ' ')
  ptx=$("$CUOBJDUMP" --list-ptx "$lib" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/p' | sort -uV |
    tr '\n' ' ')
  echo "$(basename "$lib"): SASS $sass| PTX $ptx"
  for w in "$T"/whl/*/; do  # the same file in every Python's wheel
    cmp -s "$lib" "$w/thermo_ext/lib/$(basename "$lib")" ||
      { echo "  differs in $(basename "$w")"; FAILED+=(lib-differs); }
  done
done

say "2. shared-library dependencies"
for w in "$T"/whl/*/; do
  for so in "$w"thermo_ext/*.so "$w"thermo_ext/lib/*.so; do
    needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
    echo "$(basename "$w")/$(basename "$so"): $needed"
    if grep -qE "libcudart|libcuda\.so|libnvrtc" <<<"$needed"; then
      echo "  ^ needs a CUDA library to load"; FAILED+=(deps)
    fi
  done
done

say "3. install beside ${TORCH_CUDA_SPEC:=torch==2.14.1} (CUDA build), no GPU here"
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEEL=$(ls "$WHEELHOUSE"/thermo_ext-*-"$tag"-*.whl | head -n 1)
VENV=${CUDA_VENV:-$T/venv}  # CUDA_VENV: reuse an environment that has the CUDA torch already
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_CUDA_SPEC" numpy
"$VENV/bin/pip" install -q --no-index --only-binary=:all: --no-deps --force-reinstall "$WHEEL"
cp tools/wheel_smoke.py "$T/"
cd "$T"
major=$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda.split(".")[0])')
"$VENV/bin/python" wheel_smoke.py --expect-cuda-lib "$major" || FAILED+=(smoke)
"$VENV/bin/python" - <<'PY' || FAILED+=(choice)
import os, warnings, subprocess, sys
import torch, thermo_ext as te
from thermo_ext import cuda_library, fallback
from types import SimpleNamespace
info, choice, err = cuda_library.load()
print("loaded:", info, "|", choice.why, "|", err or "no load error")
assert info and not err and te._C.cuda_compiled()
assert info["runtime"] // 1000 == int(torch.version.cuda.split(".")[0])
v = cuda_library.verdict(0)
print("verdict on cuda:0:", v.usable, "|", v.reason, "|", v.fix)
assert not v.usable and "no NVIDIA driver" in v.reason  # no GPU, no driver here
call = SimpleNamespace(params=[SimpleNamespace(device=torch.device("cuda", 0))])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert fallback.choose(None, [call], True) is fallback.FALLBACK
    assert fallback.choose("engine", [call], True).name == "engine"
print("fallback warning:", w[0].message)
try:
    cuda_library.require(0)
    raise SystemExit("require() did not raise")
except RuntimeError as e:
    print("backend='engine' raises:", e)
print("build_info:", {k: v for k, v in te.build_info().items() if k.startswith("cuda")})
for env, want in ((dict(THERMO_EXT_CUDA_VERSION="12"), "no engine library built for CUDA 12"),
                  (dict(THERMO_EXT_CUDA_VERSION="13"), "the library built for CUDA 13")):
    out = subprocess.run([sys.executable, "-c", "import thermo_ext as te; "
                          "print(te.cuda_library.choose().why)"], capture_output=True,
                         text=True, env=dict(os.environ, **env), check=True).stdout.strip()
    print(env, "->", out)
    assert want in out, out
subprocess.run([sys.executable, "-m", "thermo_ext", "info"], check=True)
print("run-time choice checks passed")
PY
cd "$ROOT"

if [[ "${EMU:-1}" == 1 ]]; then
  say "4. the driver floor through the CUDA emulation (tools/cuda_emu.sh)"
  PYTHON="$TOOLPY" tools/cuda_emu.sh tests/test_cuda.py \
    -k "driver or build_info or versions or (float32_matches_cpu and adl) or optimizer_matches" \
    || FAILED+=(emulation)
fi

say "summary"
if ((${#FAILED[@]})); then echo "FAILED: ${FAILED[*]}"; exit 1; fi
echo "all checks passed"
