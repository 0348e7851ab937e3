"""Which CUDA engine library steps CUDA tensors, chosen and loaded at the first CUDA step
(docs/DESIGN.md, "The CUDA engine library").

The CUDA engine is not linked into ``thermo_ext._C``: it is a library of its own,
``thermo_ext/lib/libthermo_ext_cuda<major>.so``, one per CUDA major version (the wheel carries
CUDA 13's; a CUDA 12 one built with a CUDA 12 toolkit may sit beside it). Importing thermo_ext
and stepping CPU tensors loads none of it. The first CUDA step (or :func:`require`):

1. chooses the library built for torch's CUDA major (``torch.version.cuda``), as bitsandbytes
   does: the same major, never one of another major (its statically linked CUDA runtime needs a
   driver of its own major, which a driver that runs torch may not be). ``THERMO_EXT_CUDA_LIB``
   (a file) or ``THERMO_EXT_CUDA_VERSION`` (a major, e.g. ``12``) override the choice;
2. loads it, refusing a library built from other engine sources (``_C.cuda_load``);
3. checks the driver against the library's floor (the CUDA version its runtime needs) and that
   the library has an image for the device's architecture (SASS, or PTX the driver compiles).

Where any of this fails, :func:`verdict` says why and what fixes it; the optimizer then steps
the device's tensors with the torch-op fallback (:mod:`thermo_ext.fallback`), unless
``backend="engine"`` was asked for, which raises.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import Dict, Optional

import torch

from . import _C

__all__ = ["ENV_LIB", "ENV_VERSION", "Choice", "Verdict", "lib_dir", "available", "choose",
           "load", "verdict", "require", "info"]

ENV_LIB = "THERMO_EXT_CUDA_LIB"          # a library file: wins over everything
ENV_VERSION = "THERMO_EXT_CUDA_VERSION"  # a CUDA major (12, or 12.8): instead of torch's
_NAME = re.compile(r"^libthermo_ext_cuda(\d+)\.so$")


def lib_dir() -> str:
    """Where the installed libraries are: ``lib/`` beside the compiled module."""
    return os.path.join(os.path.dirname(os.path.abspath(_C.__file__)), "lib")


def available() -> Dict[int, str]:
    """The installed engine libraries, by CUDA major."""
    d = lib_dir()
    try:
        names = os.listdir(d)
    except OSError:
        return {}
    out = {int(m.group(1)): os.path.join(d, n) for n in names if (m := _NAME.match(n))}
    return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Choice:
    path: Optional[str]   # the library to load; None: there is none to load
    why: str              # one sentence: why this library, or why none
    major: Optional[int]  # the CUDA major wanted (None: an explicit file, or torch has no CUDA)


def choose() -> Choice:
    """The library the rule picks for this process, without loading anything."""
    env = os.environ.get(ENV_LIB, "").strip()
    if env:
        if not os.path.isfile(env):
            return Choice(None, f"{ENV_LIB}={env} names no file", None)
        return Choice(env, f"{ENV_LIB}={env}", None)
    libs = available()
    have = ", ".join(f"CUDA {m}" for m in libs) or "none"
    override = os.environ.get(ENV_VERSION, "").strip()
    if override:
        m = re.fullmatch(r"(\d+)(?:\.\d+)?", override)
        if not m:
            return Choice(None, f"{ENV_VERSION}={override} is not a CUDA version (expected a "
                                f"major such as 12, or 12.8)", None)
        major, source = int(m.group(1)), f"{ENV_VERSION}={override}"
    else:
        tc = torch.version.cuda
        if not tc:
            return Choice(None, f"this torch ({torch.__version__}) is built without CUDA", None)
        major, source = int(tc.split(".")[0]), f"torch {torch.__version__} uses CUDA {tc}"
    path = libs.get(major)
    if path is not None:
        return Choice(path, f"{source}: the library built for CUDA {major}", major)
    return Choice(None, f"{source}, and this installation has no engine library built for "
                        f"CUDA {major} (it has: {have}; a library is never used across CUDA "
                        f"major versions)", major)


@dataclasses.dataclass(frozen=True)
class Verdict:
    usable: bool
    reason: str             # why the engine cannot run (empty when it can)
    fix: str                # what makes it run
    why: str                # why this library was chosen (Choice.why)
    library: Optional[dict]  # _C.cuda_library() of the loaded library
    driver: int = 0         # the driver's CUDA version (1000 * major + 10 * minor; 0: none)

    def message(self, device: str) -> str:
        return (f"thermo_ext: the fused CUDA engine cannot run on {device}: {self.reason}. "
                f"{self.fix}")


_lock = threading.Lock()
_loaded: Optional[tuple] = None          # (library info or None, choice, load error)
_verdicts: Dict[int, Verdict] = {}


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _fix_for_major(major: Optional[int]) -> str:
    return (f"Fix: install a thermo_ext whose wheel carries a library for CUDA {major}, or build "
            f"one from source with a CUDA {major} toolkit (THERMO_EXT_CUDA_HOME=/path/to/cuda-"
            f"{major}.x pip install --no-build-isolation thermo_ext; docs/DESIGN.md, \"The CUDA "
            f"engine library\"), or a torch built for a CUDA major this installation has "
            f"({', '.join(map(str, available())) or 'none'})" if major is not None else
            "Fix: install a torch built with CUDA (the CUDA engine runs beside it)")


def load() -> tuple:
    """Chooses and loads the library once per process; returns (info or None, Choice, error)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        loaded = _C.cuda_library()
        choice = choose()
        if loaded is not None:  # loaded by hand (_C.cuda_load): that one is used
            _loaded = (loaded, Choice(loaded["path"], "loaded by _C.cuda_load", choice.major),
                       "")
        elif choice.path is None:
            _loaded = (None, choice, "")
        else:
            try:
                _loaded = (_C.cuda_load(choice.path), choice, "")
            except RuntimeError as e:
                _loaded = (None, choice, str(e))
        return _loaded


