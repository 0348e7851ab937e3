"""Splitting a model's parameters into partitions (param groups) by layer.

A *partition* is the trainable parameters one module owns directly (``requires_grad=True``;
frozen parameters are never partitioned), labelled with the module's path (``"encoder.layers.0
.linear1"``) and carrying the parameters' names, so that every group of an optimizer built from
it, and every error about one of its parameters, can say which parameter it means.

The layer methods (LaLa, AdLaLa, LOL) take any of:

* an ``nn.Module``: one partition per module that owns trainable parameters directly, in
  registration order (``model.named_modules()``); a parameter shared between modules belongs to
  the first module that owns it, and the originals of a tensor parametrized with
  ``torch.nn.utils.parametrize`` (``weight_norm``'s g and v under ``<module>.parametrizations``)
  belong to the parametrized module;
* ``model.named_parameters()``-style input, an iterable of ``(name, tensor)`` pairs: one
  partition per module path (the name up to its last dot), in order of first appearance;
* explicit partitions, an iterable (a list, a generator) of partitions, each an ``nn.Module``
  (its trainable parameters) or an iterable of tensors or ``(name, tensor)`` pairs.

A flat iterable of tensors (``model.parameters()``) has no layer structure and is refused with a
TypeError saying what to pass instead; so is a partition that ends up empty (all its parameters
frozen, or a generator already used up by an earlier partition) and a parameter given twice.

**The first layer** (AdLaLa's adaptive-Langevin partition, LOL's Langevin partition) is, unless
chosen with ``first=``, the first *layer* partition in that order: one whose module has no
descendant owning trainable parameters. Parameters a container owns directly (a positional
embedding or a class token on the top module, ``in_proj_weight`` of ``nn.MultiheadAttention``)
form partitions of their own, which LaLa steps as a group of their own and the two-partition
methods put with the rest. Registration order is not call order: a head registered before the
body is the first layer, so pass ``first=model.body[0]`` (a module), ``first="body.0"`` (a
module path or parameter name) or ``first=[...]`` (parameters or named pairs) to choose it.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Partition", "partitions", "layers", "first_and_rest", "split_first"]

ModelLike = Union[nn.Module, Iterable]
FirstLike = Union[None, nn.Module, str, Iterable]

#: The label of the partition of parameters owned directly by the top module.
TOP = "(top)"


class Partition(NamedTuple):
    """One partition: ``name`` (the module path, or ``"partition i"`` for unnamed explicit
    input), its parameters and their names (None when the input had none), and whether it is a
    layer (its module has no descendant owning trainable parameters)."""

    name: str
    params: List[torch.Tensor]
    param_names: Optional[List[str]]
    layer: bool


def _is_pair(x) -> bool:
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], torch.Tensor))


def _path(name: str) -> str:
    return name.rpartition(".")[0]


def _owner(path: str, model: Optional[nn.Module] = None) -> str:
    """The module path a parameter belongs to: torch.nn.utils.parametrize keeps a parametrized
    tensor's originals under ``<module>.parametrizations.<tensor>``, and they belong to
    ``<module>`` (a weight-normed Linear's g and v go with its bias). With ``model``, only a
    module that really is parametrized; from names alone, the component ``parametrizations``."""
    pieces = path.split(".")
    if "parametrizations" not in pieces:
        return path
    owner = ".".join(pieces[:pieces.index("parametrizations")])
    if model is not None and not parametrize.is_parametrized(model.get_submodule(owner)):
        return path
    return owner


def _label(path: str) -> str:
    return path if path else TOP


def _with_layer_flags(parts: List[Tuple[str, List[torch.Tensor], Optional[List[str]]]],
                      paths: Optional[List[str]]) -> List[Partition]:
    """Marks the partitions whose path has no descendant among the others' paths as layers."""
    out = []
    for k, (name, params, names) in enumerate(parts):
        layer = True
        if paths is not None:
            me = paths[k]
            layer = not any(other != me and (me == "" or other.startswith(me + "."))
                            for other in paths)
        out.append(Partition(name, params, names, layer))
    return out


def _from_module(model: nn.Module, where: str = "model") -> List[Partition]:
    seen = set()
    by_path: Dict[str, Tuple[list, list]] = {}
    for path, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            params, names = by_path.setdefault(_owner(path, model), ([], []))
            params.append(p)
            names.append(f"{path}.{pname}" if path else pname)
    paths = list(by_path)
    parts = [(_label(path), *by_path[path]) for path in paths]
    if not parts:
        raise ValueError(f"{where}: the module has no trainable parameters (none, or all have "
                         f"requires_grad=False)")
    return _with_layer_flags(parts, paths)


def _frozen_layers(model: ModelLike) -> List[str]:
    """The modules of ``model`` (an nn.Module; else none) that own parameters, all frozen."""
    if not isinstance(model, nn.Module):
        return []
    out = []
    for path, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            out.append(_label(path))
    return out


def _from_pairs(pairs: List[Tuple[str, torch.Tensor]], where: str) -> List[Partition]:
    by_path = {}
    seen = {}
    for name, p in pairs:
        if id(p) in seen:
            raise ValueError(f"{where}: parameter {name!r} is the same tensor as "
                             f"{seen[id(p)]!r}; pass each parameter once")
        seen[id(p)] = name
        if not p.requires_grad:
            continue
        params, names = by_path.setdefault(_owner(_path(name)), ([], []))
        params.append(p)
        names.append(name)
    if not by_path:
        raise ValueError(f"{where}: no trainable parameters (all have requires_grad=False)")
    paths = list(by_path)
    parts = [(_label(path), *by_path[path]) for path in paths]
    return _with_layer_flags(parts, paths)


def _common_path(names: Sequence[str]) -> str:
    split = [n.split(".")[:-1] for n in names]
    common = []
    for pieces in zip(*split):
        if any(x != pieces[0] for x in pieces):
            break
        common.append(pieces[0])
    return ".".join(common)


def _explicit(items: list, where: str) -> List[Partition]:
    parts = []
    owner = {}
    for i, part in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(part, torch.Tensor):
            raise TypeError(f"{at}: expected a partition (a module or an iterable of parameters), "
                            f"got a single tensor; wrap it in a list")
        if isinstance(part, dict):
            raise TypeError(f"{at}: expected a partition (a module or an iterable of parameters), "
                            f"got a dict; param-group dicts go to te.Thermo")
        if isinstance(part, nn.Module):
            entries = list(part.named_parameters())
        elif isinstance(part, (str, bytes)) or not isinstance(part, Iterable):
            raise TypeError(f"{at}: expected a partition (a module or an iterable of parameters), "
                            f"got {type(part).__name__}")
        else:
            entries = list(part)
        params, names, frozen = [], [], 0
        for j, e in enumerate(entries):
            if _is_pair(e):
                name, p = e
            elif isinstance(e, torch.Tensor):
                name, p = None, e
            else:
                raise TypeError(f"{at}: expected tensors or (name, tensor) pairs, got "
                                f"{type(e).__name__} at position {j}")
            if id(p) in owner:
                raise ValueError(f"{at}: parameter {name or j!r} appears more than once (it "
                                 f"was already given in {where}[{owner[id(p)]}]); pass each "
                                 f"parameter once")
            owner[id(p)] = i
            if not p.requires_grad:
                frozen += 1
                continue
            params.append(p)
            names.append(name)
        if not params:
            why = (f"all its {frozen} parameters are frozen (requires_grad=False)" if frozen else
                   "it is empty (a generator used up by an earlier partition?)")
            raise ValueError(f"{at}: a partition with no trainable parameters: {why}")
        if isinstance(part, nn.Module):
            label = f"partition {i} ({type(part).__name__})"
        elif all(n is not None for n in names):
            label = _common_path(names) or f"partition {i}"
        else:
            label = f"partition {i}"
        if any(n is None for n in names):
            names = None
        parts.append(Partition(label, params, names, True))
    if not parts:
        raise ValueError(f"{where}: no partitions")
    if any(p.param_names is None for p in parts):  # torch wants names on every group or none
        parts = [p._replace(param_names=None) for p in parts]
    return parts


def partitions(model: ModelLike, *, where: str = "model") -> List[Partition]:
    """The partitions of ``model`` (see the module docstring for what it may be)."""
    if isinstance(model, nn.Module):
        return _from_module(model, where)
    if isinstance(model, (str, bytes, torch.Tensor, dict)) or not isinstance(model, Iterable):
        raise TypeError(f"{where}: expected an nn.Module, named_parameters() pairs or an iterable "
                        f"of partitions, got {type(model).__name__}")
    items = list(model)
    if not items:
        raise ValueError(f"{where}: empty (no partitions or parameters; a generator used up "
                         f"before?)")
    if all(_is_pair(x) for x in items):
        return _from_pairs(items, where)
    if all(isinstance(x, torch.Tensor) for x in items):
        raise TypeError(f"{where}: a flat list of tensors (model.parameters()) has no layers; "
                        f"pass the model itself, model.named_parameters(), or a list of "
                        f"partitions (one list of parameters per partition)")
    return _explicit(items, where)


def layers(model: ModelLike) -> List[List[torch.Tensor]]:
    """One list of parameters per partition of ``model`` (see :func:`partitions`)."""
    return [p.params for p in partitions(model)]


def _first_params(model: ModelLike, parts: List[Partition], first) -> List[torch.Tensor]:
    if isinstance(first, nn.Module):
        return [p for p in first.parameters() if p.requires_grad]
    if isinstance(first, str):
        if isinstance(model, nn.Module):
            try:
                sub = model.get_submodule(first) if first else model
            except AttributeError:
                sub = None
            if sub is not None:
                return [p for p in sub.parameters() if p.requires_grad]
        by_name = [(n, p) for part in parts for n, p in zip(part.param_names or [], part.params)]
        chosen = [p for n, p in by_name if n == first or n.startswith(first + ".")]
        if not chosen:
            known = [part.name for part in parts]
            raise ValueError(f"first: no module or parameter named {first!r}; the partitions are "
                             f"{known[:8]}{' ...' if len(known) > 8 else ''}")
        return chosen
    if isinstance(first, (bytes, torch.Tensor)) or not isinstance(first, Iterable):
        raise TypeError(f"first: expected a module, a module or parameter name, or an iterable "
                        f"of parameters, got {type(first).__name__}")
    out = []
    for e in first:
        p = e[1] if _is_pair(e) else e
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"first: expected tensors or (name, tensor) pairs, got "
                            f"{type(e).__name__}")
        if p.requires_grad:
            out.append(p)
    return out


