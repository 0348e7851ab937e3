"""The optimizers of the comparison, their settings, and ``--set`` / ``--preset`` handling.

The named thermodynamic methods keep their defaults in one place, the signatures of
:mod:`thermo_ext.methods` (``te.AdLaLa(model, lr=..., ...)``); this table reads them from there
whenever they are asked for, and a *preset* (``PRESETS`` there, e.g. the paper's spiral setting)
fills in its values on top, as ``te.AdLaLa(model, preset="paper")`` does. Only SGD and Adam, the
baselines, carry values of their own: the comparison's choices, the same under every preset.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import methods as named  # the optimizer constructors: looked up at each use

__all__ = ["SettingsError", "Method", "METHODS", "DEFAULT_PRESET", "PAPER_PRESET",
           "preset_names", "describe_preset", "signature_defaults", "resolve_methods",
           "parse_settings", "check_settings", "optimizer_settings"]


class SettingsError(ValueError):
    """A user setting (method name, ``--set`` key or value, preset) that cannot be used."""


#: The optimizers' own defaults (their signatures), as ``te.AdLaLa(model)``.
DEFAULT_PRESET = "default"
#: The paper's tuned two-spiral setting: what ``thermo-ext spiral``, ``digits`` and
#: ``robustness`` run unless told otherwise, so that docs/RESULTS.md stays reproducible.
PAPER_PRESET = "paper"

_PRESET_NOTES = {
    DEFAULT_PRESET: "the optimizers' own defaults, as te.AdLaLa(model)",
    PAPER_PRESET: "the paper's tuned two-spiral setting, as te.AdLaLa(model, preset='paper')",
    "unit": "the unit-mass defaults of earlier releases, as te.AdLaLa(model, preset='unit')",
}


def preset_names() -> Tuple[str, ...]:
    """Every preset a run can use: ``"default"`` and the names of ``thermo_ext.methods.PRESETS``."""
    return tuple(dict.fromkeys((DEFAULT_PRESET, *named.PRESETS)))


def describe_preset(preset: str) -> str:
    return _PRESET_NOTES.get(preset, f"preset {preset!r} of thermo_ext.methods.PRESETS")


def _check_preset(preset: str) -> None:
    if preset not in preset_names():
        raise SettingsError(f"--preset: expected one of {', '.join(preset_names())}, got "
                            f"{preset!r}")


def signature_defaults(fn: Callable) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """``fn``'s hyperparameters: (its keywords with numeric or string defaults and their values,
    its other keywords with defaults). ``preset`` is not a hyperparameter and is left out."""
    numbers: Dict[str, Any] = {}
    others: List[str] = []
    for p in inspect.signature(fn).parameters.values():
        if (p.default is inspect.Parameter.empty or p.name == "preset"
                or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)):
            continue
        if isinstance(p.default, (int, float, str)) and not isinstance(p.default, bool):
            numbers[p.name] = p.default  # numbers, and a choice such as mass="adaptive"
        else:
            others.append(p.name)
    return numbers, tuple(others)


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the comparison.

    A *named* method (``named=True``) is the constructor of that name in
    :mod:`thermo_ext.methods`: its defaults are that constructor's signature, read when asked
    for. A baseline carries ``own_defaults`` (the comparison's values). ``extra`` names further
    keywords that may be set (``--set Method.key=value``) but have no value here.
    """

    name: str
    thermodynamic: bool
    source: str
    factory: Callable[[nn.Module, Dict[str, Any], int], torch.optim.Optimizer]
    named: bool = False
    own_defaults: Optional[Dict[str, Any]] = None
    own_extra: Tuple[str, ...] = ()

    @property
    def constructor(self) -> Optional[Callable]:
        return getattr(named, self.name) if self.named else None

    @property
    def defaults(self) -> Dict[str, Any]:
        """The values used without a preset or ``--set`` (a fresh dict)."""
        if self.named:
            return signature_defaults(self.constructor)[0]
        return dict(self.own_defaults or {})

    @property
    def extra(self) -> Tuple[str, ...]:
        if self.named:
            others = signature_defaults(self.constructor)[1]
            return tuple(dict.fromkeys(_THERMO_EXTRA + others))
        return self.own_extra

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(self.defaults) + self.extra

    def settings(self, preset: str = DEFAULT_PRESET) -> Dict[str, Any]:
        """The values a run with ``preset`` uses: the defaults, then the preset's values on top
        (baselines: their own values under every preset)."""
        _check_preset(preset)
        values = self.defaults
        if self.named and preset != DEFAULT_PRESET:
            values.update(named.preset_values(self.name, preset))
        return values

    def build(self, model: nn.Module, hyper: Dict[str, Any], seed: int) -> torch.optim.Optimizer:
        return self.factory(model, hyper, seed)


_THERMO_EXTRA = ("weight_decay", "momentum_init", "thermostat")


def _by_model(name: str):  # partitioned methods take the model: its layers are the partitions
    return lambda model, hyper, seed: getattr(named, name)(model, seed=seed, **hyper)


def _by_params(name: str):
    return lambda model, hyper, seed: getattr(named, name)(model.parameters(), seed=seed,
                                                           **hyper)


# torch's fused CPU kernels are its fastest Adam and SGD (about half the step time of the
# default for-loop on the spiral net): the baselines get their best implementation.
def _adam(model, hyper, seed):
    hyper = {"fused": True, **hyper}
    if "betas" in hyper:  # given as "b1,b2" on the command line
        hyper["betas"] = tuple(hyper["betas"])
    return torch.optim.Adam(model.parameters(), **hyper)


