"""The engine calls a param group's step is made of, and the buffers they need
(docs/DESIGN.md, "Engine architecture", "The optimizer").

A group's step is one engine call per (dtype[, chain], way of reducing sums) list of its tensors
that have gradients. :func:`build_calls` makes them, with every buffer they need (momenta, ξ,
workspace, the device step counter); a :class:`GroupRecord` keeps them between steps and says,
in :meth:`GroupRecord.fits`, whether they still fit the group.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import kernels
from . import distributed as dist_glue
from . import random as te_random
from ._compat import dtensor_type
from .groups import uid
from .kernels import Hyper
from .naming import param_label, where
from .schemes import FoldedScheme

_STRIDED = torch.strided

__all__ = ["EngineCall", "GroupRecord", "build_calls", "engine_view", "momentum_dtype",
           "momentum_buffers", "init_momentum", "group_xi", "addresses"]


def momentum_dtype(p: torch.Tensor) -> torch.dtype:
    """The momentum buffer's dtype: complex parameters keep complex momenta (stepped as real
    views, like torch's optimizers); bf16/fp16 parameters float32 ones."""
    if p.is_complex():
        return p.dtype
    return kernels.momentum_dtype(p.dtype)


def engine_view(t: torch.Tensor) -> torch.Tensor:
    """What the engine steps for a (local) tensor: complex tensors as their real view."""
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(p: torch.Tensor) -> torch.dtype:
    return p.real.dtype if p.is_complex() else p.dtype


@dataclasses.dataclass(eq=False)
class EngineCall:
    """One engine call of a step: a (group, dtype[, chain]) list of tensors and its cached plan.

    ``sources`` are the optimizer's parameters (at ``positions`` in group ``group_index``);
    ``params`` and ``momenta`` the tensors the engine updates in place: the same tensors
    (complex ones as real views), the local shards of DTensors, chain ``chain`` of stacked
    parameters, or contiguous copies (``param_copies``: (parameter view, copy)) of parameters
    with any other layout. ``grad_copies`` keeps, by position, the contiguous copies that
    non-contiguous gradients are read through, for the next steps. ``masses``: with an adaptive
    mass, the second moments the engine updates in place (views like ``momenta``). ``xi`` is the
    thermostat
    buffer the call steps: a view of the group's (``xi_full``), or with ``xi_index`` a gathered
    copy of the entries of its tensors. ``plan`` is the backend's plan of the call, made at its
    first step and kept.
    """

    group_index: int
    scheme: FoldedScheme
    positions: List[int]
    chain: Optional[int]
    sources: List[torch.Tensor]
    dtensor: bool
    params: List[torch.Tensor]
    momenta: List[Optional[torch.Tensor]]
    segments: List[int]
    seg_numel: List[float]
    offsets: List[int]
    runs: List[Optional[Tuple[int, int]]]
    xi: Optional[torch.Tensor]
    xi_index: Optional[torch.Tensor]
    xi_full: Optional[torch.Tensor]
    workspace: Optional[torch.Tensor]
    step_tensor: Optional[torch.Tensor]
    seed: int
    sum_hook: Optional[Callable[[torch.Tensor], None]]
    param_copies: List[Tuple[torch.Tensor, torch.Tensor]]
    group_size: int
    masses: Optional[List[torch.Tensor]] = None  # the adaptive mass's second moments v
    mass_starts: Optional[List[int]] = None  # the step of each v's first gradient
    plan: Any = None
    grad_copies: Dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def uids(self) -> List[int]:
        return [uid(self.group_index, k) for k in self.positions]

    @property
    def plain(self) -> bool:
        """Whether the engine steps the parameters themselves, whole, with the group's own ξ:
        no copies in or out around the engine call."""
        return (self.chain is None and not self.param_copies and self.xi_index is None
                and not self.dtensor and all(map(operator.is_, self.params, self.sources)))

    def __post_init__(self):
        #: Whether the call covers its group's tensors in order (its gradients are the group's).
        self.whole = self.chain is None and self.positions == list(range(self.group_size))
        self.complex = any(p.is_complex() for p in self.sources)

    def grads(self, group: Dict[str, Any], grads: List[Optional[torch.Tensor]]
              ) -> List[torch.Tensor]:
        """The gradients the engine reads, from ``grads``, the group's gradients by position
        (``.grad`` in an eager step; the list may be reused). torch's ``.grad`` setter already
        guarantees the parameter's shape, dtype and device; what is left is the layout."""
        out = grads if self.whole else [grads[k] for k in self.positions]
        if self.dtensor:
            out = [dist_glue.local(dist_glue.like_param(g, src))
                   for g, src in zip(out, self.sources)]
        if self.chain is not None:
            out = [g[self.chain] for g in out]
        complex_ = self.complex
        for k, g in enumerate(out):
            if g.layout is not _STRIDED or complex_ or not g.is_contiguous():
                out[k] = self._engine_grad(group, k, g)
        return out

    def _engine_grad(self, group: Dict[str, Any], k: int, g: torch.Tensor) -> torch.Tensor:
        """Gradient ``k`` in the layout the engine reads: dense, real, contiguous (through a
        buffer kept for the next steps: no allocation)."""
        if g.layout is not _STRIDED:
            raise ValueError(f"{where(self.group_index, group)}"
                             f"{param_label(group, self.positions[k])}: sparse gradients are "
                             f"not supported")
        if g.is_complex():
            g = torch.view_as_real(g)
        if g.is_contiguous():
            return g
        buf = self.grad_copies.get(k)
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
            buf = self.grad_copies[k] = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        return buf.copy_(g)

    def copy_in(self) -> None:
        """Before the engine runs: the call's ξ entries and its parameters' contiguous copies."""
        if self.xi_index is not None:
            torch.index_select(self.xi_full, 0, self.xi_index, out=self.xi)
        for src, buf in self.param_copies:
            buf.copy_(src)

    def copy_out(self) -> None:
        """After the engine ran: what :meth:`copy_in` copied, back to where it came from."""
        if self.xi_index is not None:
            self.xi_full.index_copy_(0, self.xi_index, self.xi)
        for src, buf in self.param_copies:
            src.copy_(buf)


