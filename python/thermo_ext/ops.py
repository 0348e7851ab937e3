"""The engine as torch.library ops: what ``torch.compile`` sees of a thermo_ext step
(docs/DESIGN.md, "torch.compile").

``thermo_ext::step(int optimizer, Tensor(a!)[] params, Tensor(b!)[] state, Tensor[] grads)``
is one whole optimizer step. Its schema declares every tensor the step writes (parameters;
momenta, thermostats, step counters and the device flag) and reads (gradients), so the compiler
orders it correctly and keeps it in place; its fake implementation does nothing (a step returns
nothing and allocates nothing the graph sees). Caching, validation, locks and address checks
all live in the implementation, which the compiler never traces: it runs the optimizer's own
eager step (:meth:`thermo_ext.Thermo._step_undoable`), so a compiled step gives eager's bits.

An eager ``Thermo.step()`` calls that implementation directly: the dispatcher would cost more
than a small model's whole step.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import List

import torch

__all__ = ["register", "tensor_lists", "STEP_SCHEMA"]

STEP_SCHEMA = ("step(int optimizer, Tensor(a!)[] params, Tensor(b!)[] state, Tensor[] grads) "
               "-> ()")

_OPTIMIZERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(optimizer) -> int:
    """A handle for ``optimizer`` that the compiled graph passes to the op (weakly held)."""
    handle = next(_NEXT)
    _OPTIMIZERS[handle] = optimizer
    return handle


def tensor_lists(opt) -> tuple:
    """(params, state): the tensors a compiled step of ``opt`` hands its op: every parameter,
    and every state tensor the step writes (momenta, second moments, ξ, device step counters,
    the device flag and skip counter). Made anew whenever they change (``opt`` keeps them as plain
    attributes), so that a graph compiled before sees the change: its guards fail and it
    recompiles once."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [st[key] for p in params if (st := opt.state.get(p)) is not None
             for key in ("momentum_buffer", "exp_avg_sq") if key in st]
    for g in opt.param_groups:
        state.extend(t for t in (g["xi"], g["step"]) if isinstance(t, torch.Tensor))
    state.extend(opt._cache.flags.values())
    state.extend(opt._skipped.values())
    return params, state


def _step(optimizer: int, params: List[torch.Tensor], state: List[torch.Tensor],
          grads: List[torch.Tensor]) -> None:
    opt = _OPTIMIZERS.get(optimizer)
    if opt is None:
        raise RuntimeError("thermo_ext::step: the optimizer of this compiled step no longer "
                           "exists")
    matched = _match(params, opt._params)
    if matched is None:
        raise RuntimeError("thermo_ext::step: the compiled step was handed a tensor that is not "
                           "one of the optimizer's parameters (a graph compiled for another "
                           "optimizer's tensors: recompile)")
    if all(map(operator.is_, grads, (p.grad for p in matched))):
        opt._step_undoable()  # a compiled opt.step(): the gradients are the .grad fields
        return
    # The gradients the graph computed: inside a compiled train step the parameters' .grad
    # fields are only written once the graph returns.
    grad = dict(zip(map(id, matched), grads))
    opt._step_undoable(lambda p: grad.get(id(p)))


def _match(given: List[torch.Tensor], mine: List[torch.Tensor]):
    """The optimizer's parameters that ``given`` are, in order, or None: by identity, which is
    what a compiled graph hands over, else by storage (the same parameter through another
    tensor object)."""
    if len(given) == len(mine) and all(map(operator.is_, given, mine)):
        return given  # every parameter has a gradient: the usual case, checked cheaply
    it = iter(mine)
    if all(any(g is m for m in it) for g in given):
        return given
    addresses = {m.data_ptr(): m for m in mine}
    matched = [addresses.get(g.data_ptr()) for g in given]
    return None if any(m is None for m in matched) else matched


def _step_fake(optimizer, params, state, grads) -> None:
    return None


_LIB = torch.library.Library("thermo_ext", "DEF")
_LIB.define(STEP_SCHEMA)
_LIB.impl("step", _step, "CompositeExplicitAutograd")
torch.library.register_fake("thermo_ext::step", _step_fake, lib=_LIB)
