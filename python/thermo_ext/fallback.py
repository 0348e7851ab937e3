"""A CUDA step that always works (docs/DESIGN.md, "The CUDA engine library").

With the default backend (``backend=None``), a step whose tensors are on a CUDA device where no
fused engine can run — none built for torch's CUDA major, a driver below the library's floor, an
architecture with neither SASS nor PTX in it (:func:`thermo_ext.cuda_library.verdict`) — runs
the same letters with torch ops on the device: :mod:`thermo_ext.reference`'s step, drawing the
same noise stream with torch ops (:mod:`thermo_ext.torch_noise`: the Philox words exactly, the
normals within 4 ulps, or bit for bit with ``THERMO_EXT_FALLBACK_NOISE=exact``). It warns once per reason with :class:`EngineFallbackWarning`, naming the
reason, the expected cost and the fix. ``backend="engine"`` raises instead; ``"reference"``
chooses the torch ops without a warning.

:func:`choose` is the optimizer's one integration point: it returns the backend a step runs.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional, Sequence

import torch

from . import cuda_library, torch_noise
from .backends import BACKENDS, ReferenceBackend

__all__ = ["EngineFallbackWarning", "FallbackBackend", "FALLBACK", "choose", "COST"]

#: What the warning says a fallback step costs, measured on the CPU (where both run) by
#: bench/fallback.py: the torch-op step's time over the fused engine's (docs/BENCHMARKS.md).
COST = ("about 45-90x the fused engine's step time (measured on the CPU as a proxy, "
        "bench/fallback.py; not yet measured on a GPU)")


class EngineFallbackWarning(UserWarning):
    """CUDA tensors are stepped by torch ops because no fused engine can run on their device."""


class FallbackBackend(ReferenceBackend):
    """The reference's letters with torch-op noise: what CUDA tensors step with where no fused
    engine can run (also usable on the CPU, where the tests compare it with the reference)."""

    name = "fallback"

    @staticmethod
    def plan(item, stochastic_rounding: bool, sum_hook):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "step() is being captured into a CUDA graph, but no fused CUDA engine can run "
                "here and the torch-op fallback reads its step counter on the host; "
                "thermo_ext.build_info()['cuda_fallback'] says why the engine cannot run")
        return ReferenceBackend.plan(item, stochastic_rounding, sum_hook)

    @staticmethod
    def run(plans, modes, check: bool, flag: Optional[torch.Tensor]):
        with torch_noise.native():
            # Every noise letter's normals of the small tensors in one batch (torch_noise.
            # prefetch): the reference draws tensor by tensor, a few hundred kernels each.
            torch_noise.prefetch(FallbackBackend._draws(plans), torch_noise.exact_mode())
            try:
                return ReferenceBackend.run(plans, modes, check, flag)
            finally:
                torch_noise.clear()

    @staticmethod
    def _draws(plans):
        """The (n, seed, uid, step, draw, offset, device) of every normal the plans will draw
        (reference.thermo_step: one per noise letter and tensor; tensors made of runs draw on
        their own)."""
        for plan in plans:
            kw = plan.kwargs
            letters = [x for x in kw["scheme"].program(kw["first"]) if x.draw is not None]
            offsets = kw["offsets"] or [0] * len(kw["params"])
            runs = kw["runs"] or [None] * len(kw["params"])
            for x in letters:
                for p, uid, off, r in zip(kw["params"], kw["uids"], offsets, runs):
                    if r is None or r[0] >= p.numel():
                        yield (p.numel(), kw["seed"], uid, kw["step"], x.draw, off, p.device)


FALLBACK = FallbackBackend()

_warned = set()
_warn_lock = threading.Lock()


def _warn_once(device: str, v: "cuda_library.Verdict") -> None:
    with _warn_lock:
        if v.reason in _warned:
            return
        _warned.add(v.reason)
    warnings.warn(
        f"thermo_ext: CUDA tensors on {device} are stepped by the torch-op fallback, not the "
        f"fused CUDA engine, because {v.reason}. Expect each step to cost {COST}; the results "
        f"are the engine's up to float rounding (the same letters and noise stream). {v.fix}. "
        f"backend='engine' raises instead of falling back; backend='reference' picks the torch "
        f"ops without this warning.", EngineFallbackWarning, stacklevel=4)


def choose(requested: Optional[str], calls: Sequence, on_device: bool):
    """The backend of a step: the one asked for (``"engine"``, ``"reference"``), or by default
    the engine unless one of the calls is on a CUDA device where it cannot run (then the
    torch-op fallback for the whole step, with one warning per reason)."""
    if requested is not None:
        return BACKENDS[requested]
    if on_device:
        for c in calls:
            dev = c.params[0].device
            if dev.type != "cuda":
                continue
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            v = cuda_library.verdict(index)
            if not v.usable:
                _warn_once(f"cuda:{index}", v)
                return FALLBACK
    return BACKENDS["engine"]
