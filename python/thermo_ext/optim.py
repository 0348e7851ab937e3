"""The torch.optim surface of thermo_ext: :class:`Thermo` (docs/DESIGN.md, "The optimizer").

Every param group (partition) runs its own scheme with its own hyperparameters, ``lr`` being the
step size h. Like torch.optim's optimizers, ``step()`` gathers each group's tensors
(:mod:`thermo_ext.groups`) and hands them to a functional core: a backend
(:mod:`thermo_ext.backends`: the compiled engine, or the plain-torch reference) run in the order
:func:`~thermo_ext.backends.run_step` fixes. Under ``torch.compile`` the same core runs as one
torch.library op (:mod:`thermo_ext.ops`), so the compiled step has no graph break.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import checkpoint, kernels, ops
from . import distributed as dist_glue
from ._compat import (GLOBAL_STEP_POST_HOOKS, GLOBAL_STEP_PRE_HOOKS, dtensor_type,
                      profiler_enabled, set_grad_enabled)
from .backends import BACKENDS, Refusal, run_step
from .distributed import Agreement
from .fallback import choose as choose_backend
from .groups import (HYPER_KEYS, MAX_GROUPS, STRUCTURE_KEYS, EngineCall, GroupRecord,
                     build_calls, check_group, group_xi, hyper_values, momentum_buffers,
                     param_label, where)
from .schemes import FoldedScheme, fold
from .stability import StabilityMonitor

__all__ = ["Thermo"]

_HYPER = operator.itemgetter(*HYPER_KEYS)
_STRUCTURE = operator.itemgetter(*STRUCTURE_KEYS)


def _GRAD(p: torch.Tensor) -> Optional[torch.Tensor]:
    return p.grad


def _addresses(params) -> tuple:
    """Where the engine finds each parameter (a DTensor: its local shard)."""
    dtensor = dtensor_type()
    return tuple([p.data_ptr() if type(p) is not dtensor else p.to_local().data_ptr()
                  for p in params])


class _Steady:
    """What :meth:`Thermo._steady_step` repeats: per group its record and, per engine call, the
    plan and the positions of its parameters; the calls and plans in step order."""

    __slots__ = ("groups", "calls", "plans")

    @staticmethod
    def of(opt, calls) -> "Optional[_Steady]":
        """For a step of ``calls`` that the steady path can repeat: every group moves all its
        parameters (real, plain tensors on the CPU, each one engine call of its own), with
        host step counters and float hyperparameters; otherwise None."""
        groups = []
        for gi, group in enumerate(opt.param_groups):
            rec = opt._records.get(gi)
            if (rec is None or rec.dtensor or rec.on_device or rec.tensor_hyper
                    or rec.device_hyper is not None or type(group["step"]) is not int
                    or rec.active != tuple(range(len(group["params"])))):
                return None
            places = []
            for c in rec.calls:
                if (c.chain is not None or c.staged or c.xi_index is not None or c.plan is None
                        or c.sum_hook is not None
                        or any(p is not q for p, q in zip(c.params, c.sources))):
                    return None
                places.append((c.plan, list(c.positions)))
            groups.append((rec, places))
        steady = _Steady()
        steady.groups, steady.calls = groups, list(calls)
        steady.plans = [c.plan for c in calls]
        return steady


def _draw_seed() -> int:
    """A uint64 from torch's default generator, so torch.manual_seed makes runs reproducible."""
    hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def _check_torch_keywords(foreach, fused, differentiable) -> None:
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


#: What the refusal message of each kind of non-finite value suggests (docs/GUIDE.md §5).
_LIKELY_CAUSE = {
    "gradient": ("A loss that overflows within a few steps means a step too large for this "
                 "model: lower lr (the step h, now {lr:g}); later in training, look for "
                 "inf/NaN in the batch or the loss."),
    "parameter": ("It was set outside the optimizer, or written by an earlier step that "
                  "overflowed or ran with check_finite=False."),
    "momentum": ("It was set outside the optimizer (opt.state), or written by an earlier step "
                 "that overflowed or ran with check_finite=False."),
}


