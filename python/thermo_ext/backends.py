"""The two implementations of a step — the compiled engine and the plain-torch reference — behind
one small protocol, and the one place that orders a step's modes (docs/DESIGN.md, "Failure
model").

A backend makes a *plan* of each engine call (:class:`~thermo_ext.calls.EngineCall`) and runs
one *mode* of several plans at once, in order, up to the first refusal:

* ``"all"``: a plan's whole step, all or nothing for that plan;
* ``"pre"``: everything of it that can fail (checks, read-only phases, thermostat updates into
  the workspace), writing nothing; ``"finish"``: its writing phase, after a successful
  ``"pre"``.

:func:`run_step` orders them so that a refused step changes nothing in any group on any rank.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import kernels, reference
from .distributed import Agreement
from .refusal import Refusal

__all__ = ["EngineBackend", "ReferenceBackend", "BACKENDS", "run_step"]


class EngineBackend:
    """The compiled engine: a plan is an :class:`~thermo_ext.kernels.EnginePlan`, built at a
    call's first step and kept on it; each step sets its gradients, program and counter. One
    mode of several plans is one engine call (fewer crossings into C++ than one per plan)."""

    name = "engine"

    @staticmethod
    def plan(item, stochastic_rounding: bool, sum_hook) -> kernels.EnginePlan:
        """The plan of ``item.call``, set for this step."""
        c = item.call
        plan = c.plan
        if plan is None:
            plan = c.plan = kernels.EnginePlan(
                c.params, c.momenta, scheme=c.scheme, xi=c.xi, segments=c.segments,
                seg_numel=c.seg_numel, seed=c.seed, uids=c.uids(), offsets=c.offsets,
                runs=c.runs, step_tensor=c.step_tensor, workspace=c.workspace,
                masses=c.masses, mass_starts=c.mass_starts)
        step = item.host_step
        plan.set_fast(item.grads, item.hyper, step, step == 0, stochastic_rounding)
        plan.sum_hook = sum_hook or c.sum_hook
        return plan

    @staticmethod
    def run(plans, modes: Sequence[str], check: bool,
            flag: Optional[torch.Tensor]) -> Optional[Refusal]:
        return kernels.run_plans(plans, check=check, flag=flag, modes=modes)


class ReferencePlan:
    """A call's step for :func:`thermo_ext.reference.thermo_step` (plain torch, the oracle):
    its keyword arguments."""

    __slots__ = ("kwargs", "sum_hook")

    def __init__(self, kwargs: Dict[str, Any], sum_hook: Optional[Callable]):
        self.kwargs, self.sum_hook = kwargs, sum_hook


class ReferenceBackend:
    """:func:`thermo_ext.reference.thermo_step` on each plan in turn."""

    name = "reference"

    @staticmethod
    def plan(item, stochastic_rounding: bool, sum_hook) -> ReferencePlan:
        c, hy, step = item.call, item.hyper, item.host_step
        hook = sum_hook or c.sum_hook
        return ReferencePlan(dict(
            params=c.params, momenta=c.momenta, grads=item.grads, scheme=c.scheme, lr=hy.lr,
            gamma=hy.gamma, tau=hy.tau, sigma=hy.sigma, eps=hy.eps,
            weight_decay=hy.weight_decay, maximize=hy.maximize, xi=c.xi, segments=c.segments,
            seg_numel=c.seg_numel, seed=c.seed, step=step, uids=c.uids(), offsets=c.offsets,
            runs=c.runs, first=step == 0, stochastic_rounding=stochastic_rounding,
            sum_hook=hook, masses=c.masses, mass_starts=c.mass_starts, mass_beta=hy.mass_beta,
            mass_eps=hy.mass_eps, mass_freeze=hy.mass_freeze or 0), hook)

    @staticmethod
    def run(plans, modes: Sequence[str], check: bool,
            flag: Optional[torch.Tensor]) -> Optional[Refusal]:
        for i, (plan, mode) in enumerate(zip(plans, modes)):
            refusal = reference.thermo_step(check_finite=check and mode != "finish", mode=mode,
                                            **plan.kwargs)
            if refusal is not None:
                refusal.plan = i
                return refusal
        return None


BACKENDS = {"engine": EngineBackend(), "reference": ReferenceBackend()}


def run_step(backend, plans: Sequence[Any], *, check: bool, flag: Optional[torch.Tensor],
             agreement: Optional[Agreement], capturable: bool) -> Optional[Refusal]:
    """One step of every plan, all or nothing; returns None or why it was refused (on the
    device a refusal is left in ``flag`` for the caller, except where ranks agree on it).

    Without a check nothing can fail: each plan runs whole. One plan's ``"all"`` is already all
    or nothing. Otherwise every plan's ``"pre"`` runs before any ``"finish"`` (in one call of the
    backend when nothing needs to happen between them: the first refusal stops it before any
    plan writes). After a refusal the plans with a ``sum_hook`` (a collective) still run their
    ``"pre"`` — with zero sums where a check failed — so that every rank calls the same
    collectives in the same order. Under an :class:`Agreement` the ranks then agree on the
    verdict (one small all-reduce), and only then write: every rank refuses a step that any
    rank refuses, nothing changes anywhere, and no rank waits in a collective another rank
    skipped."""
    n = len(plans)
    if not check or (n == 1 and agreement is None):
        return backend.run(plans, ["all"] * n, check, flag)
    hooked = any(p.sum_hook is not None for p in plans)
    if agreement is None and not hooked:
        # A refusal can only come from the "pre" entries, whose positions are the plans'.
        return backend.run([*plans, *plans], ["pre"] * n + ["finish"] * n, True, flag)
    refusal = backend.run(plans, ["pre"] * n, True, flag)
    if refusal is not None:
        joining = [p for p in plans[refusal.plan + 1:] if p.sum_hook is not None]
        if joining:
            backend.run(joining, ["pre"] * len(joining), True, flag)
    if agreement is not None:
        refusal = agreement.verdict(refusal, flag, host=not capturable)
    if refusal is not None:
        return refusal
    backend.run(plans, ["finish"] * n, False, flag)
    return None
