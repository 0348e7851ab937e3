"""The two implementations of a step — the compiled engine and the plain-torch reference — behind
one small protocol, and the order in which a step runs them (docs/DESIGN.md, "Failure model").

A backend turns a step's :class:`~thermo_ext.groups.EngineCall` list into *tasks* and runs them
in a *mode*:

* ``"all"``: the whole step of each task in turn;
* ``"pre"``: everything that can fail (checks, read-only phases, thermostat updates into the
  workspace), writing nothing; ``"finish"``: the writing phase after a successful ``"pre"``.

A task with a ``sum_hook`` (a collective) runs its ``"pre"`` — hooks included, with zero sums
for what a refused check did not form — even when this rank refused the step or an earlier task,
so that every rank calls the same collectives in the same order.

A run returns None or (task index, tensor or segment index, kind). :func:`run_step` is the one
place that orders the modes so that a refused step changes nothing in any group on any rank.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from . import kernels, reference
from .distributed import Agreement
from .groups import EngineCall

__all__ = ["EngineBackend", "ReferenceBackend", "BACKENDS", "Refusal", "run_step"]

Bad = Optional[tuple]


@dataclasses.dataclass
class Refusal:
    """Why a step was refused: a non-finite ``kind`` (one of kernels.BAD_KINDS) at ``index`` (a
    tensor of task ``task``, or a thermostat segment), found on ``rank`` (None: this process).
    ``task`` is None when only a device flag knows (then ``index`` counts the call's entries)."""

    task: Optional[int]
    index: int
    kind: str
    rank: Optional[int] = None

    @staticmethod
    def from_flag(code: int, rank: Optional[int] = None) -> "Refusal":
        return Refusal(None, code // 4, kernels.BAD_KINDS[code % 4], rank)


class EngineBackend:
    """The compiled engine: a task is an :class:`~thermo_ext.kernels.EnginePlan` (the plan is
    built once per call and cached on it; each step sets gradients, program and counter)."""

    name = "engine"
    #: "all" over several tasks is already all or nothing: the engine stages a whole checked
    #: step in one call (every plan's checks and read-only phases before any plan writes).
    stages_all = True

    def tasks(self, calls: Sequence[EngineCall], grads, hyper, host_steps,
              stochastic_rounding: bool, sum_hook) -> list:
        plans = []
        for c, g, hy, step in zip(calls, grads, hyper, host_steps):
            if c.plan is None:
                c.plan = kernels.EnginePlan(
                    c.params, c.momenta, scheme=c.scheme, xi=c.xi, segments=c.segments,
                    seg_numel=c.seg_numel, seed=c.seed, uids=c.uids(), offsets=c.offsets,
                    runs=c.runs, step_tensor=c.step_tensor, workspace=c.workspace)
            c.plan.set_fast(g, hy, step, step == 0, stochastic_rounding)
            c.plan.sum_hook = sum_hook or c.sum_hook
            plans.append(c.plan)
        return plans

    def run(self, plans, mode: str, check: bool, flag: Optional[torch.Tensor]) -> Bad:
        return kernels.run_plans(plans, check=check, flag=flag, mode=mode)


class ReferenceBackend:
    """:func:`thermo_ext.reference.thermo_step` (plain torch, the oracle): a task is its
    keyword arguments."""

    name = "reference"
    stages_all = False

    def tasks(self, calls: Sequence[EngineCall], grads, hyper, host_steps,
              stochastic_rounding: bool, sum_hook) -> list:
        tasks = []
        for c, g, (lr, gamma, tau, sigma, eps, wd, maximize), step in zip(calls, grads, hyper,
                                                                          host_steps):
            tasks.append(dict(params=c.params, momenta=c.momenta, grads=g, scheme=c.scheme,
                              lr=lr, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                              weight_decay=wd, maximize=maximize, xi=c.xi, segments=c.segments,
                              seg_numel=c.seg_numel, seed=c.seed, step=step, uids=c.uids(),
                              offsets=c.offsets, runs=c.runs, first=step == 0,
                              stochastic_rounding=stochastic_rounding,
                              sum_hook=sum_hook or c.sum_hook))
        return tasks

    def run(self, tasks, mode: str, check: bool, flag: Optional[torch.Tensor]) -> Bad:
        first_bad = None
        for i, kw in enumerate(tasks):
            if first_bad is not None and not (mode == "pre" and kw["sum_hook"] is not None):
                continue
            bad = reference.thermo_step(check_finite=check and mode != "finish", mode=mode, **kw)
            if bad is not None and first_bad is None:
                first_bad = (i,) + tuple(bad)
        return first_bad


BACKENDS = {"engine": EngineBackend(), "reference": ReferenceBackend()}


def run_step(backend, tasks: list, *, check: bool, flag: Optional[torch.Tensor],
             agreement: Optional[Agreement], capturable: bool) -> Optional[Refusal]:
    """One step of every task, all or nothing; returns None or why it was refused (on the
    device, a refusal is left in ``flag`` for the caller, except where ranks agree on it).

    Without a check a step cannot fail and runs each task whole. With one, several tasks run
    every ``"pre"`` before any ``"finish"``. Under an :class:`Agreement` every rank runs its
    ``"pre"`` (whose collectives run in lockstep whatever the rank found), the ranks agree on
    the verdict (one small all-reduce), and only then write: every rank refuses a step that any
    rank refuses, nothing changes anywhere, and no rank waits in a collective another rank
    skipped."""
    if not check:
        return _refusal(backend.run(tasks, "all", False, flag))
    if agreement is not None:
        bad = backend.run(tasks, "pre", True, flag)
        agreed = agreement.verdict(bad, flag, host=not capturable)
        if agreed is not None:
            rank, local = agreed
            refusal = Refusal.from_flag(local) if isinstance(local, int) else _refusal(local)
            if rank != agreement.rank():
                refusal.rank = rank
            return refusal
        return _refusal(backend.run(tasks, "finish", False, flag))
    if len(tasks) == 1 or backend.stages_all:
        return _refusal(backend.run(tasks, "all", True, flag))
    bad = backend.run(tasks, "pre", True, flag)
    if bad is None:
        bad = backend.run(tasks, "finish", False, flag)
    return _refusal(bad)


def _refusal(bad: Bad) -> Optional[Refusal]:
    return None if bad is None else Refusal(*bad)
