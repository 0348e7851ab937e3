"""One step of a :class:`~thermo_ext.optim.Thermo`, and what it keeps from step to step
(docs/DESIGN.md, "The optimizer").

:class:`StepCache` holds, per param group, the :class:`~thermo_ext.calls.GroupRecord` of its
engine calls, rebuilt only when it no longer fits the group (:meth:`GroupRecord.fits`), the host
copy of device step counters, the device flags and the log of state a running step created.
Each step it yields named :class:`StepItem` records — an engine call with its hyperparameters,
host step and group — and :meth:`StepCache.run` hands them to a backend in the order
:func:`~thermo_ext.backends.run_step` fixes. A training loop's usual step (the same groups,
tensors and hyperparameter objects, new gradients) is recognised by identity, group by group,
and for plain CPU groups nothing runs around the engine call but the gradients' layout check.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from . import distributed as dist_glue
from .backends import BACKENDS, run_step
from .calls import (EngineCall, GroupRecord, addresses, buffer_ids, build_calls,
                    momentum_buffers)
from .distributed import Agreement
from .fallback import choose as choose_backend
from .groups import check_group, hyper_values, raw_hyper, raw_structure
from .kernels import Hyper
from .naming import where
from .refusal import Refusal

__all__ = ["StepItem", "Step", "StepCache"]


class StepItem(NamedTuple):
    """One engine call of a step, with what the step runs it with: the group's
    hyperparameters and host step counter, the group, and the gradients the call reads."""

    call: EngineCall
    hyper: Hyper
    host_step: int
    group: Dict[str, Any]
    grads: List[torch.Tensor]


class Step(NamedTuple):
    """A step's items and what the records of its groups say about all of them."""

    items: List[StepItem]
    records: List[GroupRecord]
    plain: bool       # every call steps its parameters in place on the CPU (GroupRecord.plain)
    on_device: bool   # some call runs on CUDA (its failures go through a device flag)
    dtensor: bool     # some call steps DTensor shards (its ranks must agree on a refusal)
    capturable: bool  # some group counts on the device and has stepped before (it may skip)


