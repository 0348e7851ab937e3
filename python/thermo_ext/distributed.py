"""torch.distributed glue: DTensor shards (FSDP2, HSDP, tensor parallelism), the seed every rank
shares, the thermostat's all-reduced sums, and the agreement of all ranks on a refused step
(docs/DESIGN.md, "Failure model", "Distributed training").

A DTensor parameter is stepped through its local shard, with the shard's global offset (and, for
a shard on another dim than 0, its runs of global indices) feeding the noise counter, so that
the sharded run draws the noise of the unsharded one; its gradient is first brought to the
parameter's placements (a Partial one is reduced). The E letter's Σp² is all-reduced over the
mesh dimensions that shard the tensor (a replicated one counts once). A step that one rank must
refuse (a non-finite value in its shard) is refused by every rank: the
ranks agree on the verdict before anything is written or any thermostat sum is exchanged, so no
rank writes alone and none waits forever in a collective.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._compat import compute_local_shape_and_global_offset, dtensor_type
from .refusal import Refusal

__all__ = ["is_dtensor", "is_sharded", "local", "like_param", "shard_runs", "sum_key",
           "sum_groups", "mesh_sum_hook", "broadcast_seed", "all_reduce_sum", "Agreement"]


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    return torch.distributed.is_available() and _dist().is_initialized()


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the engine steps: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def _splits(pl) -> bool:
    """Whether a placement splits the tensor over its mesh dimension: Shard, or _StridedShard
    (FSDP2 over tensor parallelism), which is not a Shard (nor is_shard()) in every torch."""
    return pl.is_shard() or type(pl).__name__ == "_StridedShard"


def shard_runs(p) -> Tuple[int, Optional[Tuple[int, int]]]:
    """Where a DTensor's local elements sit in the whole tensor, for the noise counter:
    (offset, None) when local element l is global element ``offset + l`` (plain tensors,
    replicated ones, shards on dim 0: FSDP2, HSDP), or (offset, (run, stride)) when it is
    ``offset + (l // run) * stride + l % run`` (a shard on another dim, as tensor parallelism's
    row-wise weights: runs of ``run`` elements, one per index of the dims before it)."""
    if not is_dtensor(p):
        return 0, None
    for pl in p.placements:
        if not (_splits(pl) or pl.is_replicate()):
            raise ValueError(f"DTensor parameters must be sharded or replicated; got "
                             f"placements {p.placements}")
    # A local shard is a box of the whole tensor at these offsets (FSDP2 on top of tensor
    # parallelism's _StridedShard included), as torch.distributed.checkpoint also relies on.
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                p.placements)
    whole = list(p.shape)
    split = [d for d in range(len(whole)) if int(local_shape[d]) != whole[d]]
    if not split:
        return 0, None
    k = split[-1]
    if any(d not in (0, k) for d in split):
        raise ValueError(f"DTensor parameters may be split on dim 0 and one more dim, got "
                         f"placements {p.placements} (local shape {tuple(local_shape)} of "
                         f"{tuple(whole)})")
    inner = math.prod(whole[k + 1:])
    start = int(offset[k]) * inner
    if k == 0:
        return start, None
    start += int(offset[0]) * math.prod(whole[1:])
    return start, (int(local_shape[k]) * inner, whole[k] * inner)


def mesh_group(p):
    """The process group of a DTensor's mesh; None (the default group) for a mesh of several
    dimensions, which has no single group."""
    mesh = p.device_mesh
    return mesh.get_group() if mesh.ndim == 1 else None


def _split_dims(p) -> Tuple[int, ...]:
    """The mesh dimensions that split the DTensor ``p`` (none for plain or replicated
    tensors): its ranks along them hold different elements."""
    if not is_dtensor(p):
        return ()
    return tuple(i for i, pl in enumerate(p.placements) if _splits(pl))


def is_sharded(p) -> bool:
    """Whether ``p`` is a DTensor split over some dimension of its mesh, not only replicated."""
    return bool(_split_dims(p))


def sum_key(p) -> Optional[tuple]:
    """What decides how a sum over ``p``'s local elements is reduced: None for plain and
    replicated tensors (not at all), else its mesh and the mesh dimensions that split it."""
    dims = _split_dims(p)
    return (id(p.device_mesh), dims) if dims else None


def sum_groups(p) -> list:
    """The process groups over which a sum of ``p``'s local elements is all-reduced to give the
    whole tensor's sum: those of the mesh dimensions that shard it. A replicated dimension holds
    the same elements on every rank: summing over it would count each of them once per rank."""
    return [p.device_mesh.get_group(mesh_dim=i) for i in _split_dims(p)]


def like_param(g, p):
    """``p``'s gradient ``g`` in ``p``'s placements: a Partial gradient (tensor parallelism
    leaves replicated parameters' gradients as per-rank summands) is reduced, as torch's
    optimizers' DTensor ops would reduce it, before the engine reads its local part."""
    if is_dtensor(g) and is_dtensor(p) and tuple(g.placements) != tuple(p.placements):
        return g.redistribute(p.device_mesh, p.placements)
    return g


def mesh_sum_hook(p) -> Callable[[torch.Tensor], None]:
    """All-reduces an E phase's segment sums over the mesh dimensions that shard the DTensor
    (one small all-reduce per such dimension)."""
    dist = _dist()
    groups = sum_groups(p)

    def hook(sums: torch.Tensor) -> None:
        for group in groups:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

    return hook


def _collective_device():
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int) -> int:
    """Under an initialised process group every rank takes rank 0's seed (DDP/FSDP replicas
    must draw the same noise)."""
    if not initialized():
        return seed
    t = torch.tensor([seed >> 32, seed & 0xFFFFFFFF], dtype=torch.int64,
                     device=_collective_device())
    _dist().broadcast(t, src=0)
    hi, lo = t.tolist()
    return (hi << 32) | lo