def _adamw(model, hyper, seed):
    hyper = {"fused": True, **hyper}
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    return torch.optim.AdamW(model.parameters(), **hyper)


def _sgd(model, hyper, seed):
    return torch.optim.SGD(model.parameters(), **{"fused": True, **hyper})


def _named_method(name: str, layered: bool, what: str) -> Method:
    return Method(name, True, f"te.{name}: {what}", _by_model(name) if layered else
                  _by_params(name), named=True)


#: The methods in the order of the tables.
METHODS: Dict[str, Method] = {m.name: m for m in (
    _named_method("AdLaLa", True, "adaptive Langevin on the first layer, Langevin on the rest"),
    _named_method("LOL", True, "Langevin on the first layer, overdamped (gamma = inf) on the "
                               "rest"),
    _named_method("LaLa", True, "Langevin per layer"),
    _named_method("Langevin", False, "BAOAB Langevin on all parameters"),
    _named_method("AdL", False, "adaptive Langevin on all parameters"),
    _named_method("Overdamped", False, "Euler-Maruyama overdamped Langevin"),
    Method("SGD", False, "this package's choice: plain SGD at lr 0.1", _sgd,
           own_defaults=dict(lr=0.1, momentum=0.0),
           own_extra=("weight_decay", "nesterov", "dampening", "fused")),
    Method("Adam", False, "the paper's notebook (lr 0.005), torch's other defaults", _adam,
           own_defaults=dict(lr=0.005),
           own_extra=("betas", "eps", "weight_decay", "amsgrad", "fused")),
    Method("AdamW", False, "torch's AdamW at its defaults (lr 1e-3, weight decay 1e-2)", _adamw,
           own_defaults=dict(lr=1e-3, weight_decay=1e-2),
           own_extra=("betas", "eps", "amsgrad", "fused")),
)}


def resolve_methods(names: Sequence[str]) -> List[str]:
    """Canonical method names (case-insensitive), in the order given; SettingsError if unknown."""
    lookup = {k.lower(): k for k in METHODS}
    out = []
    for name in names:
        key = lookup.get(name.strip().lower())
        if key is None:
            raise SettingsError(f"--methods: unknown method {name.strip()!r}; choose from "
                                f"{', '.join(METHODS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise SettingsError("--methods: expected at least one method")
    return out


def _parse_value(text: str) -> Any:
    """'0.2' -> 0.2, 'inf' -> inf, '0.1,0.2' -> [0.1, 0.2], 'true' -> True, else the string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if "," in t:
        try:
            return [float(v) for v in t.split(",")]
        except ValueError:
            raise SettingsError(f"expected comma-separated numbers, got {t!r}") from None
    try:
        return float(t)
    except ValueError:
        return t


def parse_settings(items: Sequence[str], methods: Sequence[str],
                   preset: str = DEFAULT_PRESET,
                   base: Optional[Dict[str, Dict[str, Any]]] = None
                   ) -> Dict[str, Dict[str, Any]]:
    """Each method's hyperparameters: its settings under ``preset`` (or, for a method in
    ``base``, those values instead: an experiment's own baseline settings) updated by
    ``Method.key=value`` items.

    Only the keys a method has (its defaults and its settable extras) are accepted; a setting
    for a method that is not in ``methods`` is an error too (it would silently do nothing).
    """
    _check_preset(preset)
    base = base or {}
    hyper = {m: dict(base[m]) if m in base else METHODS[m].settings(preset) for m in methods}
    lookup = {k.lower(): k for k in METHODS}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.strip().partition(".")
        if not sep or not dot or not key or not value.strip():
            raise SettingsError(f"--set {item!r}: expected Method.key=value, e.g. "
                                f"AdLaLa.lr=0.2")
        method = lookup.get(name.lower())
        if method is None:
            raise SettingsError(f"--set {item!r}: unknown method {name!r}; choose from "
                                f"{', '.join(METHODS)}")
        if method not in hyper:
            raise SettingsError(f"--set {item!r}: {method} is not among --methods "
                                f"({', '.join(methods)})")
        keys = tuple(dict.fromkeys(tuple(hyper[method]) + METHODS[method].keys))
        if key not in keys:
            raise SettingsError(f"--set {item!r}: unknown key {key!r} for {method}; its keys "
                                f"are {', '.join(keys)}")
        try:
            hyper[method][key] = _parse_value(value)
        except SettingsError as e:
            raise SettingsError(f"--set {item!r}: {e}") from None
    return hyper


def check_settings(task, hyper: Dict[str, Dict[str, Any]]) -> None:
    """Builds every method's optimizer once on the task's network so that a bad value is
    reported before any run starts (the optimizers validate their arguments)."""
    model = task.model()
    for method, hp in hyper.items():
        try:
            METHODS[method].build(model, hp, seed=0)
        except (TypeError, ValueError) as e:
            shown = ", ".join(f"{k}={v}" for k, v in hp.items())
            raise SettingsError(f"--set {method}: the optimizer rejected {shown}: {e}") from None


def optimizer_settings(opt: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """What the optimizer actually runs with, per param group (for the JSON record)."""
    groups = []
    for g in opt.param_groups:
        rec = {"tensors": len(g["params"]), "elements": sum(p.numel() for p in g["params"])}
        for k, v in g.items():
            if k in ("params", "step", "xi", "initial_tau"):
                continue
            if isinstance(v, (bool, int, float, str, type(None))):
                rec[k] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
                rec[k] = list(v)
        groups.append(rec)
    return groups
