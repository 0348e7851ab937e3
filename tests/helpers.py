"""Small models, data, training loops and bitwise comparisons shared by the test files, and the
table of every scheme and named method an optimizer test can be parametrized over.

Importable from any test file as ``import helpers`` (pytest puts tests/ on sys.path, since tests/
is not a package).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

import thermo_ext as te

F32, F64 = torch.float32, torch.float64

#: Scheme strings run through :class:`thermo_ext.Thermo` (one group): the named schemes and two
#: custom splittings, one that folds to two O's per step and one that folds to a repeated A.
SCHEMES = ("langevin", "adl", "overdamped", "OBABO", "ABOBA")
#: The paper's named methods, each built from a model (or a list of partitions).
METHODS = ("Langevin", "AdL", "Overdamped", "LaLa", "AdLaLa", "LOL")
#: Every optimizer kind: a scheme string or a method name.
KINDS = SCHEMES + METHODS
#: Kinds whose parameters carry no momentum buffer (overdamped Langevin).
MOMENTUMLESS = ("overdamped", "Overdamped")
#: Kinds built from partitions (one group per partition) rather than from a flat parameter list.
PARTITIONED = ("LaLa", "AdLaLa", "LOL")
#: Kinds that take a flat parameter iterable (so also ``model.named_parameters()``).
FLAT = tuple(k for k in KINDS if k not in PARTITIONED)

#: Keyword arguments that silence all noise and the thermostat's drive (tau = sigma = 0).
COLD: Dict[str, Dict[str, float]] = {
    **{s: dict(tau=0.0, sigma=0.0) for s in SCHEMES},
    "Langevin": dict(tau=0.0),
    "AdL": dict(tau=0.0, sigma=0.0),
    "Overdamped": dict(tau=0.0),
    "LaLa": dict(tau=0.0),
    "AdLaLa": dict(tau1=0.0, tau2=0.0, sigma=0.0),
    "LOL": dict(tau1=0.0, tau2=0.0),
}


def kind_id(kind: str) -> str:
    """A test id that keeps the scheme "langevin" and the method "Langevin" apart."""
    return f"scheme={kind}" if kind in SCHEMES else f"method={kind}"


def kinds(xfail: Optional[Dict[str, str]] = None, only: Sequence[str] = KINDS) -> list:
    """``only`` as pytest params; those in ``xfail`` (kind -> reason) strictly expected to fail,
    so a behaviour that starts working turns the run red until its mark is removed."""
    xfail = xfail or {}
    return [pytest.param(k, id=kind_id(k),
                         marks=[pytest.mark.xfail(strict=True, reason=xfail[k])]
                         if k in xfail else [])
            for k in only]


def make(kind: str, model, **kw) -> te.Thermo:
    """The optimizer ``kind`` over ``model``: an nn.Module, or a list of partitions (lists of
    tensors; flattened into one group for the one-group kinds), or for the flat kinds any
    parameter iterable (named parameters included)."""
    if kind in PARTITIONED:
        return getattr(te, kind)(model, **kw)
    if isinstance(model, nn.Module):
        params: Any = model.parameters()
    elif isinstance(model, list) and model and isinstance(model[0], list):
        params = [p for part in model for p in part]
    else:
        params = model
    if kind in SCHEMES:
        return te.Thermo(params, scheme=kind, **kw)
    return getattr(te, kind)(params, **kw)


def mlp(seed: int = 0, dtype: torch.dtype = F32, hidden: Sequence[int] = (5, 3),
        act=nn.Tanh) -> nn.Sequential:
    """Three linear layers: three partitions for LaLa, first and rest for AdLaLa and LOL
    (``act`` after the first, tanh after the second)."""
    torch.manual_seed(seed)
    h1, h2 = hidden
    return nn.Sequential(nn.Linear(2, h1), act(), nn.Linear(h1, h2), nn.Tanh(),
                         nn.Linear(h2, 1)).to(dtype)


def relu_mlp(seed: int = 0, dtype: torch.dtype = F32) -> nn.Sequential:
    """The 2-16-8-1 network of the optimizer tests (ReLU, then tanh)."""
    return mlp(seed, dtype, hidden=(16, 8), act=nn.ReLU)


def batch(seed: int = 1, dtype: torch.dtype = F32):
    """The 32 points the optimizer tests train :func:`relu_mlp` on."""
    return data(seed, dtype, n=32)


def data(seed: int = 1, dtype: torch.dtype = F32, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    y = (x[:, :1] * x[:, 1:] > 0).to(dtype)
    return x, y


def backward(model, x, y) -> torch.Tensor:
    model.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    return loss


def train(model, opt, steps: int, x, y) -> None:
    for _ in range(steps):
        backward(model, x, y)
        opt.step()


def real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The real view of a complex tensor (the tensor itself otherwise)."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def snapshot(opt) -> List[tuple]:
    """Everything a step writes, in (group, position) order, cloned: parameters and momenta
    (complex ones as real views), each group's thermostat xi and step counter."""
    out = []
    for gi, g in enumerate(opt.param_groups):
        for pos, p in enumerate(g["params"]):
            m = opt.state.get(p, {}).get("momentum_buffer")
            out.append(("param", gi, pos, real(p.detach()).clone()))
            out.append(("momentum", gi, pos, None if m is None else real(m).clone()))
        xi = g.get("xi")
        out.append(("xi", gi, None if xi is None else xi.clone()))
        out.append(("step", gi, int(g["step"])))
    return out