def verdict(device: int) -> Verdict:
    """Whether the fused engine can step tensors on CUDA device ``device``, and if not why and
    what to do (cached per device; the first call loads the library)."""
    v = _verdicts.get(device)
    if v is not None:
        return v
    info, choice, error = load()
    if info is None:
        if error:
            v = Verdict(False, error, "Fix: reinstall thermo_ext (its library and module come "
                                      "from one build)", choice.why, None)
        else:
            v = Verdict(False, choice.why, _fix_for_major(choice.major), choice.why, None)
    else:
        driver, runtime = _C.cuda_versions()
        archs = info["archs"]
        if driver == 0:
            v = Verdict(False, "no NVIDIA driver was found", "Fix: install the NVIDIA driver",
                        choice.why, info)
        elif driver // 1000 < runtime // 1000:
            v = Verdict(False, f"the NVIDIA driver supports CUDA {_version(driver)}, below the "
                               f"floor of {os.path.basename(info['path'])} (CUDA "
                               f"{_version(runtime)}: a driver >= {info['min_driver']})",
                        f"Fix: update the NVIDIA driver to >= {info['min_driver']}, or use a "
                        f"torch and thermo_ext library of CUDA {driver // 1000} (a library for "
                        f"it is built with that toolkit: THERMO_EXT_CUDA_HOME, docs/DESIGN.md, "
                        f"\"The CUDA engine library\")", choice.why, info, driver)
        else:
            try:
                _C.cuda_probe(device)
                v = Verdict(True, "", "", choice.why, info, driver)
            except RuntimeError as e:
                try:
                    major, minor = torch.cuda.get_device_capability(device)
                    name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
                    arch = f"{major}.{minor}"
                except Exception:  # noqa: BLE001 (a message only)
                    name, arch = "this GPU", "<its compute capability, e.g. 8.6>"
                v = Verdict(False, f"{os.path.basename(info['path'])} has no kernel image for "
                                   f"{name}: it carries {archs} ({e})",
                            f"Fix: build the library for this GPU: THERMO_EXT_CUDA_ARCHS={arch} "
                            f"tools/build_cuda_lib.sh (docs/DESIGN.md, \"The CUDA engine "
                            f"library\"), or pip install --no-build-isolation . beside this torch",
                            choice.why, info, driver)
    _verdicts[device] = v
    return v


def require(device: int) -> None:
    """Raises RuntimeError saying why and what to do when the fused engine cannot run on
    ``device``; what an explicit ``backend="engine"`` (and kernels.py) does."""
    v = verdict(device)
    if not v.usable:
        raise RuntimeError(v.message(f"cuda:{device}"))


def info() -> dict:
    """What build_info() reports of the CUDA library (nothing is loaded here)."""
    choice = choose()
    loaded = _C.cuda_library()
    out = {
        "cuda_libraries": [os.path.basename(p) for p in available().values()],
        "cuda_library": loaded["path"] if loaded else None,
        "cuda_library_why": (_loaded[1].why if _loaded is not None else choice.why)
        if loaded else choice.why + ("" if choice.path is None else
                                     " (not loaded yet: it loads at the first CUDA step)"),
    }
    unusable = [f"cuda:{d}: {v.reason}" for d, v in sorted(_verdicts.items()) if not v.usable]
    if _loaded is not None and _loaded[2]:
        unusable.insert(0, _loaded[2])
    out["cuda_fallback"] = "; ".join(unusable) or None
    return out


def _reset_for_tests() -> None:
    """Forgets the cached choice and verdicts (a loaded library stays loaded)."""
    global _loaded
    with _lock:
        _loaded = None
        _verdicts.clear()