class StepCache:
    """What a :class:`~thermo_ext.optim.Thermo` keeps between steps; never copied or pickled
    (the engine's plans hold raw addresses of the original's tensors)."""

    def __init__(self):
        self.records: Dict[int, GroupRecord] = {}
        self.host_steps: Dict[int, int] = {}
        self.flags: Dict[torch.device, torch.Tensor] = {}
        self.created: list = []  # state created by the running step (undone if it fails)
        self.version = 0  # bumped whenever groups or state change wholesale
        self.dirty = True  # the compiled step's tensor lists must be rebuilt
        #: The records of the last step when the next may repeat it as it is (run_steady).
        self.steady: Optional[List[GroupRecord]] = None

    def invalidate(self, counters: bool = True) -> None:
        """The optimizer's groups changed, or (``counters``) its state was replaced by a load:
        every record is rebuilt (and device counters read again)."""
        self.records.clear()
        if counters:
            self.host_steps.clear()
        self.version += 1
        self.dirty = True

    # ----------------------------------------------------------------------------- records
    def record(self, gi: int, group: Dict[str, Any], grads: List[Optional[torch.Tensor]],
               state) -> Optional[GroupRecord]:
        """The group's record for this step, rebuilt only when it no longer fits
        (:meth:`GroupRecord.fits`); hyperparameters are revalidated whenever they change.
        ``grads``: the gradient of each of the group's parameters (None: it does not move).
        None when no parameter of the group has a gradient. (The hot path of a small model's
        step: what did not change is recognised by identity.)"""
        params = group["params"]
        active = tuple([k for k, g in enumerate(grads) if g is not None])
        if not active:
            return None
        rec = self.records.get(gi)
        raw, structure = raw_hyper(group), raw_structure(group)
        if (rec is not None and not rec.tensor_hyper and all(map(operator.is_, raw, rec.raw))
                and all(map(operator.is_, structure, rec.structure))):
            hyper, scheme = rec.hyper, rec.scheme
        else:  # users and schedulers edit groups: validate what changed before using it
            wh = where(gi, group)
            hyper = hyper_values(wh, group)
            if rec is not None and hyper == rec.hyper and structure == rec.structure:
                scheme = rec.scheme
            else:
                scheme = check_group(group, wh)
        moving = params if len(active) == len(params) else [params[k] for k in active]
        if (rec is None or active != rec.active or structure != rec.structure
                or not rec.fits(group, moving, state, self.version)):
            calls = build_calls(gi, group, scheme, active, grads, state, self.created,
                                dist_glue.mesh_sum_hook, self.host_step(gi, group))
            # ξ, momenta and the step counter are made while building: key those made
            adaptive = group["mass"] == "adaptive"
            rec = GroupRecord(active=active, addresses=addresses(moving),
                              momenta=tuple(momentum_buffers(state, moving)),
                              buffers=buffer_ids(group), version=self.version,
                              structure=structure, raw=raw, hyper=hyper, scheme=scheme,
                              calls=calls, capturable=group["capturable"],
                              masses=tuple(momentum_buffers(state, moving, "exp_avg_sq"))
                              if adaptive else None)
            self.records[gi] = rec
            self.dirty = True
        else:
            rec.raw, rec.hyper = raw, hyper
        return rec

    def host_step(self, gi: int, group: Dict[str, Any]) -> int:
        """The group's step counter on the host (a device counter is read once, then
        followed)."""
        s = group["step"]
        if isinstance(s, torch.Tensor):
            if gi not in self.host_steps:
                self.host_steps[gi] = int(s)
            return self.host_steps[gi]
        return s

    def prepare(self, groups, grad_of, state) -> Step:
        """This step's items: per group with gradients, its calls with its hyperparameters,
        host step and gradients. ``grad_of(parameter)`` gives a gradient (None: ``.grad``)."""
        items, records = [], []
        plain, on_device, dtensor, capturable = True, False, False, False
        for gi, group in enumerate(groups):
            params = group["params"]
            grads = ([p.grad for p in params] if grad_of is None else
                     [grad_of(p) for p in params])
            rec = self.record(gi, group, grads, state)
            if rec is None:
                continue
            host_step = self.host_step(gi, group)
            items += [StepItem(c, rec.hyper, host_step, group, c.grads(group, grads))
                      for c in rec.calls]
            records.append(rec)
            if not rec.plain:
                plain = False
                on_device |= rec.on_device
                dtensor |= rec.dtensor
                # The first step runs eagerly (it is never captured): there a capturable group
                # raises like any other instead of skipping on the device.
                capturable |= group["capturable"] and host_step > 0
        return Step(items, records, plain, on_device, dtensor, capturable)

    # ----------------------------------------------------------------------------- the step
    def run(self, opt, grad_of) -> None:
        """One step of every group of ``opt`` with the gradients ``grad_of(parameter)`` (None:
        ``.grad``; a gradient None: the parameter does not move): all or nothing, raising
        ``FloatingPointError`` when a check refuses it (the caller forgets what the step
        created, :meth:`rollback`)."""
        groups = opt.param_groups
        self.check_capture(opt, grad_of)
        if grad_of is None and self.steady is not None and self.run_steady(opt):
            return
        self.steady = None
        step = self.prepare(groups, grad_of, opt.state)
        if not step.items:
            self.advance(groups, None)
            return
        calls = [it.call for it in step.items]
        backend = choose_backend(opt.backend, calls, step.on_device)
        check = opt.check_finite
        flag = agreement = None
        if not step.plain:
            for c in calls:
                c.copy_in()
            if check and step.on_device and backend.name == "engine":
                devices = {c.params[0].device for c in calls}
                if len(devices) > 1:  # one flag per step: keep the fast path to one device
                    raise ValueError("check_finite with CUDA needs all groups on one device")
                flag = self.flag(devices.pop(), opt._skipped)
                flag.zero_()
            if check and (step.dtensor or opt.sum_hook is not None):
                agreement = Agreement.for_tensors([c.sources[0] for c in calls if c.dtensor],
                                                  opt.sum_hook is not None)
        plans = [backend.plan(it, opt.stochastic_rounding, opt.sum_hook) for it in step.items]
        if not step.plain and backend.name == "engine":
            for rec in step.records:
                if rec.device_hyper is not None:
                    rec.fill_device_hyper()
                    for c in rec.calls:
                        if c.plan.hyper is None:
                            c.plan.set_device_hyper(rec.device_hyper)
        refusal = run_step(backend, plans, check=check, flag=flag, agreement=agreement,
                           capturable=step.capturable)
        device = None if flag is None else flag.device
        if refusal is not None:
            raise FloatingPointError(refusal.message(groups, calls, device,
                                                     agreed=agreement is not None))
        if flag is not None and step.capturable:
            # No host read (it would break graph capture): the step was skipped on the device
            # if flagged; count it there.
            opt._skipped[device].add_(flag[0].ne(0))
        elif flag is not None and agreement is None:
            code = int(flag.item()) - 1  # one device-to-host read: the documented cost
            if code >= 0:  # the kernels skipped the step on the device
                raise FloatingPointError(Refusal.from_code(code).message(groups, calls, device))
        if not step.plain:
            for c in calls:
                c.copy_out()
        self.advance(groups, flag if step.capturable else None)
        if (grad_of is None and step.plain and backend.name == "engine"
                and opt.sum_hook is None and len(step.records) == len(groups)
                and all(len(r.active) == len(g["params"]) for r, g in zip(step.records, groups))):
            self.steady = step.records

    def run_steady(self, opt) -> bool:
        """The step of an optimizer whose groups, tensors and settings are those of its last
        step, plain and whole (a training loop's usual step): per group the identity checks
        of :meth:`record`, the record's own :meth:`GroupRecord.fits` and the calls' gradients
        (:meth:`EngineCall.grads`), then one engine call. False, with nothing done, when
        anything differs: :meth:`run` then takes its general path (on a small model its
        bookkeeping costs more than the update itself)."""
        records, groups = self.steady, opt.param_groups
        if len(groups) != len(records) or opt.sum_hook is not None:
            return False
        state, version, sr = opt.state, self.version, opt.stochastic_rounding
        plans, calls = [], []
        for gi, (rec, group) in enumerate(zip(records, groups)):
            step = group["step"]
            if (self.records.get(gi) is not rec or type(step) is not int or not step
                    or not all(map(operator.is_, raw_hyper(group), rec.raw))
                    or not all(map(operator.is_, raw_structure(group), rec.structure))):
                return False
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads) or not rec.fits(group, params, state, version):
                return False
            # (Plans set here and then not run are set again by the general path.)
            for c in rec.calls:
                c.plan.set_fast(c.grads(group, grads), rec.hyper, step, False, sr)
                plans.append(c.plan)
                calls.append(c)
        refusal = run_step(BACKENDS["engine"], plans, check=opt.check_finite, flag=None,
                           agreement=None, capturable=False)
        if refusal is not None:
            raise FloatingPointError(refusal.message(groups, calls))
        self.advance(groups, None)
        return True

    def advance(self, groups, flag: Optional[torch.Tensor]) -> None:
        """Counts the step. A device counter of a capturable step advances only where the step
        was not skipped on the device (torch's rule for found_inf), so a skipped step draws the
        noise again as the eager run that refused it does."""
        for gi, group in enumerate(groups):
            s = group["step"]
            if isinstance(s, torch.Tensor):
                if flag is not None and s.device == flag.device:
                    s += flag[0].eq(0)
                else:
                    s += 1
                self.host_steps[gi] = self.host_step(gi, group) + 1
            else:
                group["step"] = s + 1

    def flag(self, device: torch.device, skipped: Dict[torch.device, torch.Tensor]
             ) -> torch.Tensor:
        """The device's non-finite flag, with its skip counter in ``skipped``."""
        f = self.flags.get(device)
        if f is None:
            # Made together and outside any graph capture (an eager step precedes it), so that
            # a captured step only ever updates them.
            f = self.flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
            skipped.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
            self.dirty = True
        return f

    def rollback(self, state) -> None:
        """Forgets the momenta and ξ a failed step created (a retry starts afresh)."""
        keys = {"momentum": ("momentum_buffer",), "mass": ("exp_avg_sq", "mass_start")}
        for kind, obj, old in reversed(self.created):
            if kind == "xi":
                obj["xi"] = old
                continue
            st = state.get(obj)
            if st is not None:
                for key in keys[kind]:
                    st.pop(key, None)
                if not st:
                    del state[obj]
        if self.created:
            self.records.clear()
            self.dirty = True

    def check_capture(self, opt, grad_of) -> None:
        """Inside CUDA graph capture only device work is recorded: every group must keep its
        counter on the device, and the first step (a different program) must run eagerly."""
        # (A capture needs CUDA initialised: asking that first is cheaper than is_available.)
        if not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return
        if opt.backend == "reference":
            raise RuntimeError("step() is being captured into a CUDA graph, but "
                               "backend='reference' reads its step counter on the host; "
                               "use backend='engine' with capturable=True")
        for gi, group in enumerate(opt.param_groups):
            wh = where(gi, group)
            p = next((p for p in group["params"]
                      if (p.grad if grad_of is None else grad_of(p)) is not None), None)
            if p is None:
                continue
            s = group["step"]
            known = not isinstance(s, torch.Tensor) or gi in self.host_steps
            if not known or self.host_step(gi, group) == 0:
                raise RuntimeError(
                    f"{wh}the first step of a scheme runs a different program and cannot be "
                    f"captured: take at least one eager step (warm-up, as torch.cuda.graphs "
                    f"recommends) before capturing")
            if dist_glue.local(p).device.type != "cuda" or not group["capturable"]:
                raise RuntimeError(
                    f"{wh}step() is being captured into a CUDA graph; that needs CUDA "
                    f"parameters and capturable=True (the step counter then lives on the "
                    f"device), got capturable={group['capturable']} on "
                    f"{dist_glue.local(p).device}")
