"""Param groups of a :class:`~thermo_ext.optim.Thermo`: their settings and validation, and the
engine calls a group's step is made of (docs/DESIGN.md, "Engine architecture").

A group's step is one engine call per (dtype[, chain]) list of its tensors that have gradients.
:func:`build_calls` makes them, with every buffer they need (momenta, ξ, workspace, the device
step counter); a :class:`GroupRecord` keeps them between steps and says when they must be
rebuilt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _C, kernels
from . import distributed as dist_glue
from . import random as te_random
from .schemes import FoldedScheme, fold

__all__ = ["THERMOSTATS", "MOMENTUM_INITS", "GROUP_KEYS", "HYPER_KEYS", "STRUCTURE_KEYS",
           "MAX_GROUPS", "uid", "where", "check_group", "hyper_values", "EngineCall",
           "GroupRecord", "build_calls", "engine_view", "momentum_dtype"]

THERMOSTATS = ("tensor", "group", "chain")
MOMENTUM_INITS = ("zero", "thermal")
#: The hyperparameters that only change a step's coefficients (a scheduler may change them).
HYPER_KEYS = ("lr", "gamma", "tau", "sigma", "eps", "weight_decay", "maximize")
#: The settings that shape a group's calls and buffers.
STRUCTURE_KEYS = ("scheme", "xi0", "thermostat", "momentum_init", "seed", "capturable", "chains")
#: Keys every saved group of a thermo_ext optimizer has (``maximize`` and torch's keys
#: ``foreach``/``fused``/``differentiable`` are optional: older checkpoints lack them).
GROUP_KEYS = tuple(k for k in HYPER_KEYS + STRUCTURE_KEYS if k != "maximize") + ("step", "xi")
MAX_GROUPS = _C.UID_LIMIT  # groups, and tensors per group, the noise counter's uid can name


uid = kernels.uid  # the noise counter's tensor id of (group, position): docs/DESIGN.md, Noise


def where(gi: int, group: Dict[str, Any]) -> str:
    """The prefix of every error about group ``gi``: its index and, when it has one, its name."""
    name = group.get("name")
    return f"param group {gi}" + (f" ({name!r})" if name is not None else "") + ": "


def param_label(group: Dict[str, Any], pos: int) -> str:
    """How errors name parameter ``pos`` of a group: its position and, when the group carries
    ``param_names``, its name."""
    names = group.get("param_names")
    return f"parameter {pos}" + (f" ({names[pos]!r})" if names else "")


def _hyper_value(where: str, key: str, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:  # torch.optim's type and words
            raise ValueError(f"{where}Tensor {key} must be 1-element")
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{where}{key}: expected a real number, got a {v.dtype} tensor")
        return float(v)
    return v


def hyper_values(where: str, group: Dict[str, Any]) -> tuple:
    """The group's hyperparameters as numbers (a 1-element tensor read on the host)."""
    return tuple(_hyper_value(where, k, group[k]) for k in HYPER_KEYS)


def check_group(group: Dict[str, Any], where: str) -> FoldedScheme:
    """Validates a merged param group; returns its folded scheme."""
    try:
        scheme = fold(group["scheme"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}{e}") from None
    lr, gamma, tau, sigma, eps, weight_decay, maximize = hyper_values(where, group)
    kernels.check_hyper(where, lr=lr, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                        weight_decay=weight_decay)
    if not isinstance(maximize, bool):
        raise TypeError(f"{where}maximize: expected a bool, got {maximize!r}")
    xi0 = group["xi0"]
    if isinstance(xi0, bool) or not isinstance(xi0, (int, float)) or not math.isfinite(xi0):
        raise ValueError(f"{where}xi0: expected a finite real number, got {xi0!r}")
    if group["thermostat"] not in THERMOSTATS:
        raise ValueError(f"{where}thermostat: expected one of {THERMOSTATS}, got "
                         f"{group['thermostat']!r}")
    chains = group["chains"]
    if isinstance(chains, bool) or not isinstance(chains, int) or not 0 <= chains < 2**31:
        raise ValueError(f"{where}chains: expected an int >= 0 (0: parameters are not stacked "
                         f"chains), got {chains!r}")
    if group["thermostat"] == "chain" and not chains:
        raise ValueError(f"{where}thermostat='chain' needs stacked chains (chains=K > 0)")
    if group["momentum_init"] not in MOMENTUM_INITS:
        raise ValueError(f"{where}momentum_init: expected one of {MOMENTUM_INITS}, got "
                         f"{group['momentum_init']!r}")
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"{where}capturable: expected a bool, got {group['capturable']!r}")
    kernels.check_int(f"{where}seed", group["seed"], 0, kernels.U64)
    return scheme


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


