"""The paper's named methods: each builds a :class:`~thermo_ext.optim.Thermo` with the partitions
(param groups) and the schemes of the method (docs/DESIGN.md, The methods).

The defaults in the signatures are for common models: an adaptive diagonal mass (``mass=
"adaptive"``, docs/DESIGN.md, Mass) with the step of ``AdamW(lr=1e-3)`` (``te.from_adam``),
chosen by measurement so that every method trains what AdamW trains in the same number of steps
on an MLP, a CNN, a GRU, a transformer encoder, a GPT-2, ResNet-18s from scratch, a frozen
backbone's head and mnist1d (docs/GUIDE.md, section 1; ``bench/model_families.py``). The
paper's tuned spiral setting (unit mass) is ``preset="paper"``; the unit-mass defaults of
earlier releases are ``preset="unit"``. The layer methods take a model, named parameters or
explicit partitions (:mod:`thermo_ext.partition`); the two-partition methods take ``first=`` to
choose the first layer.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .chains import Chains
from .optim import Thermo
from . import partition
from .partition import FirstLike, ModelLike, Partition

__all__ = ["Langevin", "AdL", "Overdamped", "LaLa", "AdLaLa", "LOL", "PRESETS", "preset_values"]

#: Named settings, one argument away: ``te.AdLaLa(model, preset="paper")``. A preset fills in the
#: keywords the caller did not pass; anything passed explicitly wins.
#: "paper": the paper's tuned two-spiral setting with its unit mass (h = 0.25, tau = 1e-4,
#: gamma = 0.1, sigma = 0.01, eps = 0.05, xi0 = 0.1; Overdamped: this package's spiral setting),
#: used by ``thermo-ext spiral`` and ``robustness``.
#: "unit": the unit-mass defaults of earlier releases (SGD-like steps; docs/GUIDE.md §1.2), which
#: beat AdamW on some families (mnist1d's CNN) and fail on others (torchvision's ResNet-18).
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "paper": {
        "Langevin": dict(lr=0.25, gamma=0.1, tau=1e-4, mass="unit", momentum_init="zero"),
        "AdL": dict(lr=0.25, sigma=0.01, eps=0.05, tau=1e-4, xi0=0.1, mass="unit",
                    momentum_init="zero"),
        "Overdamped": dict(lr=0.05, tau=1e-4, mass="unit"),
        "LaLa": dict(lr=0.25, gamma=0.1, tau=1e-4, mass="unit", momentum_init="zero"),
        "AdLaLa": dict(lr=0.25, tau1=1e-4, tau2=1e-4, gamma=0.1, sigma=0.01, eps=0.05, xi0=0.1,
                       mass="unit", momentum_init="zero"),
        "LOL": dict(lr=0.25, tau1=1e-4, tau2=1e-4, gamma=0.1, mass="unit", momentum_init="zero"),
    },
    "unit": {
        "Langevin": dict(lr=0.45, gamma=3.0, tau=1e-7, mass="unit", momentum_init="zero"),
        "AdL": dict(lr=0.25, sigma=0.01, eps=0.05, tau=1e-5, xi0=0.1, mass="unit",
                    momentum_init="zero"),
        "Overdamped": dict(lr=0.3, tau=1e-7, mass="unit"),
        "LaLa": dict(lr=0.45, gamma=3.0, tau=1e-7, mass="unit", momentum_init="zero"),
        "AdLaLa": dict(lr=0.45, tau1=1e-5, tau2=1e-7, gamma=3.0, sigma=0.01, eps=0.05, xi0=0.1,
                       mass="unit", momentum_init="zero"),
        "LOL": dict(lr=0.55, tau1=1e-7, tau2=1e-7, gamma=3.0, mass="unit", momentum_init="zero"),
    },
}

# The adaptive-mass defaults (docs/GUIDE.md §1): h and gamma are te.from_adam(1e-3)'s (BAOAB's
# step is AdamW(1e-3)'s once Adam's bias correction has faded); tau = 1e-10 because with
# m = sqrt(v) + 1e-8 a coordinate whose gradient vanishes moves at the thermal speed sqrt(tau/m):
# at tau = 1e-8 the noise alone grew a torchvision ResNet-18's deepest convolutions 5x in 50
# steps. AdL's sigma = sqrt(2 tau gamma) holds its thermostat's equilibrium friction
# sigma^2 / (2 tau) at gamma. LOL's overdamped partition moves by h^2/2 M^-1 g, so its h is larger.
_H, _GAMMA, _TAU = 0.0103, 10.3, 1e-10
_SIGMA = 4.5e-5  # sqrt(2 * _TAU * _GAMMA)
# p starts at the first gradient's terminal momentum, so the first step is a whole one, as
# Adam's bias-corrected first step (docs/DESIGN.md, Initial momentum): from p = 0 the momentum
# methods stopped short of AdamW's loss on the 50-step ResNet-18s (docs/GUIDE.md §1). LOL keeps
# p = 0: its h was measured from rest, and from the terminal start its first layer's larger
# first steps cost it torchvision's ResNet-18 (loss 0.72 against 0.51).
_INIT = "terminal"


def preset_values(method: str, name: str) -> Dict[str, Any]:
    """The keyword arguments of preset ``name`` for the named method ``method`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {name!r}")
    values = PRESETS[name].get(method)
    if values is None:
        raise ValueError(f"preset {name!r} has no setting for {method}")
    return dict(values)


def _named(fn):
    """Adds ``preset=`` to a named method: the preset's values for the keywords not passed."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args, preset: Optional[str] = None, **kwargs):
        if preset is not None:
            given = sig.bind_partial(*args, **kwargs).arguments
            for key, value in preset_values(fn.__name__, preset).items():
                if key not in given and key not in given.get("kwargs", {}):
                    kwargs[key] = value
        return fn(*args, **kwargs)

    params = list(sig.parameters.values())
    params.insert(len(params) - 1, inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY,
                                                     default=None, annotation=Optional[str]))
    build.__signature__ = sig.replace(parameters=params)
    return build


def _group(part: Partition) -> Dict[str, Any]:
    group: Dict[str, Any] = dict(params=part.params, name=part.name)
    if part.param_names is not None:
        group["param_names"] = part.param_names
    return group


def _on_chains(chains: Chains, parts: List[Partition]) -> List[Partition]:
    """Partitions of the chains' template mapped to the stacked tensors (same names)."""
    stacked = chains.stacked_parameters()
    return [part._replace(params=[stacked[n] for n in part.param_names]) for part in parts]


def _params(params, kwargs) -> list:
    """What the one-group methods hand to Thermo: a module's trainable parameters as one named
    group; anything else (parameters, named pairs, param-group dicts) as torch takes it."""
    if isinstance(params, Chains):
        kwargs.setdefault("chains", params.num_chains)
        kwargs.setdefault("thermostat", "chain")
        names, tensors = zip(*params.stacked_parameters().items())
        return [dict(params=list(tensors), param_names=list(names), name="all")]
    if isinstance(params, torch.nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("params: the module has no trainable parameters (none, or all have "
                             "requires_grad=False)")
        return [dict(params=[p for _, p in named], param_names=[n for n, _ in named],
                     name="all")]
    return params


def _partitions(model, kwargs) -> List[Partition]:
    if isinstance(model, Chains):
        kwargs.setdefault("chains", model.num_chains)
        kwargs.setdefault("thermostat", "chain")
        return _on_chains(model, partition.partitions(model.template))
    return partition.partitions(model)


def _first_and_rest(model, first, kwargs) -> List[Partition]:
    if isinstance(model, Chains):
        kwargs.setdefault("chains", model.num_chains)
        kwargs.setdefault("thermostat", "chain")
        return _on_chains(model, list(partition.split_first(model.template, first)))
    return list(partition.split_first(model, first))


@_named
def Langevin(params, lr: float = _H, gamma: float = _GAMMA, tau: float = _TAU,
             mass: str = "adaptive", momentum_init: str = _INIT, **kwargs) -> Thermo:
    """BAOAB Langevin dynamics on all parameters (one group)."""
    return Thermo(_params(params, kwargs), lr=lr, scheme="langevin", gamma=gamma, tau=tau,
                  mass=mass, momentum_init=momentum_init, **kwargs)


@_named
def AdL(params, lr: float = _H, sigma: float = _SIGMA, eps: float = 0.05, tau: float = _TAU,
        xi0: float = _GAMMA, mass: str = "adaptive", momentum_init: str = _INIT,
        **kwargs) -> Thermo:
    """Adaptive Langevin (Nosé–Hoover–Langevin, scheme BACDEDCAB) on all parameters."""
    return Thermo(_params(params, kwargs), lr=lr, scheme="adl", sigma=sigma, eps=eps, tau=tau,
                  xi0=xi0, mass=mass, momentum_init=momentum_init, **kwargs)


@_named
def Overdamped(params, lr: float = 1e-3, tau: float = _TAU, mass: str = "adaptive",
               **kwargs) -> Thermo:
    """Euler–Maruyama overdamped Langevin, θ ← θ − h M⁻¹∇L + √(2hτ) M^(−½) R (no momentum; with
    the adaptive mass RMSprop's step plus noise)."""
    return Thermo(_params(params, kwargs), lr=lr, scheme="overdamped", tau=tau, mass=mass,
                  **kwargs)


def _per_layer(name: str, value, n: int) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: expected a number or {n} values (one per layer), got "
                         f"{len(values)}")
    return values


@_named
def LaLa(model: ModelLike, lr: float = _H, gamma: Union[float, Sequence[float]] = _GAMMA,
         tau: Union[float, Sequence[float]] = _TAU, mass: str = "adaptive",
         momentum_init: str = _INIT, **kwargs) -> Thermo:
    """Langevin per layer: one BAOAB group per partition (``te.partition.partitions(model)``:
    one per module owning trainable parameters), each with its own γ and τ (a number, or a
    list with one value per partition)."""
    parts = _partitions(model, kwargs)
    gammas = _per_layer("gamma", gamma, len(parts))
    taus = _per_layer("tau", tau, len(parts))
    groups = [dict(_group(p), gamma=g, tau=t) for p, g, t in zip(parts, gammas, taus)]
    return Thermo(groups, lr=lr, scheme="langevin", mass=mass, momentum_init=momentum_init,
                  **kwargs)


@_named
def AdLaLa(model: ModelLike, lr: float = _H, tau1: float = _TAU, tau2: float = _TAU,
           gamma: float = _GAMMA, sigma: float = _SIGMA, eps: float = 0.05, xi0: float = _GAMMA,
           first: FirstLike = None, mass: str = "adaptive", momentum_init: str = _INIT,
           **kwargs) -> Thermo:
    """Adaptive Langevin on the first layer, Langevin on the rest (the paper's AdLaLa)."""
    head, rest = _first_and_rest(model, first, kwargs)
    groups = [dict(_group(head), scheme="adl", tau=tau1),
              dict(_group(rest), scheme="langevin", tau=tau2)]
    return Thermo(groups, lr=lr, gamma=gamma, sigma=sigma, eps=eps, xi0=xi0, mass=mass,
                  momentum_init=momentum_init, **kwargs)


@_named
def LOL(model: ModelLike, lr: float = 0.045, tau1: float = _TAU, tau2: float = _TAU,
        gamma: float = 15.0, first: FirstLike = None, mass: str = "adaptive",
        momentum_init: str = "zero", **kwargs) -> Thermo:
    """Langevin on the first layer, overdamped Langevin (BAOAB with γ = ∞) on the rest."""
    head, rest = _first_and_rest(model, first, kwargs)
    groups = [dict(_group(head), scheme="langevin", tau=tau1, gamma=gamma),
              dict(_group(rest), scheme="langevin", tau=tau2, gamma=math.inf)]
    return Thermo(groups, lr=lr, mass=mass, momentum_init=momentum_init, **kwargs)
