"""What a result was measured on: the cores this process may use, CPU model and versions."""

from __future__ import annotations

import os
import platform
from typing import Any, Dict

import torch

__all__ = ["available_cores", "machine_info"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which a container or ``taskset`` may
    make smaller than the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, versions: what a result was measured on."""
    from .. import build_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": available_cores(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "thermo_ext": build_info()}
