"""Many independent chains of a small model in one fused optimizer step.

The K copies' parameters are stacked on a leading chain dimension
(``torch.func.stack_module_state``) and the forward pass is vectorised over chains with
``torch.func.vmap`` and ``functional_call``. An optimizer built on a :class:`Chains` module (any
named method, or ``te.Thermo(..., chains=K)``) runs every chain with its own noise (seed
``te.random.chain_seed(seed, k)``) and its own thermostats, in one engine call per group.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from . import partition

__all__ = ["Chains"]


class Chains(nn.Module):
    """K independent copies of ``model`` with stacked parameters.

    Args:
        model: a module (copied K times and re-initialised per chain) or a function returning a
            fresh module.
        num_chains: K.
        init_seed: chain k's weights are initialised after ``torch.manual_seed(init_seed + k)``
            (drawn from torch's default generator when None).
    """

    def __init__(self, model: Union[nn.Module, Callable[[], nn.Module]], num_chains: int, *,
                 init_seed: Optional[int] = None):
        super().__init__()
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains: expected an int >= 1, got {num_chains!r}")
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**31, (1,)))
        models = []
        state = torch.random.get_rng_state()
        try:
            for k in range(num_chains):
                torch.manual_seed(init_seed + k)
                if isinstance(model, nn.Module):
                    m = copy.deepcopy(model)
                    for mod in m.modules():
                        if hasattr(mod, "reset_parameters"):
                            mod.reset_parameters()
                elif callable(model):
                    m = model()
                    if not isinstance(m, nn.Module):
                        raise TypeError(f"model: the factory returned {type(m).__name__}, "
                                        f"expected an nn.Module")
                else:
                    raise TypeError(f"model: expected an nn.Module or a function returning one, "
                                    f"got {type(model).__name__}")
                models.append(m)
        finally:
            torch.random.set_rng_state(state)
        params, buffers = stack_module_state(models)
        self.num_chains = num_chains
        self._names = list(params)
        # nn.ParameterDict keys may not contain '.', so keep the stacked tensors under safe keys
        # (an OrderedDict: ParameterDict sorts the keys of a plain dict, which would reorder the
        # parameters against the template's and so change their uids)
        self.stacked = nn.ParameterDict(
            OrderedDict((_key(n), nn.Parameter(t)) for n, t in params.items()))
        for n, b in buffers.items():
            self.register_buffer("buffer_" + _key(n), b)
        self._buffer_names = list(buffers)
        # Not a registered submodule: its (meta) parameters must not show up in parameters().
        self.__dict__["template"] = copy.deepcopy(models[0]).to("meta")

    def stacked_parameters(self) -> Dict[str, torch.Tensor]:
        return {n: self.stacked[_key(n)] for n in self._names}

    def stacked_buffers(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, "buffer_" + _key(n)) for n in self._buffer_names}

    def forward(self, x: torch.Tensor, *, per_chain_input: bool = False) -> torch.Tensor:
        """Outputs of every chain, stacked: shape [K, ...]. ``x`` is shared by the chains, or
        (``per_chain_input=True``) has a leading chain dimension."""
        def one(params, buffers, inp):
            return functional_call(self.template, (params, buffers), (inp,))

        return vmap(one, in_dims=(0, 0, 0 if per_chain_input else None))(
            self.stacked_parameters(), self.stacked_buffers(), x)

    def partitions(self) -> List[List[torch.Tensor]]:
        """The stacked parameters grouped by the template's layers (see partition.layers)."""
        names = {id(p): n for n, p in self.template.named_parameters()}
        params = self.stacked_parameters()
        return [[params[names[id(p)]] for p in layer]
                for layer in partition.layers(self.template)]

    def chain(self, k: int) -> nn.Module:
        """A plain module holding a copy of chain k's current parameters."""
        if not 0 <= k < self.num_chains:
            raise ValueError(f"k: expected 0 <= k < {self.num_chains}, got {k}")
        m = copy.deepcopy(self.template).to_empty(device=next(iter(self.stacked.values())).device)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(self.stacked_parameters()[n][k])
            for n, b in m.named_buffers():
                b.copy_(self.stacked_buffers()[n][k])
        return m

    @torch.no_grad()
    def mean_prediction(self, x: torch.Tensor,
                        transform: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
                        ) -> torch.Tensor:
        """The ensemble average over chains of ``transform(output)`` (e.g. torch.sigmoid)."""
        return transform(self(x)).mean(0)


def _key(name: str) -> str:
    return name.replace(".", "__")