def addresses(params) -> tuple:
    """Where the engine finds each parameter (a DTensor: its local shard)."""
    dtensor = dtensor_type()
    return tuple([p.data_ptr() if type(p) is not dtensor else p.to_local().data_ptr()
                  for p in params])


def buffer_ids(group: Dict[str, Any]) -> tuple:
    """The identity of the group's ξ and (when a tensor) step counter, which calls point at."""
    s = group["step"]
    return id(group["xi"]), id(s) if isinstance(s, torch.Tensor) else None


@dataclasses.dataclass(eq=False)
class GroupRecord:
    """What ``step()`` keeps of a param group between steps: its engine calls, what they were
    built for (the positions of the tensors with gradients and their addresses, their momentum
    buffers, the group's buffers, the optimizer's state version, the structural settings: any
    change rebuilds them, :meth:`fits`), and the hyperparameters last validated (``raw`` as read
    from the group, ``hyper`` as numbers)."""

    active: tuple
    addresses: tuple
    momenta: tuple
    buffers: tuple
    version: int
    structure: tuple
    raw: tuple
    hyper: Hyper
    scheme: FoldedScheme
    calls: List[EngineCall]
    capturable: bool = False
    masses: Optional[tuple] = None  # the second-moment buffers of an adaptive mass

    def __post_init__(self):
        self.dtensor = any(c.dtensor for c in self.calls)
        self.on_device = kernels.on_device(self.calls[0].params[0])
        #: A capturable CUDA group's hyperparameters on its device (kernels.HYPER_FIELDS order),
        #: from which every CUDA call computes its coefficients: a captured graph's replays
        #: follow in-place changes of tensor hyperparameters (torch's schedulers fill_ them).
        self.device_hyper = None
        if self.capturable and self.on_device:
            self.device_hyper = torch.empty(len(kernels.HYPER_FIELDS), dtype=torch.float64,
                                            device=self.calls[0].params[0].device)
        self.device_filled = None  # the float values last written there
        # A tensor hyperparameter may change in place (a scheduler's fill_): read it on the host
        # each step, except where the device reads it (no host synchronisation there).
        self.tensor_hyper = (self.device_hyper is None
                             and any(isinstance(v, torch.Tensor) for v in self.raw))
        #: Every call steps its parameters in place on the CPU, with host counters and float
        #: hyperparameters: a step of such groups needs nothing around the engine call.
        self.plain = (not self.on_device and not self.tensor_hyper
                      and all(c.plain and c.sum_hook is None for c in self.calls))

    def fits(self, group: Dict[str, Any], moving: Sequence[torch.Tensor], state,
             version: int) -> bool:
        """Whether the calls still fit the group's tensors ``moving`` (those with gradients):
        the optimizer's state version, the group's ξ and counter, the tensors' addresses and
        their momentum buffers are those the calls were built for. (Run every step: all by
        identity.)"""
        return (version == self.version and self.buffers == buffer_ids(group)
                and self.addresses == (addresses(moving) if self.dtensor else
                                       tuple([p.data_ptr() for p in moving]))
                and all(map(operator.is_, momentum_buffers(state, moving), self.momenta))
                and (self.masses is None or all(map(operator.is_,
                                                    momentum_buffers(state, moving, "exp_avg_sq"),
                                                    self.masses))))

    def fill_device_hyper(self) -> None:
        """Writes the group's hyperparameters to ``device_hyper`` (on the device, no host
        read): tensors are copied every step (so that a captured graph copies their current
        values), floats written when they change."""
        fields = self.raw[:len(kernels.HYPER_FIELDS)]
        # The numbers: a tensor's as read at validation, None (mass_freeze) as the engine's 0.
        floats = tuple(None if isinstance(v, torch.Tensor) else number or 0.0
                       for v, number in zip(fields, self.hyper))
        for k, v in enumerate(fields):
            if isinstance(v, torch.Tensor):
                self.device_hyper[k].copy_(v.reshape(()))
            elif self.device_filled is None or self.device_filled[k] != floats[k]:
                self.device_hyper[k].fill_(float(floats[k]))
        self.device_filled = floats


