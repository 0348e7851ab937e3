"""Splitting a model's parameters into partitions (param groups) by layer."""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["layers", "first_and_rest"]

ModelLike = Union[nn.Module, Sequence[Iterable[torch.Tensor]]]


def layers(model: ModelLike) -> List[List[torch.Tensor]]:
    """One list of parameters per module that owns parameters directly, in module order.

    A parameter shared between modules belongs to the first module that owns it. ``model`` may
    also be an explicit sequence of parameter iterables, one per partition.
    """
    if isinstance(model, nn.Module):
        seen = set()
        out = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                out.append(own)
        if not out:
            raise ValueError("model: the module has no parameters")
        return out
    if isinstance(model, (str, bytes)) or not isinstance(model, Sequence):
        raise TypeError(f"model: expected an nn.Module or a sequence of parameter iterables, got "
                        f"{type(model).__name__}")
    out = []
    for i, part in enumerate(model):
        if isinstance(part, torch.Tensor):
            raise TypeError(f"model[{i}]: expected an iterable of parameters (a partition), got a "
                            f"single tensor; wrap it in a list")
        params = list(part)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"model[{i}]: expected tensors, got {type(p).__name__}")
        if not params:
            raise ValueError(f"model[{i}]: empty partition")
        out.append(params)
    if not out:
        raise ValueError("model: no partitions")
    return out


def first_and_rest(model: ModelLike) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(the first layer's parameters, all the others)."""
    parts = layers(model)
    if len(parts) < 2:
        raise ValueError(f"model: a two-partition method needs at least two layers (partitions), "
                         f"got {len(parts)}")
    return parts[0], [p for part in parts[1:] for p in part]

