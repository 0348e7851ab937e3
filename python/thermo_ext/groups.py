"""Param groups of a :class:`~thermo_ext.optim.Thermo`: their keys, their validation, and their
hyperparameters as numbers (docs/DESIGN.md, "The optimizer")."""

from __future__ import annotations

import math
import operator
from typing import Any, Dict

import torch

from . import _C, kernels
from .kernels import Hyper
from .naming import param_label, where
from .schemes import FoldedScheme, fold

__all__ = ["THERMOSTATS", "MOMENTUM_INITS", "MASSES", "GROUP_KEYS", "HYPER_KEYS", "STRUCTURE_KEYS",
           "MAX_GROUPS", "uid", "where", "param_label", "check_group", "check_torch_keywords",
           "hyper_values", "raw_hyper", "raw_structure"]

THERMOSTATS = ("tensor", "group", "chain")
MOMENTUM_INITS = ("zero", "thermal", "terminal")
MASSES = ("unit", "adaptive")
#: The hyperparameters that only change a step's coefficients (a scheduler may change them):
#: the fields of :class:`~thermo_ext.kernels.Hyper`, read from the engine.
HYPER_KEYS = Hyper._fields
#: The settings that shape a group's calls and buffers.
STRUCTURE_KEYS = ("scheme", "xi0", "thermostat", "momentum_init", "seed", "capturable", "chains",
                  "mass")
#: Keys every saved group of a thermo_ext optimizer has (``maximize`` and torch's keys
#: ``foreach``/``fused``/``differentiable`` are optional: older checkpoints lack them).
GROUP_KEYS = tuple(k for k in HYPER_KEYS + STRUCTURE_KEYS if k != "maximize") + ("step", "xi")
MAX_GROUPS = _C.UID_LIMIT  # groups, and tensors per group, the noise counter's uid can name

uid = kernels.uid  # the noise counter's tensor id of (group, position): docs/DESIGN.md, Noise

#: A group's hyperparameter and structural values as stored (objects, compared by identity on
#: the hot path: what a user or scheduler did not touch is the same object).
raw_hyper = operator.itemgetter(*HYPER_KEYS)
raw_structure = operator.itemgetter(*STRUCTURE_KEYS)


def _hyper_value(where: str, key: str, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:  # torch.optim's type and words
            raise ValueError(f"{where}Tensor {key} must be 1-element")
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{where}{key}: expected a real number, got a {v.dtype} tensor")
        return float(v)
    return v


def hyper_values(where: str, group: Dict[str, Any]) -> Hyper:
    """The group's hyperparameters as numbers (a 1-element tensor read on the host;
    ``mass_freeze`` None stays None: never frozen)."""
    return Hyper(*(_hyper_value(where, k, group[k]) for k in HYPER_KEYS))


def check_group(group: Dict[str, Any], where: str) -> FoldedScheme:
    """Validates a merged param group; returns its folded scheme."""
    try:
        scheme = fold(group["scheme"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}{e}") from None
    hyper = hyper_values(where, group)
    kernels.check_hyper(where, **{k: getattr(hyper, k) for k in kernels.HYPER_FIELDS
                                  if not (k == "mass_freeze" and hyper.mass_freeze is None)})
    if not isinstance(hyper.maximize, bool):
        raise TypeError(f"{where}maximize: expected a bool, got {hyper.maximize!r}")
    if group["mass"] not in MASSES:
        raise ValueError(f"{where}mass: expected one of {MASSES}, got {group['mass']!r}")
    if not hyper.mass_beta < 1:
        raise ValueError(f"{where}mass_beta: expected a number in [0, 1), got "
                         f"{hyper.mass_beta!r}")
    if not hyper.mass_eps > 0:
        raise ValueError(f"{where}mass_eps: expected a finite number > 0, got {hyper.mass_eps!r}")
    freeze = group["mass_freeze"]
    if freeze is not None and (isinstance(freeze, bool) or not isinstance(freeze, int)
                               or freeze < 1):
        raise ValueError(f"{where}mass_freeze: expected None (the mass adapts at every step) or "
                         f"an int >= 1 (the steps after which it is held), got {freeze!r}")
    xi0 = group["xi0"]
    if isinstance(xi0, bool) or not isinstance(xi0, (int, float)) or not math.isfinite(xi0):
        raise ValueError(f"{where}xi0: expected a finite real number, got {xi0!r}")
    if group["thermostat"] not in THERMOSTATS:
        raise ValueError(f"{where}thermostat: expected one of {THERMOSTATS}, got "
                         f"{group['thermostat']!r}")
    chains = group["chains"]
    if isinstance(chains, bool) or not isinstance(chains, int) or not 0 <= chains < 2**31:
        raise ValueError(f"{where}chains: expected an int >= 0 (0: parameters are not stacked "
                         f"chains), got {chains!r}")
    if group["thermostat"] == "chain" and not chains:
        raise ValueError(f"{where}thermostat='chain' needs stacked chains (chains=K > 0)")
    if group["momentum_init"] not in MOMENTUM_INITS:
        raise ValueError(f"{where}momentum_init: expected one of {MOMENTUM_INITS}, got "
                         f"{group['momentum_init']!r}")
    if (group["momentum_init"] == "terminal" and scheme.uses_momentum
            and scheme.terminal(1.0, hyper.gamma, xi0) is None):
        raise ValueError(f"{where}momentum_init='terminal' needs a friction on the momentum (O "
                         f"with gamma > 0, or a thermostat's C with xi0 > 0); scheme "
                         f"{scheme.written} with gamma={hyper.gamma!r}, xi0={xi0!r} has none: "
                         f"use 'zero'")
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"{where}capturable: expected a bool, got {group['capturable']!r}")
    kernels.check_int(f"{where}seed", group["seed"], 0, kernels.U64)
    return scheme


def check_options(backend, backends, flags: Dict[str, Any]) -> None:
    """The optimizer-wide options: ``backend`` one of ``backends`` (or None), the flags bools."""
    if backend is not None and backend not in backends:
        raise ValueError(f"backend: expected None or one of {tuple(backends)}, got {backend!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")


def check_torch_keywords(foreach, fused, differentiable) -> None:
    """torch.optim's implementation keywords, with what they can honestly mean here: the engine
    is a fused multi-tensor kernel, and a step is not differentiable."""
    if foreach not in (None, False):
        raise ValueError(f"foreach: expected None or False, got {foreach!r}: thermo_ext's step is "
                         f"a fused kernel over all of a group's tensors, which is what "
                         f"foreach=True asks of torch's optimizers (leave it None)")
    if fused not in (None, True):
        raise ValueError(f"fused: expected None or True (the engine is fused), got {fused!r}; "
                         f"for the unfused plain-torch implementation pass backend='reference'")
    if differentiable is not False:
        raise ValueError(f"differentiable: expected False, got {differentiable!r}: a thermo_ext "
                         f"step draws noise and updates in place, it cannot be differentiated "
                         f"through")
