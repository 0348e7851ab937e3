"""Checkpoints of a :class:`~thermo_ext.optim.Thermo`: validating a state dict before anything is
loaded, and the optional keys older checkpoints lack (docs/DESIGN.md, "Failure model": a rejected
call changes nothing)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from . import distributed as dist_glue
from .groups import GROUP_KEYS, check_group, param_label

__all__ = ["OPTIONAL_GROUP_KEYS", "with_optional_keys", "validate", "saved_momenta"]

#: Group keys added after the first release, with the value a checkpoint without them means.
OPTIONAL_GROUP_KEYS: Dict[str, Any] = dict(maximize=False, foreach=None, fused=None,
                                           differentiable=False)


def with_optional_keys(sd: Dict[str, Any]) -> Dict[str, Any]:
    """A shallow copy of a state dict whose groups have every optional key."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list):
        return sd  # validate() says what is wrong
    groups = [{**OPTIONAL_GROUP_KEYS, **g} if isinstance(g, dict) else g
              for g in sd["param_groups"]]
    return {**sd, "param_groups": groups}


def _check_step(where: str, step) -> None:
    if isinstance(step, torch.Tensor):
        ok = (step.numel() == 1 and not step.is_floating_point() and not step.is_complex()
              and step.dtype != torch.bool and 0 <= int(step) < 2**63)
    else:
        ok = isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**64
    if not ok:
        raise ValueError(f"{where}step: expected an int in [0, 2**64), got {step!r}")


def _check_xi(where: str, saved: Dict[str, Any], n_params: int) -> None:
    xi = saved["xi"]
    if xi is None:
        return
    n = 1 if saved["thermostat"] == "group" else n_params
    shape = (saved["chains"], n) if saved["chains"] else (n,)
    if not isinstance(xi, torch.Tensor) or not xi.is_floating_point() or tuple(xi.shape) != shape:
        raise ValueError(f"{where}xi: expected a floating tensor of shape {shape} for "
                         f"thermostat={saved['thermostat']!r}, got "
                         f"{getattr(xi, 'dtype', type(xi).__name__)} "
                         f"{tuple(getattr(xi, 'shape', ()))}")
    if not torch.isfinite(xi).all():
        raise ValueError(f"{where}xi: non-finite thermostat values")


def validate(param_groups, sd: Dict[str, Any]) -> None:
    """Everything load_state_dict relies on, checked before anything changes: the structure,
    every group's settings, step and ξ, and every momentum (shape, dtype, finite values)."""
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(
            sd.get("param_groups"), list):
        raise ValueError("state_dict: expected an optimizer state dict with 'state' (a dict) and "
                         "'param_groups' (a list)")
    groups = sd["param_groups"]
    if len(groups) != len(param_groups):
        raise ValueError(f"state_dict: {len(groups)} param groups, this optimizer has "
                         f"{len(param_groups)}")
    for gi, (saved, group) in enumerate(zip(groups, param_groups)):
        where = f"state_dict param group {gi}: "
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"{where}expected a dict with a 'params' list")
        missing = sorted(set(GROUP_KEYS) - set(saved))
        if missing:
            raise ValueError(f"{where}missing {missing}: not a thermo_ext optimizer's state")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where}{len(saved['params'])} parameters, this optimizer's group "
                             f"has {len(group['params'])}")
        try:
            scheme = check_group(saved, where)
        except TypeError as e:
            raise ValueError(str(e)) from None
        _check_step(where, saved["step"])
        _check_xi(where, saved, len(group["params"]))
        n_moms = 0
        for pos, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = sd["state"].get(pid, {})
            if not isinstance(entry, dict):
                raise ValueError(f"{where}{param_label(group, pos)}: expected a dict of state")
            m = entry.get("momentum_buffer")
            if m is None:
                continue
            n_moms += 1
            if (not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape)
                    or not (m.is_floating_point() or m.is_complex())
                    or m.is_complex() != p.is_complex()):
                raise ValueError(f"{where}{param_label(group, pos)}: momentum_buffer must be a "
                                 f"{'complex' if p.is_complex() else 'floating'} tensor of the "
                                 f"parameter's shape {tuple(p.shape)}, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)} "
                                 f"{tuple(getattr(m, 'shape', ()))}")
            if not torch.isfinite(dist_glue.local(m)).all():
                raise ValueError(f"{where}{param_label(group, pos)}: momentum_buffer has non-finite values")
        if (saved["xi"] is not None and int(saved["step"]) > 0 and scheme.uses_momentum
                and n_moms == 0 and len(group["params"])):
            raise ValueError(f"{where}a thermostatted group that has stepped but no momenta: the "
                             f"momenta are missing from the state dict")


def saved_momenta(param_groups, sd: Dict[str, Any]) -> Dict[torch.Tensor, torch.Tensor]:
    """parameter -> its saved momentum (the tensors of a validated state dict)."""
    out = {}
    for g_saved, group in zip(sd["param_groups"], param_groups):
        for pid, p in zip(g_saved["params"], group["params"]):
            m = sd["state"].get(pid, {}).get("momentum_buffer")
            if m is not None:
                out[p] = m
    return out
