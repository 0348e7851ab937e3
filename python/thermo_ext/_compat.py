"""The private torch internals thermo_ext relies on, in one place.

Each is imported here and nowhere else. If a torch release moves or renames one, importing
thermo_ext fails at once with a message naming it, instead of a feature silently doing nothing.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

__all__ = ["GLOBAL_STEP_PRE_HOOKS", "GLOBAL_STEP_POST_HOOKS", "dtensor_type",
           "compute_local_shape_and_global_offset", "profiler_enabled", "set_grad_enabled"]


def _missing(what: str, why: str) -> ImportError:
    return ImportError(f"thermo_ext needs {what} ({why}); torch {torch.__version__} does not "
                       f"provide it. Please report this with your torch version.")


try:  # the registries of register_optimizer_step_pre_hook / _post_hook, which Thermo.step runs
    from torch.optim.optimizer import _global_optimizer_post_hooks as GLOBAL_STEP_POST_HOOKS
    from torch.optim.optimizer import _global_optimizer_pre_hooks as GLOBAL_STEP_PRE_HOOKS
except ImportError as e:  # pragma: no cover - depends on the torch release
    raise _missing("torch.optim.optimizer._global_optimizer_pre_hooks/_post_hooks",
                   "global step hooks run by Thermo.step") from e

if not (isinstance(GLOBAL_STEP_PRE_HOOKS, dict) and isinstance(GLOBAL_STEP_POST_HOOKS, dict)):
    raise _missing("the global optimizer hook registries as dicts",
                   "global step hooks run by Thermo.step")  # pragma: no cover

# DTensor (FSDP2 shards). torch.distributed.tensor is not imported here: importing it costs most
# of a second (sympy, the sharding rules), which would double what `import thermo_ext` costs, and
# no DTensor can exist before the program has imported it. So DTensor is looked up in
# sys.modules when asked for; that the module exists is checked now, what it must provide at
# first use. torch.distributed may be absent from a build (some mobile/ARM wheels): then there
# are no DTensors.
_DTENSOR = "torch.distributed.tensor"
_HAVE_DISTRIBUTED = torch.distributed.is_available()
if _HAVE_DISTRIBUTED and importlib.util.find_spec(_DTENSOR) is None:  # pragma: no cover
    raise _missing(_DTENSOR, "FSDP2's DTensor parameters")


def dtensor_type():
    """torch's DTensor class once the program has imported torch.distributed.tensor, else None
    (then no tensor is a DTensor)."""
    module = sys.modules.get(_DTENSOR) if _HAVE_DISTRIBUTED else None
    if module is None:
        return None
    try:
        return module.DTensor
    except AttributeError as e:  # pragma: no cover - depends on the torch release
        raise _missing(f"{_DTENSOR}.DTensor", "FSDP2's DTensor parameters") from e


def compute_local_shape_and_global_offset(shape, mesh, placements):
    """torch.distributed.tensor._utils' function of that name (a DTensor shard's global
    offset; called only for DTensors, so its module is imported by then)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as f
    except ImportError as e:  # pragma: no cover - depends on the torch release
        raise _missing(f"{_DTENSOR}._utils.compute_local_shape_and_global_offset",
                       "the global offsets of FSDP2 shards") from e
    return f(shape, mesh, placements)

import torch.autograd.profiler as _profiler  # noqa: E402

if not isinstance(getattr(_profiler, "_is_profiler_enabled", None), bool):
    raise _missing("torch.autograd.profiler._is_profiler_enabled",
                   "opening the step's profiler label only while profiling")  # pragma: no cover


def profiler_enabled() -> bool:
    """Whether torch's profiler is running (torch's own optimizers read the same flag)."""
    return _profiler._is_profiler_enabled


#: Sets grad mode without a context manager's cost (torch.no_grad's own primitive).
set_grad_enabled = torch._C._set_grad_enabled

