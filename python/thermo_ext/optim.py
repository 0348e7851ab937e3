"""torch.optim-compatible partitioned samplers (DESIGN.md §1–2).

:class:`Thermo` is the general optimizer: every param group (partition) runs its own scheme with its
own hyperparameters, ``lr`` being the step size h. The named methods build the paper's partitions
with its defaults. ``step()`` gathers each group's tensors and hands them to a functional core,
:func:`thermo_ext.kernels.thermo_step` (the compiled engine) or, with ``backend="reference"``,
:func:`thermo_ext.reference.thermo_step` (plain torch, the oracle).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import kernels, reference
from . import random as te_random
from .schemes import FoldedScheme, fold
from .stability import StabilityMonitor

__all__ = ["Thermo"]

_THERMOSTATS = ("tensor", "group", "chain")
_MOMENTUM_INITS = ("zero", "thermal")
_BACKENDS = {"engine": kernels.thermo_step, "reference": reference.thermo_step}
_MAX_GROUPS = 2**16  # uid = (group << 16) | position


def _draw_seed() -> int:
    """A uint64 from torch's default generator, so torch.manual_seed makes runs reproducible."""
    hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def _broadcast_seed(seed: int) -> int:
    """Under an initialised process group every rank takes rank 0's seed (DDP/FSDP replicas
    must draw the same noise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seed
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor([seed >> 32, seed & 0xFFFFFFFF], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    hi, lo = t.tolist()
    return (hi << 32) | lo


def _check_group(group: Dict[str, Any], where: str) -> FoldedScheme:
    """Validates a merged param group; returns its folded scheme."""
    try:
        scheme = fold(group["scheme"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}{e}") from None
    kernels.check_hyper(where, lr=group["lr"], gamma=group["gamma"], tau=group["tau"],
                        sigma=group["sigma"], eps=group["eps"],
                        weight_decay=group["weight_decay"])
    xi0 = group["xi0"]
    if isinstance(xi0, bool) or not isinstance(xi0, (int, float)) or not math.isfinite(xi0):
        raise ValueError(f"{where}xi0: expected a finite real number, got {xi0!r}")
    if group["thermostat"] not in _THERMOSTATS:
        raise ValueError(f"{where}thermostat: expected one of {_THERMOSTATS}, got "
                         f"{group['thermostat']!r}")
    chains = group["chains"]
    if isinstance(chains, bool) or not isinstance(chains, int) or not 0 <= chains < 2**31:
        raise ValueError(f"{where}chains: expected an int >= 0 (0: parameters are not stacked "
                         f"chains), got {chains!r}")
    if group["thermostat"] == "chain" and not chains:
        raise ValueError(f"{where}thermostat='chain' needs stacked chains (chains=K > 0)")
    if group["momentum_init"] not in _MOMENTUM_INITS:
        raise ValueError(f"{where}momentum_init: expected one of {_MOMENTUM_INITS}, got "
                         f"{group['momentum_init']!r}")
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"{where}capturable: expected a bool, got {group['capturable']!r}")
    kernels.check_int(f"{where}seed", group["seed"], 0, kernels.U64)
    return scheme


class _Call:
    """One engine call of a step: a (group, dtype[, chain]) list of tensors and its cached plan.

    ``sources`` are the optimizer's parameters; ``params`` and ``momenta`` the tensors the engine
    updates in place: the same tensors, the local shards of DTensors, or chain ``chain`` of
    stacked parameters.
    """

    __slots__ = ("group_index", "positions", "chain", "sources", "dtensor", "params", "momenta",
                 "segments", "seg_numel", "offsets", "xi", "xi_index", "xi_full", "workspace",
                 "step_tensor", "seed", "sum_hook", "staged", "plan")

    def __init__(self, **kw):
        self.plan = None
        for k, v in kw.items():
            setattr(self, k, v)


def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _is_dense(t: torch.Tensor) -> bool:
    """Its elements fill its storage span exactly once: a permutation of a contiguous layout
    (channels_last, a transpose), so a contiguous copy holds the same elements."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _flat_offset(p) -> int:
    """Global index of the first element of a DTensor's local shard (0 for plain tensors)."""
    if not _is_dtensor(p):
        return 0
    from torch.distributed.tensor import Replicate, Shard

    for pl in p.placements:
        if not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and pl.dim != 0):
            raise ValueError(f"DTensor parameters must be sharded on dim 0 (FSDP2) or "
                             f"replicated; got placements {p.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for d in p.shape[1:]:
        row *= d
    return int(offset[0]) * row if len(offset) else 0


def _mesh_sum_hook(p) -> Callable[[torch.Tensor], None]:
    """All-reduces an E phase's segment sums over the DTensor's mesh (one small all-reduce)."""
    import torch.distributed as dist

    group = p.device_mesh.get_group()

    def hook(sums: torch.Tensor) -> None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

    return hook


try:  # the hook registries torch.optim.Optimizer's step wrapper runs
    from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
    from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS
except ImportError:  # pragma: no cover
    _GLOBAL_PRE_HOOKS, _GLOBAL_POST_HOOKS = {}, {}

try:  # torch >= 2.4 has the public DTensor; keep the import optional for minimal builds
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover
    _DTensor = None


class Thermo(Optimizer):
    r"""Partitioned thermodynamic optimizer: one scheme and temperature per param group.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer.
        lr: the step size h (torch's LR schedulers change it).
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
        check_finite: check parameters and gradients (and the thermostat) for non-finite values
            before anything is written; a failed check raises ``FloatingPointError`` naming the
            parameter and leaves every parameter, momentum and ξ unchanged. Costs one read-only
            pass over θ and g for schemes without E; for schemes with E a read of θ in their
            first, read-only phase (which reads only p and g unchecked, unless weight decay).
            On CUDA it costs one device-to-host read per step, unless ``capturable``, where a
            flagged step is skipped on the device instead of raising and counted by
            :meth:`skipped_steps`.
        check_stability: every 16 steps, look for a group running away while still finite
            (its parameters' RMS growing by large factors) and warn once per group with an
            :class:`thermo_ext.InstabilityWarning` (see :mod:`thermo_ext.stability`).
        stochastic_rounding: bf16 parameters are rounded stochastically from float32 results.
        backend: ``"engine"`` (compiled) or ``"reference"`` (plain torch, slow; the oracle).
    """

    def __init__(self, params, lr: float = 0.1, scheme: str = "langevin", gamma: float = 1.0,
                 tau: float = 1e-4, sigma: float = 0.01, eps: float = 0.05, xi0: float = 0.1,
                 weight_decay: float = 0.0, thermostat: str = "tensor",
                 momentum_init: str = "zero", seed: Optional[int] = None,
                 capturable: bool = False, *, chains: int = 0, check_finite: bool = True,
                 check_stability: bool = True, stochastic_rounding: bool = True,
                 backend: str = "engine"):
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {tuple(_BACKENDS)}, got {backend!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected a bool, got {check_finite!r}")
        if seed is None:
            seed = _draw_seed()
        kernels.check_int("seed", seed, 0, kernels.U64)
        seed = _broadcast_seed(seed)
        defaults = dict(lr=lr, scheme=scheme, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                        xi0=xi0, weight_decay=weight_decay, thermostat=thermostat,
                        momentum_init=momentum_init, seed=seed, capturable=capturable,
                        chains=chains)
        _check_group(defaults, "")
        self.check_finite = check_finite
        if not isinstance(check_stability, bool):
            raise TypeError(f"check_stability: expected a bool, got {check_stability!r}")
        self.check_stability = check_stability
        self._stability = StabilityMonitor()
        self.stochastic_rounding = bool(stochastic_rounding)
        self.backend = backend
        #: Optional hook(sums) reducing each E's segment sums in place (distributed training).
        self.sum_hook: Optional[Callable[[torch.Tensor], None]] = None
        self._host_steps: Dict[int, int] = {}
        self._flags: Dict[torch.device, torch.Tensor] = {}
        self._skipped: Dict[torch.device, torch.Tensor] = {}  # capturable steps skipped on device
        self._cache: Dict[int, tuple] = {}  # group -> (key, hyper, scheme, calls)
        self._new_state: list = []  # state created by the running step (undone if it fails)
        self._version = 0  # bumped whenever state is replaced wholesale
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        gi = len(self.param_groups)
        where = f"param group {gi}: "
        if gi >= _MAX_GROUPS:
            raise ValueError(f"{where}at most {_MAX_GROUPS} param groups")
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"{where}expected a dict with a 'params' entry")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_group(merged, where)
        params = param_group["params"]
        # A list now: a generator would be used up here and reach torch empty.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len(params) >= _MAX_GROUPS:
            raise ValueError(f"{where}at most {_MAX_GROUPS - 1} tensors per group")
        if len({id(p) for p in params}) != len(params):
            # torch only warns; the engine would move such a tensor twice per step
            raise ValueError(f"{where}a parameter appears more than once in the group")
        super().add_param_group({**param_group, "params": params})
        if hasattr(self, "_version"):
            self._version += 1
        group = self.param_groups[-1]
        group["step"] = 0
        group["xi"] = None  # created on the group's device at its first step

    @staticmethod
    def _scheme(group) -> FoldedScheme:
        return fold(group["scheme"])  # cached by schemes.fold

    # ----------------------------------------------------------------------------- state
    def _init_momentum(self, p, gi, pos, group):
        """Zero, or thermal: √τ R with R from the counter's step field 2³²−1, draw 0 (for each
        chain with its own seed; for a shard, the shard's global offsets)."""
        mdt = kernels.momentum_dtype(p.dtype)
        m = torch.zeros_like(p, dtype=mdt, memory_format=torch.contiguous_format)
        if group["momentum_init"] == "thermal":
            chains = group["chains"]
            local = _local(m)
            views = [local[k] for k in range(chains)] if chains else [local]
            for k, v in enumerate(views):
                seed = te_random.chain_seed(group["seed"], k) if chains else group["seed"]
                z = te_random.normal(v.numel(), seed=seed, uid=(gi << 16) | pos,
                                     step=te_random.THERMAL_STEP, draw=0,
                                     offset=_flat_offset(p), device=v.device)
                v.copy_((math.sqrt(group["tau"]) * z.to(mdt)).view(v.shape))
        return m

    def _xi(self, group, scheme, device) -> Optional[torch.Tensor]:
        if not scheme.uses_thermostat:
            return None
        n = 1 if group["thermostat"] == "group" else len(group["params"])
        shape = (group["chains"], n) if group["chains"] else (n,)
        xi = group["xi"]
        if xi is None or tuple(xi.shape) != shape:
            self._new_state.append(("xi", group, xi))
            xi = torch.full(shape, float(group["xi0"]), dtype=torch.float64, device=device)
            group["xi"] = xi
        elif xi.device != device:
            xi = group["xi"] = xi.to(device)
        return xi

    def _step_tensor(self, gi, group, device):
        s = group["step"]
        if not isinstance(s, torch.Tensor):
            s = group["step"] = torch.tensor(int(s), dtype=torch.int64, device=device)
        elif s.device != device:
            s = group["step"] = s.to(device)
        return s

    def _host_step(self, gi, group) -> int:
        s = group["step"]
        if isinstance(s, torch.Tensor):
            if gi not in self._host_steps:
                self._host_steps[gi] = int(s)
            return self._host_steps[gi]
        return s

    # ----------------------------------------------------------------------------- step
    def _build_calls(self, gi: int, group: Dict[str, Any], scheme: FoldedScheme,
                     active: tuple) -> List[_Call]:
        """The engine calls of a group for this set of tensors with gradients (cached)."""
        where = f"param group {gi}: "
        chains = group["chains"]
        device = group["params"][active[0]].device
        by_dtype: Dict[torch.dtype, list] = {}
        for pos in active:
            p = group["params"][pos]
            if p.device != device:
                raise ValueError(f"{where}parameters on {device} and {p.device}; a group must "
                                 f"live on one device")
            local = _local(p)
            if not (local.is_contiguous() or _is_dense(local)):
                raise ValueError(f"{where}parameter {pos}: expected a dense tensor (contiguous, "
                                 f"or a permutation such as channels_last); got strides "
                                 f"{tuple(local.stride())} for shape {tuple(local.shape)}")
            if chains and (_is_dtensor(p) or p.dim() == 0 or p.shape[0] != chains):
                raise ValueError(f"{where}parameter {pos}: with chains={chains} every parameter "
                                 f"is a plain tensor stacked on a leading dimension of {chains}; "
                                 f"got shape {tuple(p.shape)}")
            if p.dtype not in kernels.DTYPES:
                raise TypeError(f"{where}parameter {pos}: dtype {p.dtype} not supported")
            by_dtype.setdefault(p.dtype, []).append(pos)
        xi = self._xi(group, scheme, device)
        per_group = group["thermostat"] == "group"
        if per_group and scheme.n_e and len(by_dtype) > 1:
            raise ValueError(f"{where}thermostat='group' with an E letter needs one dtype per "
                             f"group; got {sorted(str(d) for d in by_dtype)}: split the group")
        step_tensor = None
        if group["capturable"] and kernels.on_device(_local(group["params"][active[0]])):
            step_tensor = self._step_tensor(gi, group, device)
        calls = []
        for dtype, positions in by_dtype.items():
            sources = [group["params"][k] for k in positions]
            momenta = []
            for pos, p in zip(positions, sources):
                state = self.state[p]
                m = None
                if scheme.uses_momentum:
                    m = state.get("momentum_buffer")
                    if m is None:
                        m = state["momentum_buffer"] = self._init_momentum(p, gi, pos, group)
                        self._new_state.append(("momentum", p, None))
                momenta.append(m)
            dtensor = any(_is_dtensor(p) for p in sources)
            numels = [p.numel() // max(chains, 1) for p in sources]  # whole tensors, all shards
            for chain in (range(chains) if chains else [None]):
                pick = (lambda t: t) if chain is None else (lambda t, c=chain: t[c])
                xi_full = None if xi is None else (xi if chain is None else xi[chain])
                xi_index, xi_call = None, xi_full
                if xi is None or per_group:
                    segments = [0] * len(sources)
                    seg_numel = [float(sum(numels))]
                elif len(positions) == xi_full.numel():
                    segments, seg_numel = positions, [0.0] * xi_full.numel()
                    for k, n in zip(positions, numels):
                        seg_numel[k] = float(n)
                else:  # a subset of the group's tensors: gather their xi, scatter back after
                    xi_index = torch.tensor(positions, device=device)
                    xi_call = torch.empty(len(positions), dtype=torch.float64, device=device)
                    segments, seg_numel = list(range(len(positions))), [float(n) for n in numels]
                workspace = None
                if scheme.n_e:
                    workspace = torch.empty(2 * scheme.n_e * xi_call.numel(),
                                            dtype=torch.float64, device=device)
                engine_params, staged = [], []
                for p in sources:
                    t = pick(_local(p))
                    if not t.is_contiguous():  # dense but permuted: step a contiguous copy
                        buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                        staged.append((t, buf))
                        t = buf
                    engine_params.append(t)
                calls.append(_Call(
                    group_index=gi, positions=positions, chain=chain, sources=sources,
                    dtensor=dtensor, params=engine_params, staged=staged,
                    momenta=[None if m is None else pick(_local(m)) for m in momenta],
                    segments=segments, seg_numel=seg_numel,
                    offsets=[_flat_offset(p) for p in sources], xi=xi_call, xi_index=xi_index,
                    xi_full=xi_full, workspace=workspace, step_tensor=step_tensor,
                    seed=group["seed"] if chain is None else te_random.chain_seed(group["seed"],
                                                                                  chain),
                    sum_hook=_mesh_sum_hook(sources[0]) if dtensor else None))
        return calls

    def _group_calls(self, gi: int, group: Dict[str, Any]) -> List[_Call]:
        """The group's engine calls for this step, rebuilt only when its tensors, buffers or
        structural settings change; hyperparameters are revalidated whenever they change."""
        params = group["params"]
        active = tuple(k for k, p in enumerate(params) if p.grad is not None)
        if not active:
            return []
        hyper = (group["lr"], group["gamma"], group["tau"], group["sigma"], group["eps"],
                 group["weight_decay"], group["scheme"], group["xi0"], group["thermostat"],
                 group["momentum_init"], group["seed"], group["capturable"], group["chains"])
        cached = self._cache.get(gi)
        if cached is not None and cached[1] == hyper:
            scheme = cached[2]
        else:  # users and schedulers edit groups: validate what changed before using it
            scheme = _check_group(group, f"param group {gi}: ")
        key = (active, tuple(_local(params[k]).data_ptr() if type(params[k]) is _DTensor
                             else params[k].data_ptr() for k in active),
               self._buffers_id(group), self._version, hyper[6:])
        if cached is None or cached[0] != key:
            calls = self._build_calls(gi, group, scheme, active)
            key = key[:2] + (self._buffers_id(group),) + key[3:]  # xi/step are made lazily
            cached = (key, hyper, scheme, calls)
        elif cached[1] != hyper:
            cached = (cached[0], hyper, scheme, cached[3])
        self._cache[gi] = cached
        return cached[3]

    @staticmethod
    def _buffers_id(group):
        s = group["step"]
        return id(group["xi"]), id(s) if isinstance(s, torch.Tensor) else None

    def _plan(self, call: _Call, grads) -> "kernels.EnginePlan":
        gi = call.group_index
        group = self.param_groups[gi]
        _, hyper, scheme, _ = self._cache[gi]
        if call.plan is None:
            call.plan = kernels.EnginePlan(
                call.params, call.momenta, scheme=scheme, xi=call.xi, segments=call.segments,
                seg_numel=call.seg_numel, seed=call.seed,
                uids=[(gi << 16) | k for k in call.positions], offsets=call.offsets,
                step_tensor=call.step_tensor, workspace=call.workspace)
        host_step = self._host_step(gi, group)
        call.plan.set_fast(grads, hyper[:6], host_step, host_step == 0,
                           self.stochastic_rounding)
        return call.plan

    def _grads(self, call: _Call) -> list:
        """The gradients the engine reads. torch's ``.grad`` setter already guarantees the
        parameter's shape, dtype and device; what is left is the layout."""
        if call.chain is None and not call.dtensor:
            grads = [src.grad for src in call.sources]
        else:
            grads = [_local(src.grad) for src in call.sources]
            if call.chain is not None:
                grads = [g[call.chain] for g in grads]
        for k, g in enumerate(grads):
            if g.layout is not torch.strided:
                raise ValueError(f"param group {call.group_index}: parameter "
                                 f"{call.positions[k]}: sparse gradients are not supported")
            if not g.is_contiguous():
                grads[k] = g.contiguous()
        return grads

    def _flag(self, device: torch.device) -> torch.Tensor:
        f = self._flags.get(device)
        if f is None:
            # Made together and outside any graph capture (an eager step precedes it), so that
            # a captured step only ever updates them.
            f = self._flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
            self._skipped[device] = torch.zeros((), dtype=torch.int64, device=device)
        return f

    def _raise_nonfinite(self, call: _Call, index: int, kind: str):
        group = self.param_groups[call.group_index]
        if kind == "thermostat":
            what = ("the group's thermostat" if group["thermostat"] == "group" else
                    f"the thermostat of parameter {call.positions[index]}")
            raise FloatingPointError(
                f"param group {call.group_index}: {what} overflowed (xi or exp(-xi delta) is "
                f"not finite); nothing was updated. Lower eps or lr, or check the loss scale")
        pos = call.positions[index]
        names = group.get("param_names")
        label = f"parameter {pos}" + (f" ({names[pos]!r})" if names else "")
        shape = tuple(group["params"][pos].shape)
        raise FloatingPointError(
            f"param group {call.group_index}: {label} of shape {shape} has a non-finite {kind}; "
            f"nothing was updated (pass check_finite=False to skip this check)")

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
        for pre_hook in (*_GLOBAL_PRE_HOOKS.values(), *self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"step pre hook must return None or (new_args, "
                                       f"new_kwargs), got {result}")
                args, kwargs = result
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                loss = self._step_with_closure(*args[1:], **kwargs)
        else:
            loss = self._step_with_closure(*args[1:], **kwargs)
        self._optimizer_step_code()
        for post_hook in (*self._optimizer_step_post_hooks.values(),
                          *_GLOBAL_POST_HOOKS.values()):
            post_hook(self, args, kwargs)
        return loss

    def _step_with_closure(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._new_state = []
        try:
            with torch.no_grad():
                self._step()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._new_state = []
        return loss

    def _rollback(self) -> None:
        """Forgets the momenta and ξ a failed step created (a retry starts afresh)."""
        for kind, obj, old in reversed(self._new_state):
            if kind == "momentum":
                st = self.state.get(obj)
                if st is not None:
                    st.pop("momentum_buffer", None)
                    if not st:
                        del self.state[obj]
            else:
                obj["xi"] = old
        if self._new_state:
            self._cache.clear()

    def _check_capture(self) -> None:
        """Inside CUDA graph capture only device work is recorded: every group must keep its
        counter on the device, and the first step (a different program) must run eagerly."""
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        if self.backend != "engine":
            raise RuntimeError("step() is being captured into a CUDA graph, but "
                               "backend='reference' reads its step counter on the host; "
                               "use backend='engine' with capturable=True")
        for gi, group in enumerate(self.param_groups):
            where = f"param group {gi}: "
            p = next((p for p in group["params"] if p.grad is not None), None)
            if p is None:
                continue
            s = group["step"]
            known = not isinstance(s, torch.Tensor) or gi in self._host_steps
            if not known or self._host_step(gi, group) == 0:
                raise RuntimeError(
                    f"{where}the first step of a scheme runs a different program and cannot be "
                    f"captured: take at least one eager step (warm-up, as torch.cuda.graphs "
                    f"recommends) before capturing")
            if _local(p).device.type != "cuda" or not group["capturable"]:
                raise RuntimeError(
                    f"{where}step() is being captured into a CUDA graph; that needs CUDA "
                    f"parameters and capturable=True (the step counter then lives on the "
                    f"device), got capturable={group['capturable']} on {_local(p).device}")

    def _step(self) -> None:
        self._check_capture()
        calls = []
        for gi, group in enumerate(self.param_groups):
            calls.extend(self._group_calls(gi, group))
        if not calls:
            self._advance()
            return
        grads = [self._grads(c) for c in calls]
        for c in calls:
            if c.xi_index is not None:
                torch.index_select(c.xi_full, 0, c.xi_index, out=c.xi)
            for src, buf in c.staged:  # dense but permuted (e.g. channels_last) parameters
                buf.copy_(src)
        check = self.check_finite
        flag = None
        if check and self.backend == "engine" and any(kernels.on_device(c.params[0])
                                                      for c in calls):
            devices = {c.params[0].device for c in calls}
            if len(devices) > 1:  # one flag per step: keep the fast path to one device
                raise ValueError("check_finite with CUDA needs all groups on one device")
            flag = self._flag(devices.pop())
            flag.zero_()
        if self.backend == "engine":
            plans = [self._plan(c, g) for c, g in zip(calls, grads)]
            for c, pl in zip(calls, plans):
                pl.sum_hook = self.sum_hook or c.sum_hook
            bad = kernels.run_plans(plans, check=check, flag=flag)
            if bad is not None:
                self._raise_nonfinite(calls[bad[0]], bad[1], bad[2])
        else:
            self._reference_step(calls, grads, check)
        if flag is not None and any(g["capturable"] for g in self.param_groups):
            # No host read (it would break graph capture): count the skipped step on the device.
            self._skipped[flag.device].add_(flag[0].ne(0))
        elif flag is not None:
            code = int(flag.item()) - 1  # one device-to-host read: the documented cost
            if code >= 0:  # the kernels skipped the step on the device
                raise FloatingPointError(
                    f"a non-finite {kernels.BAD_KINDS[code % 4]} was found on {flag.device} "
                    f"(entry {code // 4} of a call); the step was skipped and nothing was updated")
        for c in calls:
            if c.xi_index is not None:
                c.xi_full.index_copy_(0, c.xi_index, c.xi)
            for src, buf in c.staged:
                src.copy_(buf)
        self._advance()
        if self.check_stability:
            self._stability.observe(self)

    def _reference_step(self, calls, grads, check):
        staged = check and len(calls) > 1
        kws = []
        for c in calls:
            group = self.param_groups[c.group_index]
            host_step = self._host_step(c.group_index, group)
            kws.append(dict(scheme=self._cache[c.group_index][2], lr=group["lr"],
                            gamma=group["gamma"], tau=group["tau"], sigma=group["sigma"],
                            eps=group["eps"], weight_decay=group["weight_decay"], xi=c.xi,
                            segments=c.segments, seg_numel=c.seg_numel, seed=c.seed,
                            step=host_step, uids=[(c.group_index << 16) | k for k in c.positions],
                            offsets=c.offsets, first=host_step == 0,
                            stochastic_rounding=self.stochastic_rounding,
                            sum_hook=self.sum_hook or c.sum_hook))
        for c, g, kw in zip(calls, grads, kws):
            bad = reference.thermo_step(c.params, c.momenta, g, check_finite=check,
                                        mode="pre" if staged else "all", **kw)
            if bad is not None:
                self._raise_nonfinite(c, *bad)
        if staged:
            for c, g, kw in zip(calls, grads, kws):
                reference.thermo_step(c.params, c.momenta, g, check_finite=False, mode="finish",
                                      **kw)

    def _advance(self):
        for gi, group in enumerate(self.param_groups):
            s = group["step"]
            if isinstance(s, torch.Tensor):
                s += 1
                self._host_steps[gi] = self._host_step(gi, group) + 1
            else:
                group["step"] = s + 1

    # ----------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def kinetic_temperature(self) -> List[Optional[torch.Tensor]]:
        """Per group: Σp²/N over its momenta, a 0-dim tensor (shape [chains] for stacked
        chains); None for overdamped groups. Sharded (DTensor) momenta are summed over ranks."""
        out = []
        for group in self.param_groups:
            if not self._scheme(group).uses_momentum:
                out.append(None)
                continue
            chains = group["chains"]
            total, n, device = None, 0, None
            for p in group["params"]:
                device = device or p.device
                n += p.numel() // max(chains, 1)
                m = self.state.get(p, {}).get("momentum_buffer")
                if m is None:
                    continue
                sq = _local(m).double().pow(2)
                s = sq.reshape(chains, -1).sum(1) if chains else sq.sum()
                if _is_dtensor(m):
                    import torch.distributed as dist

                    dist.all_reduce(s, group=m.device_mesh.get_group())
                total = s if total is None else total + s
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
            xi = self._xi(group, scheme, device)
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
    def _validate_state_dict(self, sd: Dict[str, Any]) -> None:
        """Everything load_state_dict relies on, checked before anything changes."""
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(
                sd.get("param_groups"), list):
            raise ValueError("state_dict: expected an optimizer state dict with 'state' (a dict) "
                             "and 'param_groups' (a list)")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        required = set(self.defaults) | {"step", "xi"}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            where = f"state_dict param group {gi}: "
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"{where}expected a dict with a 'params' list")
            missing = sorted(required - set(saved))
            if missing:
                raise ValueError(f"{where}missing {missing}: not a thermo_ext optimizer's state")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}{len(saved['params'])} parameters, this optimizer's "
                                 f"group has {len(group['params'])}")
            try:
                scheme = _check_group(saved, where)
            except TypeError as e:
                raise ValueError(str(e)) from None
            step = saved["step"]
            if isinstance(step, torch.Tensor):
                ok = (step.numel() == 1 and not step.is_floating_point() and not step.is_complex()
                      and step.dtype != torch.bool and 0 <= int(step) < 2**63)
            else:
                ok = isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**64
            if not ok:
                raise ValueError(f"{where}step: expected an int in [0, 2**64), got {step!r}")
            xi = saved["xi"]
            if xi is not None:
                n = 1 if saved["thermostat"] == "group" else len(group["params"])
                shape = (saved["chains"], n) if saved["chains"] else (n,)
                if (not isinstance(xi, torch.Tensor) or not xi.is_floating_point()
                        or tuple(xi.shape) != shape):
                    raise ValueError(f"{where}xi: expected a floating tensor of shape {shape} "
                                     f"for thermostat={saved['thermostat']!r}, got "
                                     f"{getattr(xi, 'dtype', type(xi).__name__)} "
                                     f"{tuple(getattr(xi, 'shape', ()))}")
                if not torch.isfinite(xi).all():
                    raise ValueError(f"{where}xi: non-finite thermostat values")
            n_moms = 0
            for pos, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                entry = sd["state"].get(pid, {})
                if not isinstance(entry, dict):
                    raise ValueError(f"{where}parameter {pos}: expected a dict of state")
                m = entry.get("momentum_buffer")
                if m is None:
                    continue
                n_moms += 1
                if (not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape)
                        or not m.is_floating_point()):
                    raise ValueError(f"{where}parameter {pos}: momentum_buffer must be a floating "
                                     f"tensor of the parameter's shape {tuple(p.shape)}, got "
                                     f"{getattr(m, 'dtype', type(m).__name__)} "
                                     f"{tuple(getattr(m, 'shape', ()))}")
                if not torch.isfinite(_local(m)).all():
                    raise ValueError(f"{where}parameter {pos}: momentum_buffer has non-finite "
                                     f"values")
            if (xi is not None and int(step) > 0 and scheme.uses_momentum and n_moms == 0
                    and len(group["params"])):
                raise ValueError(f"{where}a thermostatted group that has stepped but no momenta: "
                                 f"the momenta are missing from the state dict")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch.optim's, after validating the whole state (shapes, dtypes, scheme, seed,
        step, finite values): a bad state dict raises ValueError and changes nothing."""
        self._validate_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        saved_moms = {}
        for g_saved, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(g_saved["params"], group["params"]):
                m = state_dict["state"].get(pid, {}).get("momentum_buffer")
                if m is not None:
                    saved_moms[p] = m
        super().load_state_dict(state_dict)
        self._host_steps.clear()
        self._cache.clear()
        self._version += 1
        for p, m in saved_moms.items():
            # Our own copy (torch would alias the saved tensor, and cast the float32 momenta of
            # bf16/fp16 parameters to the parameter dtype).
            self.state[p]["momentum_buffer"] = m.detach().to(
                device=p.device, dtype=kernels.momentum_dtype(p.dtype), copy=True)
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            if isinstance(group.get("xi"), torch.Tensor):
                group["xi"] = group["xi"].detach().to(device=device, dtype=torch.float64,
                                                      copy=True)
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = group["step"].detach().to(device=device, copy=True)
