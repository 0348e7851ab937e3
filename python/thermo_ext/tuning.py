"""Hyperparameters in the user's terms: from an SGD-with-momentum or an Adam setting to (h, γ).

BAOAB (the Langevin scheme) with τ = 0 *is* SGD with heavy-ball momentum. One step after the
first reads B(h) A(h/2) O A(h/2): p' = p − h g, then θ moves by (h/2)(1 + c) p' with
c = e^(−γh), and c p' is the next step's p. Writing b = −p'/h gives b = c b_prev + g and
θ ← θ − lr b, torch's ``SGD(lr, momentum)`` with

    momentum = e^(−γh),        lr = h² (1 + e^(−γh)) / 2        (≈ h² when γh is small).

(The first step differs only in that the paper's scheme starts from p = 0 with B(h/2), so it
counts the first gradient half.) Temperature adds the noise √(τ (1 − c²)) R to p each step:
τ is the variance of each momentum component at equilibrium (the kinetic temperature Σp²/N
the dynamics settle at), and h·√τ is the size of the random kick θ gets per step.

The same reading for the other schemes:

* adaptive Langevin (AdL, AdLaLa's first partition): the friction is the thermostat ξ instead of
  γ, so ``xi0`` plays γ's part at the start (ξ then adapts so that Σp²/N tracks τ);
* overdamped Langevin (``Overdamped``): θ ← θ − h g + noise, plain SGD with lr = h;
* LOL's second partition (BAOAB with γ = ∞): p is resampled every step, SGD with lr = h²/2 and
  no momentum.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

__all__ = ["from_sgd", "from_adam", "to_sgd", "ADAM_LR"]

#: The Adam learning rate the named methods' defaults were matched against (docs/GUIDE.md).
ADAM_LR = 1e-3

_METHODS = ("Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped", "Thermo")


def _positive(name: str, value, *, upper: Optional[float] = None, closed: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    lo_ok = value >= 0 if closed else value > 0
    if not lo_ok or (upper is not None and value >= upper):
        rng = f"{'[' if closed else '('}0, {upper if upper is not None else 'inf'})"
        raise ValueError(f"{name}: expected a number in {rng}, got {value!r}")
    return float(value)


def _method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    return method


def to_sgd(lr: float, gamma: float) -> Tuple[float, float]:
    """The (lr, momentum) of torch's SGD that BAOAB with step size h = ``lr`` and friction
    ``gamma`` runs at τ = 0: (h² (1 + e^(−γh)) / 2, e^(−γh))."""
    h = _positive("lr", lr)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) \
            or gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0 (inf allowed), got {gamma!r}")
    c = math.exp(-gamma * h)
    return h * h * (1.0 + c) / 2.0, c


def from_sgd(lr: float, momentum: float = 0.9, *, method: str = "Langevin",
             tau: Optional[float] = None) -> Dict[str, Any]:
    """Keyword arguments for ``method`` that run the SGD-with-momentum setting (lr, momentum).

    For the momentum methods: h = √(2 lr / (1 + momentum)) and γ = −ln(momentum) / h, so that
    ``to_sgd(h, γ) == (lr, momentum)``; AdL gets the friction as its initial thermostat ``xi0``
    (AdLaLa both ``gamma`` and ``xi0``); momentum 0 gives γ = ∞. ``Overdamped`` has no momentum:
    it gets h = lr / (1 − momentum), the heavy ball's steady step size. LOL's second partition
    then runs SGD with lr h²/2 and no momentum (see :mod:`thermo_ext.tuning`). ``tau``, when
    given, is the temperature (``tau1``/``tau2`` for AdLaLa and LOL).

    >>> from_sgd(0.01, 0.9)                              # doctest: +ELLIPSIS
    {'lr': 0.1025..., 'gamma': 1.0269...}
    >>> te.Langevin(model, **from_sgd(0.01, 0.9, tau=1e-6))  # doctest: +SKIP
    """
    method = _method(method)
    lr = _positive("lr", lr)
    m = _positive("momentum", momentum, upper=1.0, closed=True)
    out: Dict[str, Any]
    if method == "Overdamped":
        out = {"lr": lr / (1.0 - m)}
    else:
        h = math.sqrt(2.0 * lr / (1.0 + m))
        gamma = math.inf if m == 0 else -math.log(m) / h
        if method == "AdL":
            if math.isinf(gamma):
                raise ValueError("momentum: AdL's thermostat needs a finite initial friction; "
                                 "expected momentum > 0")
            out = {"lr": h, "xi0": gamma}
        elif method == "AdLaLa":
            if math.isinf(gamma):
                raise ValueError("momentum: AdLaLa's thermostat needs a finite initial friction; "
                                 "expected momentum > 0")
            out = {"lr": h, "gamma": gamma, "xi0": gamma}
        else:
            out = {"lr": h, "gamma": gamma}
    if tau is not None:
        t = _positive("tau", tau, closed=True)
        if method in ("AdLaLa", "LOL"):
            out.update(tau1=t, tau2=t)
        else:
            out["tau"] = t
    return out


def from_adam(lr: float = ADAM_LR, *, method: str = "Langevin") -> Dict[str, Any]:
    """A starting point for ``method`` from an Adam learning rate.

    There is no exact map (Adam rescales every coordinate by its gradient's running RMS). This
    takes the named method's defaults, which were chosen to match ``Adam(lr=1e-3)`` on the model
    families of docs/GUIDE.md, and scales every method's step as h = h_default · √(lr / 1e-3),
    keeping the momentum e^(−γh) (γ, and AdL's initial friction ``xi0``, scaled by
    h_default / h). For the momentum methods the equivalent SGD learning rate (∝ h²) then scales
    with Adam's. Overdamped's SGD learning rate is h itself and scales only with √lr: the
    linear scaling (h = 0.9 for Adam's 3e-3) diverged on the MLP and CNN of the guide, the
    square root trained them (docs/GUIDE.md, "From an Adam setting"). A starting point: tune
    from there.
    """
    import inspect

    from . import methods

    method = _method(method)
    lr = _positive("lr", lr)
    fn = getattr(methods, "Langevin" if method == "Thermo" else method)
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    h0 = defaults["lr"]
    h = h0 * math.sqrt(lr / ADAM_LR)
    out: Dict[str, Any] = {"lr": h}
    if method == "Overdamped":
        return out
    frictions = {"AdL": ("xi0",), "AdLaLa": ("gamma", "xi0")}.get(method, ("gamma",))
    for key in frictions:
        out[key] = defaults[key] * h0 / h  # the same γh: the same momentum
    return out
