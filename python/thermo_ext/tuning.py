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
    given, is the temperature (``tau1``/``tau2`` for AdLaLa and LOL). ``mass="unit"``: SGD's step is
    the unit mass's; ``momentum_init="zero"``: from rest, as SGD's buffer (the named methods
    start at the terminal momentum).

    >>> from_sgd(0.01, 0.9)                              # doctest: +ELLIPSIS
    {'lr': 0.1025..., 'gamma': 1.0269..., 'mass': 'unit', 'momentum_init': 'zero'}
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
    out["mass"] = "unit"  # SGD's step is the unit mass's (the named methods' default is adaptive)
    if method != "Overdamped":
        # torch's SGD starts its buffer at the first gradient (first step lr g); from p = 0
        # BAOAB's first step is lr g / 2, from the terminal momentum lr g / (1 - momentum).
        out["momentum_init"] = "zero"
    return out


def from_adam(lr: float = ADAM_LR, betas: Tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0, *, method: str = "Langevin",
              tau: float = 0.0) -> Dict[str, Any]:
    """Keyword arguments for ``method`` with the adaptive mass that run torch's Adam setting
    (lr, betas, eps) at temperature ``tau`` (0: Adam's deterministic dynamics), as exactly as the
    algebra allows.

    With M = diag(√v̂ + eps) from Adam's own second moment (``mass_beta`` = β2, ``mass_eps`` =
    eps), one BAOAB step after the first is p′ = p − h g, θ ← θ − (h²(1 + c)/2) M⁻¹ b with
    b = c b_prev + g the heavy ball and c = e^(−γh) (:func:`to_sgd`). Adam's m = (1 − β1) b, so
    with c = β1 and h²(1 + c)/2 = lr (1 − β1) the step is Adam's:

        h = √(2 lr (1 − β1) / (1 + β1)),    γ = −ln(β1) / h.

    The first step: Adam divides its m by 1 − β1^t, so its first step is a whole one, lr times
    the first gradient's sign; ``momentum_init="terminal"`` (returned for the momentum methods)
    starts p at the momentum a constant first gradient would hold (docs/DESIGN.md, Initial
    momentum), so BAOAB's first step is Adam's too. What differs: for the next ~1/(1 − β1) steps
    that start weighs the first gradient by β1^(t−1) where Adam's correction weighs it by
    β1^(t−1) (1 − β1) / (1 − β1^t); the step is the same once both have faded.
    ``weight_decay`` is passed on as λ, which B adds to the gradient and v squares with it: L2,
    Adam's ``weight_decay``, not AdamW's decoupled decay θ ← θ(1 − lr λ). AdL (and AdLaLa's
    first layer) takes the friction as its initial thermostat ``xi0`` and ``sigma`` = √(2τγ),
    whose equilibrium friction σ²/(2τ) is γ (at τ = 0 no thermostat noise: ξ then only grows
    while p ≠ 0); the thermostat sets the friction from there, so AdL is Adam only on average.
    Overdamped has no momentum: h = lr runs RMSprop's step g/(√v̂ + eps) (Adam with β1 = 0).
    LOL shares h between its partitions, so its second (BAOAB with γ = ∞, momentum redrawn
    every step) moves by h²/2 · M⁻¹g, without momentum: there the algebra cannot match Adam.

    >>> from_adam(1e-3)                                  # doctest: +ELLIPSIS
    {'lr': 0.01025..., 'gamma': 10.26..., 'tau': 0.0, 'mass': 'adaptive', 'mass_beta': 0.999, 'mass_eps': 1e-08, 'momentum_init': 'terminal'}
    >>> te.Langevin(model, **from_adam(3e-4, tau=1e-8))  # doctest: +SKIP
    """
    method = _method(method)
    lr = _positive("lr", lr)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected (beta1, beta2), got {betas!r}")
    b1 = _positive("betas[0]", betas[0], upper=1.0, closed=True)
    b2 = _positive("betas[1]", betas[1], upper=1.0, closed=True)
    eps = _positive("eps", eps)
    wd = _positive("weight_decay", weight_decay, closed=True)
    t = _positive("tau", tau, closed=True)
    out: Dict[str, Any]
    if method == "Overdamped":
        out = {"lr": lr}
    else:
        h = math.sqrt(2.0 * lr * (1.0 - b1) / (1.0 + b1))
        gamma = math.inf if b1 == 0 else -math.log(b1) / h
        if method in ("AdL", "AdLaLa") and math.isinf(gamma):
            raise ValueError(f"betas: {method}'s thermostat needs a finite initial friction; "
                             f"expected beta1 > 0")
        out = {"lr": h}
        # The thermostat's equilibrium friction is sigma^2 / (2 tau) (docs/DESIGN.md, Mass):
        # sigma = sqrt(2 tau gamma) holds it at Adam's gamma (the package's sigma = 0.01 would
        # hold it at 5e3 for tau = 1e-8, and its noise would throw every coordinate with a
        # vanishing gradient, m = eps, about).
        if method == "AdL":
            out.update(xi0=gamma, sigma=math.sqrt(2.0 * t * gamma))
        elif method == "AdLaLa":
            out.update(gamma=gamma, xi0=gamma, sigma=math.sqrt(2.0 * t * gamma))
        else:
            out["gamma"] = gamma
    if method in ("AdLaLa", "LOL"):
        out.update(tau1=t, tau2=t)
    else:
        out["tau"] = t
    out.update(mass="adaptive", mass_beta=b2, mass_eps=eps)
    if method != "Overdamped":
        out["momentum_init"] = "terminal"
    if wd:
        out["weight_decay"] = wd
    return out