class EngineCall:
    """One engine call of a step: a (group, dtype[, chain]) list of tensors and its cached plan.

    ``sources`` are the optimizer's parameters; ``params`` and ``momenta`` the tensors the engine
    updates in place: the same tensors (complex ones as real views), the local shards of
    DTensors, chain ``chain`` of stacked parameters, or contiguous copies (``staged``: source,
    copy) of parameters with any other layout. ``grad_copies`` keeps, by position, the
    contiguous copies that non-contiguous gradients are read through, for the next steps.
    """

    __slots__ = ("group_index", "scheme", "positions", "chain", "sources", "dtensor", "params",
                 "momenta", "segments", "seg_numel", "offsets", "runs", "xi", "xi_index",
                 "xi_full", "workspace", "step_tensor", "seed", "sum_hook", "staged", "plan",
                 "grad_copies")

    def __init__(self, **kw):
        self.plan = None
        self.grad_copies: Dict[int, torch.Tensor] = {}
        for k, v in kw.items():
            setattr(self, k, v)

    def uids(self) -> List[int]:
        return [uid(self.group_index, k) for k in self.positions]

    def grads(self, group: Dict[str, Any], grad_of) -> List[torch.Tensor]:
        """The gradients the engine reads (``grad_of(source)``, its ``.grad`` in an eager step).
        torch's ``.grad`` setter already guarantees the parameter's shape, dtype and device;
        what is left is the layout."""
        grads = [grad_of(src) for src in self.sources]
        if self.dtensor:
            grads = [dist_glue.local(dist_glue.like_param(g, src))
                     for g, src in zip(grads, self.sources)]
        if self.chain is not None:
            grads = [g[self.chain] for g in grads]
        for k, g in enumerate(grads):
            if g.layout is not torch.strided:
                raise ValueError(f"{where(self.group_index, group)}"
                                 f"{param_label(group, self.positions[k])}: sparse gradients "
                                 f"are not supported")
            if g.is_complex():
                g = torch.view_as_real(g)
            if not g.is_contiguous():  # into a buffer kept for the next steps: no allocation
                buf = self.grad_copies.get(k)
                if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                    buf = self.grad_copies[k] = torch.empty(g.shape, dtype=g.dtype,
                                                            device=g.device)
                g = buf.copy_(g)
            grads[k] = g
        return grads


@dataclasses.dataclass
class GroupRecord:
    """What ``step()`` keeps of a param group between steps: its engine calls, what they were
    built for (the tensors with gradients and their addresses, their momentum buffers, the
    group's buffers, the optimizer's state version, the structural settings: any change
    rebuilds them), and the hyperparameters last validated (``raw`` as read from the group,
    ``hyper`` as numbers)."""

    active: tuple
    addresses: tuple
    momenta: tuple
    buffers: tuple
    version: int
    structure: tuple
    raw: tuple
    hyper: tuple
    scheme: FoldedScheme
    calls: List[EngineCall]
    capturable: bool = False

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

    def fill_device_hyper(self) -> None:
        """Writes the group's hyperparameters to ``device_hyper`` (on the device, no host
        read): tensors are copied every step (so that a captured graph copies their current
        values), floats written when they change."""
        fields = self.raw[:len(kernels.HYPER_FIELDS)]
        floats = tuple(None if isinstance(v, torch.Tensor) else v for v in fields)
        for k, v in enumerate(fields):
            if isinstance(v, torch.Tensor):
                self.device_hyper[k].copy_(v.reshape(()))
            elif self.device_filled is None or self.device_filled[k] != v:
                self.device_hyper[k].fill_(float(v))
        self.device_filled = floats


def real_runs(p: torch.Tensor) -> Tuple[int, Optional[Tuple[int, int]]]:
    """:func:`distributed.shard_runs` of ``p`` counted in real components (a complex element is
    two), as the engine steps it."""
    c = 2 if p.is_complex() else 1
    offset, runs = dist_glue.shard_runs(p)
    return offset * c, None if runs is None else (runs[0] * c, runs[1] * c)


def init_momentum(p: torch.Tensor, gi: int, pos: int, group: Dict[str, Any]) -> torch.Tensor:
    """Zero, or thermal: √τ R with R from the counter's step field 2³²−1, draw 0 (for each
    chain with its own seed; for a shard, the shard's global offsets; for a complex parameter,
    per real component)."""
    m = torch.zeros_like(p, dtype=momentum_dtype(p), memory_format=torch.contiguous_format)
    if group["momentum_init"] == "thermal":
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


def momentum_buffers(state, params: Sequence[torch.Tensor]) -> tuple:
    """The momentum buffer in ``state`` of each parameter (None where it has none), without
    creating state entries: what a record's engine calls step, so that a buffer replaced by
    assignment (or a state reset to empty) is noticed."""
    out = []
    for p in params:
        st = state.get(p)
        out.append(st.get("momentum_buffer") if st else None)
    return tuple(out)


def build_calls(gi: int, group: Dict[str, Any], scheme: FoldedScheme, active: tuple,
                state, created: list, sum_hook_for: Callable) -> List[EngineCall]:
    """The engine calls of group ``gi`` for the tensors at positions ``active`` (those with
    gradients). Creates the state they need (momenta in ``state``, ξ in the group), logging it
    in ``created`` so that a failed step can forget it."""
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
    calls = []
    for (dtype, reduced), positions in by_dtype.items():
        sources = [group["params"][k] for k in positions]
        momenta = []
        for pos, p in zip(positions, sources):
            m = None
            if scheme.uses_momentum:
                st = state[p]
                m = st.get("momentum_buffer")
                if m is None:
                    m = st["momentum_buffer"] = init_momentum(p, gi, pos, group)
                    created.append(("momentum", p, None))
            momenta.append(m)
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
            engine_params, staged = [], []
            for v in views:
                t = pick(v)
                if not t.is_contiguous():  # any other layout: step a contiguous copy
                    buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    staged.append((t, buf))
                    t = buf
                engine_params.append(t)
            calls.append(EngineCall(
                group_index=gi, scheme=scheme, positions=positions, chain=chain, sources=sources,
                dtensor=dtensor, params=engine_params, staged=staged,
                momenta=[None if m is None else pick(engine_view(dist_glue.local(m)))
                         for m in momenta],
                segments=segments, seg_numel=seg_numel, offsets=offsets, runs=runs, xi=xi_call,
                xi_index=xi_index, xi_full=xi_full, workspace=workspace, step_tensor=step_t,
                seed=group["seed"] if chain is None else te_random.chain_seed(group["seed"],
                                                                              chain),
                sum_hook=sum_hook_for(sources[0]) if reduced is not None else None))
    return calls