def real_runs(p: torch.Tensor) -> Tuple[int, Optional[Tuple[int, int]]]:
    """:func:`distributed.shard_runs` of ``p`` counted in real components (a complex element is
    two), as the engine steps it."""
    c = 2 if p.is_complex() else 1
    offset, runs = dist_glue.shard_runs(p)
    return offset * c, None if runs is None else (runs[0] * c, runs[1] * c)


def init_momentum(p: torch.Tensor, gi: int, pos: int, group: Dict[str, Any],
                  scheme: FoldedScheme, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero; thermal: √τ R with R from the counter's step field 2³²−1, draw 0 (for each
    chain with its own seed; for a shard, the shard's global offsets; for a complex parameter,
    per real component); or terminal: k F with F the force of ``p``'s first gradient ``grad``
    (B's, with weight decay and ``maximize``) and k from ``scheme.terminal`` (docs/DESIGN.md,
    Initial momentum)."""
    m = torch.zeros_like(p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format)
    if group["momentum_init"] == "terminal":
        # (not None: groups.check_group refuses a terminal start without friction)
        k = scheme.terminal(float(group["lr"]), float(group["gamma"]), float(group["xi0"]))
        force = (p.grad if grad is None else grad).to(m.dtype)
        force = -force if group["maximize"] else force.clone()
        wd = float(group["weight_decay"])
        if wd:
            force.add_(p.detach().to(m.dtype), alpha=wd)
        m.copy_(force.mul_(k))
    elif group["momentum_init"] == "thermal":
        chains = group["chains"]
        real = engine_view(dist_glue.local(m))
        views = [real[k] for k in range(chains)] if chains else [real]
        tau = float(group["tau"])
        for k, v in enumerate(views):
            seed = te_random.chain_seed(group["seed"], k) if chains else group["seed"]
            offset, runs = real_runs(p)
            z = te_random.normal_runs(v.numel(), seed=seed, uid=uid(gi, pos),
                                      step=te_random.THERMAL_STEP, draw=0, offset=offset,
                                      runs=runs, device=v.device)
            v.copy_((math.sqrt(tau) * z.to(v.dtype)).view(v.shape))
    return m


def group_xi(group, scheme: FoldedScheme, device, created: list) -> Optional[torch.Tensor]:
    """The group's ξ buffer (made at its first step; ``created`` logs it for a rollback)."""
    if not scheme.uses_thermostat:
        return None
    n = 1 if group["thermostat"] == "group" else len(group["params"])
    shape = (group["chains"], n) if group["chains"] else (n,)
    xi = group["xi"]
    if xi is None or tuple(xi.shape) != shape:
        created.append(("xi", group, xi))
        xi = torch.full(shape, float(group["xi0"]), dtype=torch.float64, device=device)
        group["xi"] = xi
    elif xi.device != device:
        xi = group["xi"] = xi.to(device)
    return xi


def step_tensor(group, device) -> torch.Tensor:
    """The group's step counter as an int64 tensor on ``device`` (made from the int the first
    time it is needed: capturable steps and compiled steps count on a tensor)."""
    s = group["step"]
    if not isinstance(s, torch.Tensor):
        s = group["step"] = torch.tensor(int(s), dtype=torch.int64, device=device)
    elif s.device != device:
        s = group["step"] = s.to(device)
    return s


def momentum_buffers(state, params: Sequence[torch.Tensor], key: str = "momentum_buffer") -> list:
    """The momentum buffer (or the state tensor ``key``) in ``state`` of each parameter (None
    where it has none), without creating state entries: what a record's engine calls step, so
    that a buffer replaced by assignment (or a state reset to empty) is noticed."""
    return [st.get(key) if (st := state.get(p)) else None for p in params]