_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a, b) -> bool:
    """Bitwise equality of tensors (so -0.0 differs from 0.0 and NaN equals the same NaN), or
    plain equality of anything else."""
    if not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return a == b
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = real(a).contiguous(), real(b).contiguous()
    if a.dtype.is_floating_point:
        size = a.element_size()
        return torch.equal(a.view(_INT_OF[size]), b.view(_INT_OF[size]))
    return torch.equal(a, b)


def assert_same(a, b, path: str = "") -> None:
    """Recursive bitwise equality of snapshots and state dicts, naming the first difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), \
            f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert same_bits(a, b), f"{path}: {a!r} != {b!r}"


def clone_state_dict(sd):
    """A detached copy, so that the live optimizer's later steps cannot change it."""
    return copy.deepcopy(sd)


class CallState:
    """Parameters, momenta, xi (and optionally gradients) of one engine call, drawn from
    ``gen`` in a fixed order: parameters, gradients (``with_grads``), momenta (zero, or normals
    times ``momentum_scale``), xi (uniform in [-0.05, 0.15), or all ``xi0``). ``thermostat``:
    one segment per tensor ("tensor") or one for all ("group"). The uids are those of param
    group ``uid_group``."""

    def __init__(self, shapes, dtype, scheme, *, gen, thermostat="tensor", with_grads=False,
                 zero_momenta=False, momentum_scale=1.0, xi0=None, uid_group=1):
        from thermo_ext import kernels
        from thermo_ext.schemes import fold

        self.scheme = fold(scheme) if isinstance(scheme, str) else scheme
        self.dtype = dtype
        self.shapes = [s if isinstance(s, tuple) else (s,) for s in shapes]
        n = len(self.shapes)
        self.params = [torch.randn(s, generator=gen, dtype=F64).to(dtype) for s in self.shapes]
        if with_grads:
            self.grads = [torch.randn(s, generator=gen, dtype=F64).to(dtype)
                          for s in self.shapes]
        mdt = kernels.momentum_dtype(dtype)
        if self.scheme.uses_momentum:
            self.momenta = [(torch.zeros(s, dtype=mdt) if zero_momenta else
                             (momentum_scale * torch.randn(s, generator=gen, dtype=F64)).to(mdt))
                            for s in self.shapes]
        else:
            self.momenta = [None] * n
        self.segments = list(range(n)) if thermostat == "tensor" else [0] * n
        n_seg = max(self.segments) + 1
        if xi0 is None:
            self.xi = 0.2 * torch.rand(n_seg, generator=gen, dtype=F64) - 0.05
        else:
            self.xi = torch.full((n_seg,), float(xi0), dtype=F64)
        self.uids = [kernels.uid(uid_group, i) for i in range(n)]
        self.offsets = [0] * n

    def copy(self, place=lambda t: t.clone()):
        """The same state with every tensor passed through ``place`` (a clone by default)."""
        c = object.__new__(type(self))
        c.__dict__.update(self.__dict__)
        c.params = [place(p) for p in self.params]
        if hasattr(self, "grads"):
            c.grads = [place(g) for g in self.grads]
        c.momenta = [place(m) if m is not None else None for m in self.momenta]
        c.xi = place(self.xi)
        return c

    def tensors(self):
        """Everything a step may write (xi only for schemes with a thermostat)."""
        out = list(self.params) + [m for m in self.momenta if m is not None]
        if self.scheme.uses_thermostat:
            out.append(self.xi)
        return out


def example(name: str):
    """The module of examples/<name>.py (its models are shared by the tests)."""
    import importlib.util
    import os
    import sys

    key = f"thermo_ext_example_{name}"
    if key not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def train_digits(model, opt, x, y, steps: int, seed: int, batch: int = 32) -> None:
    """``steps`` steps of cross-entropy on shuffled batches of (x, y), epoch after epoch (the
    order drawn from thermo_ext.data.generator(seed, "shuffle"))."""
    from thermo_ext.data import generator

    g = generator(seed, "shuffle")
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if done == steps:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1


def frozen_head_losses(make, steps: int = 200):
    """A linear head on frozen features with a large common mean (a random backbone's: the top
    eigenvalue of FᵀF/n far above the rest), as GUIDE §1's frozen_head: (first 5, last 20)
    mean batch losses."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 10, generator=g)
    x = torch.relu(torch.randn(1024, 64, generator=g)) + 3.0
    y = ((x - x.mean(0)) @ w).argmax(1)
    torch.manual_seed(0)
    head = nn.Linear(64, 10)
    opt = make(head)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 1024, (32,), generator=g)
        loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-20:]) / 20
