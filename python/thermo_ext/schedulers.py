"""Temperature schedules for thermo_ext optimizers (the τ counterpart of torch's LambdaLR)."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch.optim import Optimizer

from .optim import Thermo

__all__ = ["TemperatureScheduler"]


class TemperatureScheduler:
    """Scales each group's τ from its initial value: τ = τ₀ · factor(step), like LambdaLR.

    ``factor`` is a function of the scheduler's step count, or a list of them, one per group.
    Call ``step()`` after ``optimizer.step()``. A tensor τ is changed in place (so a capturable
    group's CUDA graph follows it).
    """

    def __init__(self, optimizer: Optimizer, factor, last_step: int = -1):
        if not isinstance(optimizer, Thermo):
            what = ("a torch optimizer without a temperature" if isinstance(optimizer, Optimizer)
                    else "not an optimizer")
            raise TypeError(f"optimizer: expected a thermo_ext optimizer (te.Thermo or a named "
                            f"method such as te.AdLaLa), got {type(optimizer).__name__} "
                            f"({what}); TemperatureScheduler scales each group's tau")
        n = len(optimizer.param_groups)
        factors = list(factor) if isinstance(factor, (list, tuple)) else [factor] * n
        if len(factors) != n or not all(callable(f) for f in factors):
            raise ValueError(f"factor: expected a callable or {n} callables (one per group)")
        self.optimizer = optimizer
        self.factors = factors
        for group in optimizer.param_groups:
            tau = group["tau"]
            group.setdefault("initial_tau", float(tau) if isinstance(tau, torch.Tensor) else tau)
        self.last_step = last_step
        self.step()

    def step(self) -> None:
        step = self.last_step + 1
        values = [float(f(step)) for f in self.factors]
        for v in values:  # all checked before any group changes
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"factor({step}) = {v}: expected a finite number >= 0")
        self.last_step = step
        for group, v in zip(self.optimizer.param_groups, values):
            tau = group["initial_tau"] * v
            if isinstance(group["tau"], torch.Tensor):
                # In place, as torch's LR schedulers change a tensor lr: a capturable group's
                # CUDA graph reads this tensor at every replay.
                group["tau"].fill_(tau)
            else:
                group["tau"] = tau

    def get_last_tau(self) -> List[float]:
        return [g["tau"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = state["last_step"]