class Thermo(Optimizer):
    r"""Partitioned thermodynamic optimizer: one scheme and temperature per param group.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer; parameters may
            be given as ``(name, tensor)`` pairs (``model.named_parameters()``), which errors
            then name.
        lr: the step size h (torch's LR schedulers change it; a 1-element tensor is accepted).
        scheme: ``"langevin"`` (BAOAB), ``"adl"`` (BACDEDCAB), ``"overdamped"`` or any valid
            string over A B O C D E, e.g. ``"OBABO"`` (see :mod:`thermo_ext.schemes`).
        gamma: friction of O (``math.inf`` allowed: O then resamples p).
        tau: temperature (0 allowed: deterministic dynamics).
        sigma: noise amplitude of D. eps: thermostat coupling of E. xi0: initial thermostat ξ.
        weight_decay: λ, added to the gradient in B as λθ.
        thermostat: ``"tensor"`` (one ξ per tensor) or ``"group"`` (one ξ per group).
        momentum_init: ``"zero"`` (the paper's code) or ``"thermal"`` (p ~ N(0, τ)).
        seed: uint64 key of the noise; drawn from torch's default generator when None (and taken
            from rank 0 under an initialised process group).
        capturable: keep the step counter on the device so CUDA graphs can capture ``step()``.
        chains: K > 0 when every parameter stacks K independent chains on its first dimension
            (see :class:`thermo_ext.Chains`): each chain gets its own noise (seed
            ``te.random.chain_seed(seed, k)``) and its own thermostats, ``thermostat="chain"``
            (or "tensor") giving one ξ per chain per tensor and "group" one per chain.
        maximize: run the dynamics of −L (B sees −g), i.e. sample exp(+L/τ) or ascend L.
        foreach, fused, differentiable: torch.optim's keywords, accepted where they hold (the
            engine is fused and multi-tensor; a step is not differentiable): ``foreach`` None or
            False, ``fused`` None or True, ``differentiable`` False; others raise ValueError.
        check_finite: check parameters and gradients (and the thermostat) for non-finite values
            before anything is written; a failed check raises ``FloatingPointError`` naming the
            parameter and leaves every parameter, momentum and ξ unchanged — on every rank of a
            sharded (FSDP2) run, whose ranks agree on the verdict first. Costs one read-only
            pass over θ and g for schemes without E; for schemes with E a read of θ in their
            first, read-only phase (which reads only p and g unchecked, unless weight decay).
            On CUDA it costs one device-to-host read per step, unless ``capturable``, where a
            flagged step is skipped on the device instead of raising (its step counter does
            not advance) and counted by :meth:`skipped_steps`.
        check_stability: every 16 steps, look for a group running away while still finite
            (its parameters' RMS growing by large factors) and warn once per group with an
            :class:`thermo_ext.InstabilityWarning` (see :mod:`thermo_ext.stability`).
        stochastic_rounding: bf16 parameters are rounded stochastically from float32 results.
        backend: None (the default: the compiled engine, and on a CUDA device where no fused
            engine can run the torch-op fallback, with one warning; :mod:`thermo_ext.fallback`),
            ``"engine"`` (the compiled engine only: raises where it cannot run) or
            ``"reference"`` (plain torch, slow; the oracle).

    Complex parameters are stepped as their real views (``torch.view_as_real``): every real
    component gets its own noise, and a thermostat counts real components.
    """

    def __init__(self, params, lr: float = 0.1, scheme: str = "langevin", gamma: float = 1.0,
                 tau: float = 1e-4, sigma: float = 0.01, eps: float = 0.05, xi0: float = 0.1,
                 weight_decay: float = 0.0, thermostat: str = "tensor",
                 momentum_init: str = "zero", seed: Optional[int] = None,
                 capturable: bool = False, *, chains: int = 0, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None,
                 differentiable: bool = False, check_finite: bool = True,
                 check_stability: bool = True, stochastic_rounding: bool = True,
                 backend: Optional[str] = None):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected None or one of {tuple(BACKENDS)}, got "
                             f"{backend!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected a bool, got {check_finite!r}")
        _check_torch_keywords(foreach, fused, differentiable)
        if seed is None:
            seed = _draw_seed()
        kernels.check_int("seed", seed, 0, kernels.U64)
        seed = dist_glue.broadcast_seed(seed)
        defaults = dict(lr=lr, scheme=scheme, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                        xi0=xi0, weight_decay=weight_decay, thermostat=thermostat,
                        momentum_init=momentum_init, seed=seed, capturable=capturable,
                        chains=chains, maximize=maximize, foreach=foreach, fused=fused,
                        differentiable=differentiable)
        check_group(defaults, "")
        self.check_finite = check_finite
        if not isinstance(check_stability, bool):
            raise TypeError(f"check_stability: expected a bool, got {check_stability!r}")
        self.check_stability = check_stability
        self.stochastic_rounding = bool(stochastic_rounding)
        self.backend = backend
        #: Optional hook(sums) reducing each E's segment sums in place (distributed training).
        self.sum_hook: Optional[Callable[[torch.Tensor], None]] = None
        self._skipped: Dict[torch.device, torch.Tensor] = {}  # capturable steps skipped on device
        self._reset_runtime()
        super().__init__(params, defaults)
        self._refresh_compiled_lists()

    def _reset_runtime(self) -> None:
        """What a step keeps for the next one and a copy rebuilds (never copied or pickled: the
        engine's plans hold raw addresses)."""
        self._records: Dict[int, GroupRecord] = {}
        self._steady: Optional[_Steady] = None  # what the next step may repeat as it is
        self._host_steps: Dict[int, int] = {}
        self._flags: Dict[torch.device, torch.Tensor] = {}
        self._created: list = []  # state created by the running step (undone if it fails)
        self._version = 0  # bumped whenever state is replaced wholesale
        self._handle = ops.register(self)
        self._stability = StabilityMonitor()  # a copy watches its own run afresh
        self._params: List[torch.Tensor] = []  # what a compiled step hands its op
        self._state_tensors: List[torch.Tensor] = []
        self._lists_dirty = True

    # ----------------------------------------------------------------------------- copies
    #: What a copy or unpickled optimizer rebuilds instead of carrying: the step's caches (the
    #: engine's plans hold raw addresses of the original's tensors) and, as torch.optim does,
    #: the hooks.
    _NOT_COPIED = ("_records", "_steady", "_host_steps", "_created", "_handle", "_params",
                   "_state_tensors", "_lists_dirty", "_stability",
                   "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                   "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                   "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # also load_state_dict's way of installing a state
        if "_records" not in self.__dict__:  # a copy or an unpickled optimizer
            self.__dict__.setdefault("sum_hook", None)
            self.__dict__.setdefault("_skipped", {})
            self._reset_runtime()
            self._refresh_compiled_lists()

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        gi = len(self.param_groups)
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"param group {gi}: expected a dict with a 'params' entry")
        wh = where(gi, param_group)
        if gi >= MAX_GROUPS:
            raise ValueError(f"{wh}at most {MAX_GROUPS} param groups")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_group(merged, wh)
        _check_torch_keywords(merged["foreach"], merged["fused"], merged["differentiable"])
        params = param_group["params"]
        # A list now: a generator would be used up here and reach torch empty.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not params:
            raise ValueError(f"{wh}no parameters (an empty list, or a generator already used "
                             f"up, e.g. model.parameters() passed to two groups)")
        if len(params) >= MAX_GROUPS:
            raise ValueError(f"{wh}at most {MAX_GROUPS - 1} tensors per group")
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        if len({id(p) for p in tensors}) != len(tensors):
            # torch only warns; the engine would move such a tensor twice per step
            raise ValueError(f"{wh}a parameter appears more than once in the group")
        param_group = {**param_group, "params": params}
        if ("param_names" not in param_group and all(map(operator.is_, tensors, params))
                and any("param_names" in g for g in self.param_groups)):
            # The named methods name every parameter of a module; torch wants names on every
            # group or on none, so a group added without them gets names that say where.
            param_group["param_names"] = [f"param_groups.{gi}.{k}" for k in range(len(params))]
        super().add_param_group(param_group)
        self._version += 1
        self._lists_dirty = True
        group = self.param_groups[-1]
        group["step"] = 0
        group["xi"] = None  # created on the group's device at its first step

    @staticmethod
    def _scheme(group) -> FoldedScheme:
        return fold(group["scheme"])  # cached by schemes.fold

    # ----------------------------------------------------------------------------- step
    def _record(self, gi: int, group: Dict[str, Any], grad_of) -> Optional[GroupRecord]:
        """The group's calls for this step, rebuilt only when its tensors, buffers or
        structural settings change; hyperparameters are revalidated whenever they change.
        None when no parameter of the group has a gradient. (The hot path of a small model's
        step: what did not change is recognised by identity.)"""
        params = group["params"]
        active = tuple([k for k, p in enumerate(params) if grad_of(p) is not None])
        if not active:
            return None
        rec = self._records.get(gi)
        raw = _HYPER(group)
        structure = _STRUCTURE(group)
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
        moving = [params[k] for k in active]
        if (rec is None or active != rec.active or structure != rec.structure
                or not self._fits(rec, group, moving)):
            calls = build_calls(gi, group, scheme, active, self.state, self._created,
                                dist_glue.mesh_sum_hook)
            # ξ, momenta and the step counter are made while building: key those made
            rec = GroupRecord(active=active, addresses=_addresses(moving),
                              momenta=momentum_buffers(self.state, moving),
                              buffers=self._buffers_id(group), version=self._version,
                              structure=structure, raw=raw, hyper=hyper, scheme=scheme,
                              calls=calls, capturable=group["capturable"])
            self._records[gi] = rec
            self._lists_dirty = True
        else:
            rec.raw, rec.hyper = raw, hyper
        return rec

    def _fits(self, rec: GroupRecord, group: Dict[str, Any], moving: list) -> bool:
        """Whether ``rec``'s engine calls still fit the tensors ``moving``: what a record keys
        on besides the group's settings (the optimizer's state version, the group's ξ and
        counter, the tensors' addresses and their momentum buffers)."""
        s = group["step"]  # _buffers_id written out: the shortcut runs this every step
        return (self._version == rec.version
                and rec.buffers == (id(group["xi"]),
                                    id(s) if isinstance(s, torch.Tensor) else None)
                and rec.addresses == _addresses(moving)
                and all(map(operator.is_, momentum_buffers(self.state, moving), rec.momenta)))

    @staticmethod
    def _buffers_id(group):
        s = group["step"]
        return id(group["xi"]), id(s) if isinstance(s, torch.Tensor) else None

    def _host_step(self, gi, group) -> int:
        s = group["step"]
        if isinstance(s, torch.Tensor):
            if gi not in self._host_steps:
                self._host_steps[gi] = int(s)
            return self._host_steps[gi]
        return s

    def _flag(self, device: torch.device) -> torch.Tensor:
        f = self._flags.get(device)
        if f is None:
            # Made together and outside any graph capture (an eager step precedes it), so that
            # a captured step only ever updates them.
            f = self._flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
            self._skipped.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
            self._lists_dirty = True
        return f

    def _raise(self, refusal: Refusal, calls: List[EngineCall], device=None,
               agreed: bool = False):
        anywhere = " on any rank" if agreed else ""
        found = "" if refusal.rank is None else f" on rank {refusal.rank}"
        if refusal.task is None:  # only the device flag knows
            raise FloatingPointError(
                f"a non-finite {refusal.kind} was found on {device}{found} (entry "
                f"{refusal.index} of a call); the step was skipped and nothing was "
                f"updated{anywhere}")
        call = calls[refusal.task]
        group = self.param_groups[call.group_index]
        wh = where(call.group_index, group)
        if refusal.kind == "thermostat":
            what = ("the group's thermostat" if group["thermostat"] == "group" else
                    f"the thermostat of {param_label(group, call.positions[refusal.index])}")
            raise FloatingPointError(
                f"{wh}{what} overflowed{found} (xi or exp(-xi delta) is not finite); nothing "
                f"was updated{anywhere}. Lower eps or lr, or check the loss scale")
        pos = call.positions[refusal.index]
        shape = tuple(group["params"][pos].shape)
        raise FloatingPointError(
            f"{wh}{param_label(group, pos)} of shape {shape} has a non-finite "
            f"{refusal.kind}{found} at step {int(group['step'])} of its group; nothing was "
            f"updated{anywhere}. {_LIKELY_CAUSE[refusal.kind].format(lr=float(group['lr']))} "
            f"(check_finite=False skips this check)")

    def _patch_step_function(self) -> None:
        # torch wraps step() in a profiler record_function on every call, which costs more
        # than a small model's whole update; step() below runs the same hooks itself and
        # opens the record_function only while a profiler is running.
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of every group's scheme from the gradients in ``.grad``. A step that raises
        changes nothing: no parameter, momentum, ξ or counter, and no state it created.
        Step pre/post hooks (global and registered) run as for any torch optimizer."""
        args, kwargs = (self,), {"closure": closure}
        if GLOBAL_STEP_PRE_HOOKS or self._optimizer_step_pre_hooks:
            for pre_hook in (*GLOBAL_STEP_PRE_HOOKS.values(),
                             *self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"step pre hook must return None or (new_args, "
                                           f"new_kwargs), got {result}")
                    args, kwargs = result
        if profiler_enabled():
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                loss = self._step_with_closure(*args[1:], **kwargs)
        else:
            loss = self._step_with_closure(*args[1:], **kwargs)
        self._optimizer_step_code()
        if self._optimizer_step_post_hooks or GLOBAL_STEP_POST_HOOKS:
            for post_hook in (*self._optimizer_step_post_hooks.values(),
                              *GLOBAL_STEP_POST_HOOKS.values()):
                post_hook(self, args, kwargs)
        return loss

    def _step_with_closure(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            # What torch.compile traces: one op that declares every tensor the step reads and
            # writes. The lists are plain attributes, so the graph does not specialise on the
            # param groups' values (a scheduler's new lr needs no recompilation); the op reads
            # them when it runs.
            params = [p for p in self._params if p.grad is not None]
            if params:
                with torch.no_grad():
                    torch.ops.thermo_ext.step(self._handle, params, self._state_tensors,
                                              [p.grad for p in params])
            return loss
        self._step_undoable()
        return loss

    def _step_undoable(self, grad_of=_GRAD) -> None:
        self._created = []
        grad_mode = torch.is_grad_enabled()
        set_grad_enabled(False)  # torch.no_grad, without its context manager's cost
        try:
            self._step(grad_of)
        except BaseException:
            self._rollback()
            raise
        finally:
            set_grad_enabled(grad_mode)
            self._created = []
            if self._lists_dirty:
                self._refresh_compiled_lists()
        # After the step is complete (a warning turned into an error must not undo it).
        if self.check_stability:
            self._stability.observe(self)

    def _rollback(self) -> None:
        """Forgets the momenta and ξ a failed step created (a retry starts afresh)."""
        for kind, obj, old in reversed(self._created):
            if kind == "momentum":
                st = self.state.get(obj)
                if st is not None:
                    st.pop("momentum_buffer", None)
                    if not st:
                        del self.state[obj]
            else:
                obj["xi"] = old
        if self._created:
            self._records.clear()
            self._lists_dirty = True

    def _check_capture(self, grad_of) -> None:
        """Inside CUDA graph capture only device work is recorded: every group must keep its
        counter on the device, and the first step (a different program) must run eagerly."""
        # (A capture needs CUDA initialised: asking that first is cheaper than is_available.)
        if not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return
        if self.backend == "reference":
            raise RuntimeError("step() is being captured into a CUDA graph, but "
                               "backend='reference' reads its step counter on the host; "
                               "use backend='engine' with capturable=True")
        for gi, group in enumerate(self.param_groups):
            wh = where(gi, group)
            p = next((p for p in group["params"] if grad_of(p) is not None), None)
            if p is None:
                continue
            s = group["step"]
            known = not isinstance(s, torch.Tensor) or gi in self._host_steps
            if not known or self._host_step(gi, group) == 0:
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

    def _step(self, grad_of) -> None:
        """The step (the functional core both ``step()`` and the compiled op run), with the
        gradients ``grad_of(parameter)`` (None: the parameter does not move)."""
        self._check_capture(grad_of)
        if grad_of is _GRAD and self._steady is not None and self._steady_step():
            return
        self._steady = None
        calls, hyper, steps, groups, device_hyper = [], [], [], [], []
        on_device = dtensor = capturable = False
        for gi, group in enumerate(self.param_groups):
            rec = self._record(gi, group, grad_of)
            if rec is None:
                continue
            host_step = self._host_step(gi, group)
            n = len(rec.calls)
            calls += rec.calls
            hyper += [rec.hyper] * n
            steps += [host_step] * n
            groups += [group] * n
            on_device |= rec.on_device
            dtensor |= rec.dtensor
            if rec.device_hyper is not None:
                device_hyper.append(rec)
            # The first step runs eagerly (it is never captured): there a capturable group
            # raises like any other instead of skipping on the device.
            capturable |= group["capturable"] and host_step > 0
        if not calls:
            self._advance(None)
            return
        grads = [c.grads(g, grad_of) for c, g in zip(calls, groups)]
        for c in calls:
            if c.xi_index is not None:
                torch.index_select(c.xi_full, 0, c.xi_index, out=c.xi)
            for src, buf in c.staged:  # parameters of any other layout: a contiguous copy
                buf.copy_(src)
        check = self.check_finite
        backend = choose_backend(self.backend, calls, on_device)
        flag = None
        if check and on_device and backend.name == "engine":
            devices = {c.params[0].device for c in calls}
            if len(devices) > 1:  # one flag per step: keep the fast path to one device
                raise ValueError("check_finite with CUDA needs all groups on one device")
            flag = self._flag(devices.pop())
            flag.zero_()
        tasks = backend.tasks(calls, grads, hyper, steps, self.stochastic_rounding, self.sum_hook)
        if backend.name == "engine":
            for rec in device_hyper:
                rec.fill_device_hyper()
                for c in rec.calls:
                    if c.plan.hyper is None:
                        c.plan.set_device_hyper(rec.device_hyper)
        agreement = None
        if check and (dtensor or self.sum_hook is not None):
            agreement = Agreement.for_tensors([c.sources[0] for c in calls if c.dtensor],
                                              self.sum_hook is not None)
        refusal = run_step(backend, tasks, check=check, flag=flag, agreement=agreement,
                           capturable=capturable)
        if refusal is not None:
            self._raise(refusal, calls, None if flag is None else flag.device,
                        agreed=agreement is not None)
        if flag is not None and capturable:
            # No host read (it would break graph capture): the step was skipped on the device
            # if flagged; count it there.
            self._skipped[flag.device].add_(flag[0].ne(0))
        elif flag is not None and agreement is None:
            code = int(flag.item()) - 1  # one device-to-host read: the documented cost
            if code >= 0:  # the kernels skipped the step on the device
                self._raise(Refusal.from_flag(code), calls, flag.device)
        for c in calls:
            if c.xi_index is not None:
                c.xi_full.index_copy_(0, c.xi_index, c.xi)
            for src, buf in c.staged:
                src.copy_(buf)
        self._advance(flag if capturable else None)
        if grad_of is _GRAD and flag is None and agreement is None and backend.name == "engine":
            self._steady = _Steady.of(self, calls)

    def _steady_step(self) -> bool:
        """The step of an optimizer whose groups, tensors and settings are those of its last
        step (a training loop's usual step): the checks of ``_record`` by identity, then the
        plans' gradients and counters, then one engine call. False, with nothing done, when
        anything differs: ``_step`` then takes its general path. (On a small model the
        general path's bookkeeping costs more than the update itself.)"""
        steady, groups = self._steady, self.param_groups
        if len(groups) != len(steady.groups) or self.sum_hook is not None:
            return False
        settings = []
        for gi, ((rec, places), group) in enumerate(zip(steady.groups, groups)):
            step = group["step"]
            if (self._records.get(gi) is not rec or type(step) is not int or step == 0
                    or not all(map(operator.is_, _HYPER(group), rec.raw))
                    or not all(map(operator.is_, _STRUCTURE(group), rec.structure))):
                return False
            params = group["params"]
            grads = [p.grad for p in params]
            if (len(grads) != len(rec.active) or any(g is None for g in grads)
                    or not self._fits(rec, group, params)
                    or not all(g.layout is torch.strided and g.is_contiguous() for g in grads)):
                return False
            for plan, positions in places:
                settings.append((plan, [grads[k] for k in positions], rec.hyper, step))
        sr = self.stochastic_rounding
        for plan, grads, hyper, step in settings:
            plan.set_fast(grads, hyper, step, False, sr)
        refusal = run_step(BACKENDS["engine"], steady.plans, check=self.check_finite, flag=None,
                           agreement=None, capturable=False)
        if refusal is not None:
            self._raise(refusal, steady.calls, None, agreed=False)
        self._advance(None)
        return True

    def _advance(self, flag: Optional[torch.Tensor]) -> None:
        """Counts the step. A device counter of a capturable step advances only where the step
        was not skipped on the device (torch's rule for found_inf), so a skipped step draws the
        noise again as the eager run that refused it does."""
        for gi, group in enumerate(self.param_groups):
            s = group["step"]
            if isinstance(s, torch.Tensor):
                if flag is not None and s.device == flag.device:
                    s += flag[0].eq(0)
                else:
                    s += 1
                self._host_steps[gi] = self._host_step(gi, group) + 1
            else:
                group["step"] = s + 1

    # ----------------------------------------------------------------------------- compile
    def _refresh_compiled_lists(self) -> None:
        """The tensors a compiled step hands its op: every parameter, and every state tensor
        the step writes (momenta, ξ, device step counters, the device flag and skip counter).
        A new list whenever they change, so a compiled graph made before sees the change (its
        guards fail and it recompiles once)."""
        params = [p for g in self.param_groups for p in g["params"]]
        state = [st["momentum_buffer"] for p in params
                 if (st := self.state.get(p)) is not None and "momentum_buffer" in st]
        for g in self.param_groups:
            state.extend(t for t in (g["xi"], g["step"]) if isinstance(t, torch.Tensor))
        state.extend(self._flags.values())
        state.extend(self._skipped.values())
        self._params, self._state_tensors = params, state
        self._lists_dirty = False

    # ----------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def kinetic_temperature(self) -> List[Optional[torch.Tensor]]:
        """Per group: Σp²/N over its momenta, a 0-dim tensor (shape [chains] for stacked
        chains); None for overdamped groups. Sharded (DTensor) momenta are summed over ranks;
        complex momenta count their real components."""
        out = []
        for group in self.param_groups:
            if not self._scheme(group).uses_momentum:
                out.append(None)
                continue
            chains = group["chains"]
            total, n, device = None, 0, None
            for p in group["params"]:
                device = device or p.device
                n += p.numel() * (2 if p.is_complex() else 1) // max(chains, 1)
                m = self.state.get(p, {}).get("momentum_buffer")
                if m is None:
                    continue
                mm = dist_glue.local(m)
                sq = (torch.view_as_real(mm) if mm.is_complex() else mm).double().pow(2)
                s = sq.reshape(chains, -1).sum(1) if chains else sq.sum()
                total = dist_glue.all_reduce_sum(s, m) if total is None else (
                    total + dist_glue.all_reduce_sum(s, m))
            if total is None:
                total = torch.zeros((chains,) if chains else (), dtype=torch.float64,
                                    device=device)
            out.append(total / max(n, 1))
        return out

    def thermostats(self) -> List[List[torch.Tensor]]:
        """Per group: its ξ tensors, empty for schemes without E. Each is a 0-dim view (shape
        [chains] for stacked chains) of the group's thermostat buffer."""
        out = []
        for group in self.param_groups:
            scheme = self._scheme(group)
            if not scheme.n_e:
                out.append([])
                continue
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            xi = group_xi(group, scheme, device, [])
            out.append([xi[..., k] for k in range(xi.shape[-1])])
        return out

    def skipped_steps(self) -> torch.Tensor:
        """Steps skipped on the device because of a non-finite value, with ``capturable=True``
        (where ``step()`` cannot raise without a host read): a 0-dim int64 tensor on the device,
        counted without synchronising; read it where you synchronise anyway (logging). Zero
        when no step was skipped; steps that raised are not counted."""
        if not self._skipped:
            return torch.zeros((), dtype=torch.int64)
        return sum(self._skipped.values())

    @property
    def seed(self) -> int:
        return self.defaults["seed"]

    # ----------------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch.optim's: the load_state_dict pre hooks run first and what they return is
        loaded — after validating all of it (shapes, dtypes, scheme, seed, step, finite
        values): a bad state dict raises ValueError and changes nothing."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for pre_hook in pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = checkpoint.with_optional_keys(state_dict)
        checkpoint.validate(self.param_groups, state_dict)
        saved_moms = checkpoint.saved_momenta(self.param_groups, state_dict)
        # torch's load runs the hooks itself: the pre hooks ran above, the post hooks run once
        # the whole state (our momenta included) is in place.
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        self._host_steps.clear()
        self._records.clear()
        self._version += 1
        self._lists_dirty = True
        for p, m in saved_moms.items():
            # Our own copy (torch would alias the saved tensor, and cast the float32 momenta of
            # bf16/fp16 parameters to the parameter dtype).
            self.state[p]["momentum_buffer"] = m.detach().to(
                device=p.device, dtype=kernels.momentum_dtype(p.dtype) if not p.is_complex()
                else p.dtype, copy=True)
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            if isinstance(group.get("xi"), torch.Tensor):
                group["xi"] = group["xi"].detach().to(device=device, dtype=torch.float64,
                                                      copy=True)
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = group["step"].detach().to(device=device, copy=True)
        self._refresh_compiled_lists()
        for post_hook in post_hooks.values():
            post_hook(self)