def all_reduce_sum(t: torch.Tensor, like) -> torch.Tensor:
    """Sums ``t`` over the mesh dimensions that shard the DTensor ``like`` (in place);
    replicated DTensors and plain tensors: unchanged."""
    for group in sum_groups(like):
        _dist().all_reduce(t, group=group)
    return t


class Agreement:
    """All ranks' verdict on one step: the step is refused everywhere if any rank refuses it.

    ``group`` is the process group of the step's collectives (the DTensors' mesh, or the default
    group). :meth:`verdict` is a collective: every rank calls it once per step at the same
    point, with its own local result.
    """

    def __init__(self, group=None):
        self.group = group

    @staticmethod
    def for_tensors(tensors: Sequence[torch.Tensor], needs: bool) -> Optional["Agreement"]:
        """The agreement a step over ``tensors`` needs: when any is a DTensor shard (its rank
        holds a different part of the model) or ``needs`` (a collective in the step), under an
        initialised process group; None otherwise (every rank sees the same values)."""
        meshes = [mesh_group(t) for t in tensors if is_dtensor(t)]
        if not initialized() or not (meshes or needs):
            return None
        groups = {id(g): g for g in meshes}
        # One mesh: its group; several, one of several dimensions (None), or none (a user's
        # sum_hook): the default group.
        return Agreement(next(iter(groups.values())) if len(groups) == 1 else None)

    def rank(self) -> int:
        return _dist().get_rank(self.group) if self.group is not None else _dist().get_rank()

    def verdict(self, local: Optional[Refusal], flag: Optional[torch.Tensor] = None,
                host: bool = True) -> Optional[Refusal]:
        """Agrees on the step. On the CPU ``local`` is this rank's refusal (or None); with a
        device ``flag`` (int32, its first entry the engine's code + 1, 0 when clean) the flags
        are combined on the device (MAX), and read on the host only when ``host`` (capturable
        steps skip on the device everywhere instead).

        Returns None when every rank's check passed, else the refusal of the lowest failing
        rank (its ``rank`` set when that is not this one), which every rank then raises."""
        dist = _dist()
        me = self.rank()
        if flag is not None:
            mine = flag.clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if not host or int(flag[0].item()) == 0:
                return None
            codes = self._gather(mine)
            rank = next(r for r, c in enumerate(codes) if int(c[0]) != 0)
            return Refusal.from_code(int(codes[rank][0]) - 1, rank=None if rank == me else rank)
        failed = torch.tensor([0 if local is None else 1], dtype=torch.int64,
                              device=_collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if int(failed.item()) == 0:
            return None
        everyone: List[Optional[Refusal]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, local, group=self.group)
        rank = next(r for r, b in enumerate(everyone) if b is not None)
        refusal = everyone[rank]
        if rank != me:
            refusal.rank = rank
        return refusal

    def _gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        dist = _dist()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, t, group=self.group)
        return [o.cpu() for o in out]
