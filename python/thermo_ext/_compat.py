"""The private torch internals thermo_ext relies on, in one place.

Each is imported here and nowhere else. If a torch release moves or renames one, importing
thermo_ext fails at once with a message naming it, instead of a feature silently doing nothing.
"""

from __future__ import annotations

import torch

__all__ = ["GLOBAL_STEP_PRE_HOOKS", "GLOBAL_STEP_POST_HOOKS", "DTensor",
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

# torch.distributed may be absent from a build (e.g. some mobile/ARM wheels): then there are no
# DTensors and nothing below is needed.
DTensor = None
compute_local_shape_and_global_offset = None
if torch.distributed.is_available():
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as e:  # pragma: no cover - depends on the torch release
        raise _missing("torch.distributed.tensor.DTensor and "
                       "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
                       "the global offsets of FSDP2 shards") from e

import torch.autograd.profiler as _profiler  # noqa: E402

if not isinstance(getattr(_profiler, "_is_profiler_enabled", None), bool):
    raise _missing("torch.autograd.profiler._is_profiler_enabled",
                   "opening the step's profiler label only while profiling")  # pragma: no cover


def profiler_enabled() -> bool:
    """Whether torch's profiler is running (torch's own optimizers read the same flag)."""
    return _profiler._is_profiler_enabled


#: Sets grad mode without a context manager's cost (torch.no_grad's own primitive).
set_grad_enabled = torch._C._set_grad_enabled

