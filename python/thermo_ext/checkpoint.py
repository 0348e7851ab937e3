"""Checkpoints of a :class:`~thermo_ext.optim.Thermo`: loading a state dict (:func:`load`), after
validating all of it, and the optional keys older checkpoints lack (docs/DESIGN.md, "Failure
model": a rejected call changes nothing)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch.optim import Optimizer

from . import distributed as dist_glue
from .calls import momentum_dtype
from .groups import GROUP_KEYS, check_group, param_label

__all__ = ["OPTIONAL_GROUP_KEYS", "STATE_TENSORS", "with_optional_keys", "validate",
           "saved_momenta", "load"]

#: Group keys added after the first release, with the value a checkpoint without them means.
OPTIONAL_GROUP_KEYS: Dict[str, Any] = dict(maximize=False, foreach=None, fused=None,
                                           differentiable=False, mass="unit", mass_beta=0.999,
                                           mass_eps=1e-8, mass_freeze=None)


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
            label = f"{where}{param_label(group, pos)}"
            _check_buffer(label, "exp_avg_sq", entry.get("exp_avg_sq"), p, nonnegative=True)
            start = entry.get("mass_start", 0)
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"{label}: mass_start must be an int >= 0 (the step of the "
                                 f"second moment's first gradient), got {start!r}")
            m = entry.get("momentum_buffer")
            if m is None:
                continue
            n_moms += 1
            _check_buffer(label, "momentum_buffer", m, p)
        if (saved["xi"] is not None and int(saved["step"]) > 0 and scheme.uses_momentum
                and n_moms == 0 and len(group["params"])):
            raise ValueError(f"{where}a thermostatted group that has stepped but no momenta: the "
                             f"momenta are missing from the state dict")


def _check_buffer(label: str, key: str, t, p, nonnegative: bool = False) -> None:
    """A saved state tensor of parameter ``p`` (None: absent): a floating (complex for a complex
    parameter) tensor of its shape with finite (and, ``nonnegative``, non-negative) values."""
    if t is None:
        return
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape)
            or not (t.is_floating_point() or t.is_complex()) or t.is_complex() != p.is_complex()):
        raise ValueError(f"{label}: {key} must be a "
                         f"{'complex' if p.is_complex() else 'floating'} tensor of the "
                         f"parameter's shape {tuple(p.shape)}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    values = dist_glue.local(t)
    values = torch.view_as_real(values) if values.is_complex() else values
    if not torch.isfinite(values).all():
        raise ValueError(f"{label}: {key} has non-finite values")
    if nonnegative and bool((values < 0).any()):
        raise ValueError(f"{label}: {key} has negative values (it is a second moment)")


#: The state tensors of a parameter that a checkpoint carries: the momentum and (adaptive mass)
#: the second moment.
STATE_TENSORS = ("momentum_buffer", "exp_avg_sq")


def saved_momenta(param_groups, sd: Dict[str, Any]) -> Dict[torch.Tensor, Dict[str, Any]]:
    """parameter -> its saved state tensors (``STATE_TENSORS`` present) of a validated state
    dict."""
    out = {}
    for g_saved, group in zip(sd["param_groups"], param_groups):
        for pid, p in zip(g_saved["params"], group["params"]):
            entry = sd["state"].get(pid, {})
            tensors = {k: entry[k] for k in STATE_TENSORS if entry.get(k) is not None}
            if tensors:
                out[p] = tensors
    return out


def load(opt, state_dict: Dict[str, Any]) -> None:
    """``opt.load_state_dict(state_dict)``, as torch.optim's: the load_state_dict pre hooks run
    first and what they return is loaded — after validating all of it (shapes, dtypes,
    scheme, seed, step, finite values): a bad state dict raises ValueError and changes
    nothing — then the post hooks, once the whole state is in place."""
    state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
    pre_hooks = opt._optimizer_load_state_dict_pre_hooks
    post_hooks = opt._optimizer_load_state_dict_post_hooks
    for pre_hook in pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state_dict = with_optional_keys(state_dict)
    validate(opt.param_groups, state_dict)
    saved_moms = saved_momenta(opt.param_groups, state_dict)
    # torch's load runs the hooks itself: the pre hooks ran above, the post hooks run once the
    # whole state (our momenta included) is in place.
    opt._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
    opt._optimizer_load_state_dict_post_hooks = type(post_hooks)()
    try:
        Optimizer.load_state_dict(opt, state_dict)
    finally:
        opt._optimizer_load_state_dict_pre_hooks = pre_hooks
        opt._optimizer_load_state_dict_post_hooks = post_hooks
    opt._cache.invalidate()
    for p, tensors in saved_moms.items():
        # Our own copies (torch would alias the saved tensors, and cast the float32 momenta of
        # bf16/fp16 parameters to the parameter dtype).
        for key, t in tensors.items():
            opt.state[p][key] = t.detach().to(device=p.device, dtype=momentum_dtype(p),
                                              copy=True)
    for group in opt.param_groups:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        if isinstance(group.get("xi"), torch.Tensor):
            group["xi"] = group["xi"].detach().to(device=device, dtype=torch.float64, copy=True)
        if isinstance(group.get("step"), torch.Tensor):
            group["step"] = group["step"].detach().to(device=device, copy=True)
    for post_hook in post_hooks.values():
        post_hook(opt)