def split_first(model: ModelLike, first: FirstLike = None, *, where: str = "model"
                ) -> Tuple[Partition, Partition]:
    """The two partitions of the two-partition methods: (the first layer, all the others).

    ``first`` chooses the first layer (see the module docstring); by default the first layer
    partition in registration order.
    """
    parts = partitions(model, where=where)
    named = all(p.param_names is not None for p in parts)
    if first is None:
        if len(parts) < 2:
            frozen = _frozen_layers(model)
            listed = ", ".join(map(repr, frozen[:4])) + (" ..." if len(frozen) > 4 else "")
            why = (f" ({len(frozen)} more whose parameters are all frozen, requires_grad=False, "
                   f"do not count: {listed})" if frozen else "")
            raise ValueError(f"{where}: a two-partition method needs at least two layers "
                             f"(partitions) with trainable parameters, got {len(parts)}{why}; "
                             f"for one layer use one of its partitions' methods (AdLaLa: "
                             f"te.AdL or te.Langevin; LOL: te.Langevin or te.Overdamped)")
        head = next((p for p in parts if p.layer), parts[0])
        chosen = {id(t) for t in head.params}
        label = head.name
    else:
        chosen_list = _first_params(model, parts, first)
        if not chosen_list:
            raise ValueError("first: no trainable parameters (empty, or all frozen)")
        chosen = {id(t) for t in chosen_list}
        known = {id(t) for part in parts for t in part.params}
        if not chosen <= known:
            raise ValueError(f"first: {len(chosen - known)} of its parameters are not trainable "
                             f"parameters of {where}")
        if isinstance(first, str):
            label = first or TOP
        elif isinstance(first, nn.Module) and isinstance(model, nn.Module):
            label = next((n or TOP for n, m in model.named_modules() if m is first),
                         type(first).__name__)
        else:
            label = "first"
    head_params, head_names, rest_params, rest_names = [], [], [], []
    for part in parts:
        for k, t in enumerate(part.params):
            name = part.param_names[k] if named else None
            if id(t) in chosen:
                head_params.append(t)
                head_names.append(name)
            else:
                rest_params.append(t)
                rest_names.append(name)
    if not rest_params:
        raise ValueError(f"first: it holds every trainable parameter of {where}, leaving the "
                         f"second partition empty")
    return (Partition(label, head_params, head_names if named else None, True),
            Partition(f"rest (all but {label})", rest_params, rest_names if named else None,
                      False))


def first_and_rest(model: ModelLike, first: FirstLike = None
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(the first layer's parameters, all the others): see :func:`split_first`."""
    head, rest = split_first(model, first)
    return head.params, rest.params
