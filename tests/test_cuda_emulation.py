"""The CUDA engine's tests on the CPU emulation of CUDA (tools/cuda_emu.sh): slow, so not in CI.

    pytest -m slow tests/test_cuda_emulation.py

Builds csrc/cuda/engine.cu translated to C++ into a throwaway directory and runs
tests/test_cuda.py against it (docs/CUDA_EMULATION.md). Needs g++ with C++20 and the build tools
that `pip install --no-build-isolation .` needs.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cuda_engine_on_the_cpu_emulation(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TE_EMU_DIR=str(tmp_path))
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "cuda_emu.sh")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "'emulated cuda': 0" not in run.stdout, tail
