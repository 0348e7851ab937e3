"""pytest plugin: runs tests/test_cuda.py against the CPU emulation of the CUDA engine.

Loaded by tools/cuda_emu.sh (``-p plugin``) with a thermo_ext built with
THERMO_EXT_CUDA_EMULATION=ON first on sys.path. "Device" tensors are CPU tensors created
through test_cuda's hooks (dut, dut_empty) and registered here; kernels sends a call to the
emulated CUDA engine exactly when its first tensor is registered, and to the CPU engine
otherwise, so every parity test compares the two engines on the same machine.
"""

import os
import sys

# An editable install (pip install -e .) puts a finder on sys.meta_path that imports the
# development build ahead of PYTHONPATH; the emulation build on PYTHONPATH must win here.
sys.meta_path[:] = [f for f in sys.meta_path
                    if not type(f).__module__.startswith("_editable_skbc_")]

import torch  # noqa: E402

torch.cuda.is_available = lambda: True  # test_cuda's skip condition
torch.cuda.is_current_stream_capturing = lambda: False

import thermo_ext  # noqa: E402
from thermo_ext import cuda_library, kernels  # noqa: E402

# The emulated engine is a library like the real one (libthermo_ext_cuda_emu.so beside the
# module): loaded through the same loader and C interface, chosen by THERMO_EXT_CUDA_LIB (also
# for the subprocesses the tests start).
_LIB = os.path.join(cuda_library.lib_dir(), "libthermo_ext_cuda_emu.so")
os.environ[cuda_library.ENV_LIB] = _LIB
if os.path.exists(_LIB):
    thermo_ext._C.cuda_load(_LIB)
if "emulated" not in thermo_ext._C.cuda_build_info():
    raise SystemExit(f"{thermo_ext.__file__} is not an emulation build "
                     f"(cuda_build_info: {thermo_ext._C.cuda_build_info()!r})")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import test_cuda  # noqa: E402

_KEEP = []          # registered tensors stay alive, so their addresses are not reused
_DEVICE = set()     # storage addresses of "device" tensors
CALLS = {"emulated cuda": 0, "cpu": 0}


def _register(t: torch.Tensor) -> torch.Tensor:
    _KEEP.append(t)
    _DEVICE.add(t.untyped_storage().data_ptr())
    return t


def _device_index(t: torch.Tensor) -> int:
    on_device = t.untyped_storage().data_ptr() in _DEVICE
    CALLS["emulated cuda" if on_device else "cpu"] += 1
    return 0 if on_device else -1


test_cuda.DEV = "cpu"
test_cuda.dut = lambda t: _register(t.detach().clone().contiguous())
test_cuda.dut_empty = lambda n, dtype: _register(torch.empty(n, dtype=dtype))
test_cuda.sync = lambda: None
kernels._device_index = _device_index
kernels._stream = lambda device: 0


def pytest_sessionfinish(session, exitstatus):
    print(f"\nengine calls: {CALLS}")
    if exitstatus == 0 and CALLS["emulated cuda"] == 0:
        print("error: no call reached the emulated CUDA engine")
        session.exitstatus = 1