def build_calls(gi: int, group: Dict[str, Any], scheme: FoldedScheme, active: tuple,
                grads: Sequence[Optional[torch.Tensor]], state, created: list,
                sum_hook_for: Callable, host_step: int = 0) -> List[EngineCall]:
    """The engine calls of group ``gi`` for the tensors at positions ``active`` (those with
    gradients: ``grads``, one per parameter), at the group's step ``host_step``. Creates the
    state they need (momenta and, with an adaptive mass, second moments in ``state``, ξ in the
    group), logging it in ``created`` so that a failed step can forget it."""
    wh = where(gi, group)
    chains = group["chains"]
    device = group["params"][active[0]].device
    # One call per dtype and way of reducing sums (a call has one sum hook): DTensors split
    # over different mesh dimensions, and replicated ones, apart.
    by_dtype: Dict[Tuple[torch.dtype, Optional[tuple]], list] = {}
    for pos in active:
        p = group["params"][pos]
        if p.device != device:
            raise ValueError(f"{wh}parameters on {device} and {p.device}; a group must live on "
                             f"one device")
        if chains and (dist_glue.is_dtensor(p) or p.dim() == 0 or p.shape[0] != chains):
            raise ValueError(f"{wh}{param_label(group, pos)}: with chains={chains} every "
                             f"parameter is a plain tensor stacked on a leading dimension of "
                             f"{chains}; got shape {tuple(p.shape)}")
        dtype = _real_dtype(p)
        if dtype not in kernels.DTYPES:
            raise TypeError(f"{wh}{param_label(group, pos)}: dtype {p.dtype} not supported; "
                            f"expected float32, float64, bfloat16, float16 or "
                            f"complex64/complex128")
        by_dtype.setdefault((dtype, dist_glue.sum_key(p)), []).append(pos)
    per_group = group["thermostat"] == "group"
    if per_group and scheme.n_e and len(by_dtype) > 1:
        dtypes = {d for d, _ in by_dtype}
        if len(dtypes) > 1:
            raise ValueError(f"{wh}thermostat='group' with an E letter needs one dtype per "
                             f"group; got {sorted(str(d) for d in dtypes)}: split the group")
        raise ValueError(f"{wh}thermostat='group' with an E letter over DTensor parameters "
                         f"sharded and replicated, or sharded over different mesh dimensions, "
                         f"is not supported (their sums are reduced over different ranks): use "
                         f"thermostat='tensor', or put them in separate groups")
    xi = group_xi(group, scheme, device, created)
    step_t = None
    if group["capturable"] and kernels.on_device(dist_glue.local(group["params"][active[0]])):
        step_t = step_tensor(group, device)
    adaptive = group["mass"] == "adaptive"
    calls = []
    for (dtype, reduced), positions in by_dtype.items():
        sources = [group["params"][k] for k in positions]
        momenta, masses, starts = [], [], []
        for pos, p in zip(positions, sources):
            m = None
            if scheme.uses_momentum:
                st = state[p]
                m = st.get("momentum_buffer")
                if m is None:
                    m = st["momentum_buffer"] = init_momentum(p, gi, pos, group, scheme,
                                                              grads[pos])
                    created.append(("momentum", p, None))
            momenta.append(m)
            if adaptive:
                st = state[p]
                v = st.get("exp_avg_sq")
                if v is None:  # its first gradient is this step's (docs/DESIGN.md, Mass)
                    v = st["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format)
                    st["mass_start"] = host_step
                    created.append(("mass", p, None))
                masses.append(v)
                starts.append(int(st.get("mass_start", 0)))
        dtensor = any(dist_glue.is_dtensor(p) for p in sources)
        views = [engine_view(dist_glue.local(p)) for p in sources]
        # Whole tensors (all shards), in real components.
        numels = [p.numel() * (2 if p.is_complex() else 1) // max(chains, 1) for p in sources]
        offsets, runs = map(list, zip(*map(real_runs, sources)))
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
                workspace = torch.empty(2 * scheme.n_e * xi_call.numel(), dtype=torch.float64,
                                        device=device)
            engine_params, copies = [], []
            for v in views:
                t = pick(v)
                if not t.is_contiguous():  # any other layout: step a contiguous copy
                    buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    copies.append((t, buf))
                    t = buf
                engine_params.append(t)
            calls.append(EngineCall(
                group_index=gi, scheme=scheme, positions=positions, chain=chain, sources=sources,
                dtensor=dtensor, params=engine_params, param_copies=copies,
                momenta=[None if m is None else pick(engine_view(dist_glue.local(m)))
                         for m in momenta],
                masses=[pick(engine_view(dist_glue.local(v))) for v in masses]
                if adaptive else None, mass_starts=starts if adaptive else None,
                segments=segments, seg_numel=seg_numel, offsets=offsets, runs=runs, xi=xi_call,
                xi_index=xi_index, xi_full=xi_full, workspace=workspace, step_tensor=step_t,
                seed=group["seed"] if chain is None else te_random.chain_seed(group["seed"],
                                                                              chain),
                sum_hook=sum_hook_for(sources[0]) if reduced is not None else None,
                group_size=len(group["params"])))
    return calls
