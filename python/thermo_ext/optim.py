"""The torch.optim surface of thermo_ext: :class:`Thermo` (docs/DESIGN.md, "The optimizer").

Every param group (partition) runs its own scheme with its own hyperparameters, ``lr`` being the
step size h. Like torch.optim's optimizers, the class gathers; a functional core steps:
:class:`~thermo_ext.stepping.StepCache` turns the groups into engine calls and hands them to a
backend (:mod:`thermo_ext.backends`: the compiled engine, or the plain-torch reference) in the
order :func:`~thermo_ext.backends.run_step` fixes. Under ``torch.compile`` the same core runs as
one torch.library op (:mod:`thermo_ext.ops`), so the compiled step has no graph break.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import checkpoint, ops, reference
from . import distributed as dist_glue
from . import random as te_random
from ._compat import (GLOBAL_STEP_POST_HOOKS, GLOBAL_STEP_PRE_HOOKS, profiler_enabled,
                      set_grad_enabled)
from .backends import BACKENDS
from .calls import group_xi
from .groups import MAX_GROUPS, check_group, check_options, check_torch_keywords
from .naming import where
from .schemes import FoldedScheme, fold
from .stability import StabilityMonitor
from .stepping import StepCache

__all__ = ["Thermo"]


def _real_local(t: torch.Tensor) -> torch.Tensor:
    """A state tensor's local shard, complex ones as real views."""
    t = dist_glue.local(t)
    return torch.view_as_real(t) if t.is_complex() else t


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
        momentum_init: ``"zero"`` (the paper's code), ``"thermal"`` (p ~ N(0, τ)) or ``"terminal"``
            (the steady momentum of the first gradient: the first step is a full step, as Adam's
            bias-corrected first step; docs/DESIGN.md, Initial momentum).
        seed: uint64 key of the noise; drawn from torch's default generator when None (and taken
            from rank 0 under an initialised process group).
        capturable: keep the step counter on the device so CUDA graphs can capture ``step()``.
        chains: K > 0 when every parameter stacks K independent chains on its first dimension
            (see :class:`thermo_ext.Chains`): each chain gets its own noise (seed
            ``te.random.chain_seed(seed, k)``) and its own thermostats, ``thermostat="chain"``
            (or "tensor") giving one ξ per chain per tensor and "group" one per chain.
        maximize: run the dynamics of −L (B sees −g), i.e. sample exp(+L/τ) or ascend L.
        mass: ``"unit"`` (the paper's H = L + |p|²/2) or ``"adaptive"``: a diagonal mass
            m = √v̂ + ``mass_eps`` from the second moment v of the force g + λθ (an EMA with
            decay ``mass_beta`` and Adam's bias correction), so that every coordinate moves on
            its own scale as with Adam (docs/DESIGN.md, Mass); the named methods' default. ``mass_freeze``: hold m after that many
            steps of each tensor (then the dynamics sample exp(−L/τ) exactly); None: adapt at
            every step.
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
            (its parameters' RMS growing by large factors), and every 8 steps for a layer
            thrown back and forth (steps of a fifth of its size, twice in a row), and warn
            once per group with an :class:`thermo_ext.InstabilityWarning` (see
            :mod:`thermo_ext.stability`).
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
                 mass: str = "unit", mass_beta: float = 0.999, mass_eps: float = 1e-8,
                 mass_freeze: Optional[int] = None,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None,
                 differentiable: bool = False, check_finite: bool = True,
                 check_stability: bool = True, stochastic_rounding: bool = True,
                 backend: Optional[str] = None):
        check_options(backend, BACKENDS, dict(check_finite=check_finite,
                                              check_stability=check_stability))
        check_torch_keywords(foreach, fused, differentiable)
        seed = dist_glue.broadcast_seed(te_random.draw_seed() if seed is None else
                                        te_random.check_seed(seed))
        defaults = dict(lr=lr, scheme=scheme, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                        xi0=xi0, weight_decay=weight_decay, thermostat=thermostat,
                        momentum_init=momentum_init, seed=seed, capturable=capturable,
                        chains=chains, maximize=maximize, mass=mass, mass_beta=mass_beta,
                        mass_eps=mass_eps, mass_freeze=mass_freeze, foreach=foreach, fused=fused,
                        differentiable=differentiable)
        check_group(defaults, "")
        self.check_finite = check_finite
        self.check_stability = check_stability
        self.stochastic_rounding = bool(stochastic_rounding)
        self.backend = backend
        #: Optional hook(sums) reducing each E's segment sums in place (distributed training).
        self.sum_hook: Optional[Callable[[torch.Tensor], None]] = None
        self._skipped: Dict[torch.device, torch.Tensor] = {}  # capturable steps skipped on device
        self._reset_runtime()
        super().__init__(params, defaults)
        self._refresh_lists()

    def _reset_runtime(self) -> None:
        """What a step keeps for the next one and a copy rebuilds (never copied or pickled: the
        engine's plans hold raw addresses)."""
        self._cache = StepCache()
        self._handle = ops.register(self)
        self._stability = StabilityMonitor()  # a copy watches its own run afresh
        self._params: List[torch.Tensor] = []  # what a compiled step hands its op
        self._state_tensors: List[torch.Tensor] = []

    # ----------------------------------------------------------------------------- copies
    #: What a copy or unpickled optimizer rebuilds instead of carrying: the step's cache (the
    #: engine's plans hold raw addresses of the original's tensors) and, as torch.optim does,
    #: the hooks.
    _NOT_COPIED = ("_cache", "_handle", "_params", "_state_tensors", "_stability",
                   "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                   "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                   "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # also load_state_dict's way of installing a state
        if "_cache" not in self.__dict__:  # a copy or an unpickled optimizer
            self.__dict__.setdefault("sum_hook", None)
            self.__dict__.setdefault("_skipped", {})
            self._reset_runtime()
            self._refresh_lists()

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
        check_torch_keywords(merged["foreach"], merged["fused"], merged["differentiable"])
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
        self._cache.invalidate(counters=False)
        group = self.param_groups[-1]
        group["step"] = 0
        group["xi"] = None  # created on the group's device at its first step

    @staticmethod
    def _scheme(group) -> FoldedScheme:
        return fold(group["scheme"])  # cached by schemes.fold

    # ----------------------------------------------------------------------------- step
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

    def _step_undoable(self, grad_of: Optional[Callable] = None) -> None:
        """The step (the functional core both ``step()`` and the compiled op run), with the
        gradients ``grad_of(parameter)`` (None: ``.grad``); what a failed step created is
        forgotten."""
        cache = self._cache
        cache.created = []
        grad_mode = torch.is_grad_enabled()
        set_grad_enabled(False)  # torch.no_grad, without its context manager's cost
        try:
            cache.run(self, grad_of)
        except BaseException:
            cache.rollback(self.state)
            raise
        finally:
            set_grad_enabled(grad_mode)
            cache.created = []
            if cache.dirty:
                self._refresh_lists()
        # After the step is complete (a warning turned into an error must not undo it).
        if self.check_stability:
            self._stability.observe(self)

    def _refresh_lists(self) -> None:
        self._params, self._state_tensors = ops.tensor_lists(self)
        self._cache.dirty = False

    # ----------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def kinetic_temperature(self) -> List[Optional[torch.Tensor]]:
        """Per group: Σp²/N over its momenta (with an adaptive mass Σp²/m / N, which the
        dynamics settle at τ), a 0-dim tensor (shape [chains] for stacked chains); None for
        overdamped groups. Sharded (DTensor) momenta are summed over ranks; complex momenta
        count their real components."""
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
                st = self.state.get(p, {})
                m = st.get("momentum_buffer")
                if m is None:
                    continue
                sq = _real_local(m).double().pow(2)
                v = st.get("exp_avg_sq") if group["mass"] == "adaptive" else None
                if v is not None:  # the mass of the last step: v as it is, its bias correction
                    step = max(int(group["step"]) - 1, 0)
                    freeze = group["mass_freeze"] or 0
                    _, bias = reference.mass_step(float(group["mass_beta"]), freeze, step,
                                                  st.get("mass_start", 0))
                    sq = sq / ((_real_local(v).double() * bias).sqrt() + float(group["mass_eps"]))
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
        """As torch.optim's, hooks included (:func:`thermo_ext.checkpoint.load`): a state dict
        is validated whole before anything changes, and a bad one raises ValueError."""
        checkpoint.load(self, state_dict)
        self._refresh_lists()
