"""The counter-based noise stream of docs/DESIGN.md, Noise, as tensors.

Element ``i`` of a tensor (its index in the whole, unsharded tensor) draws its normal from
Philox4x32-10 with key ``(seed mod 2**32, seed >> 32)`` and counter ``(i >> 2, uid, step mod 2**32,
draw)``; lanes ``i mod 4`` 0, 1 use words (w0, w1) and 2, 3 use (w2, w3) through Box–Muller in
float32. The same arguments give the same numbers on every device, thread count and shard.

On a CUDA device where no fused engine can run (thermo_ext.cuda_library), and inside
:func:`thermo_ext.torch_noise.native`, the same numbers come from torch ops
(:mod:`thermo_ext.torch_noise`: the Philox words exactly, the normals within 4 ulps, or bit for
bit with ``THERMO_EXT_FALLBACK_NOISE=exact``).
"""

from __future__ import annotations

import torch

from . import kernels, torch_noise

__all__ = ["normal", "normal_runs", "philox", "chain_seed", "draw_seed", "check_seed",
           "THERMAL_STEP"]

#: The counter's step field used for momenta drawn by ``momentum_init="thermal"``.
THERMAL_STEP = 2**32 - 1


def draw_seed() -> int:
    """A uint64 seed from torch's default generator, so torch.manual_seed makes runs
    reproducible."""
    hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2**64), else TypeError/ValueError naming it."""
    return kernels.check_int("seed", seed, 0, kernels.U64)


def chain_seed(seed: int, chain: int) -> int:
    """The seed of chain ``chain`` of a stacked run: seed + chain * 0x9E3779B97F4A7C15 (mod 2**64),
    distinct for every chain, so chain k equals a single-chain run with this seed."""
    seed = kernels.check_int("seed", seed, 0, 2**64)
    chain = kernels.check_int("chain", chain, 0, 2**63)
    return (seed + chain * 0x9E3779B97F4A7C15) % 2**64


def normal(n: int, *, seed: int, uid: int, step: int, draw: int, offset: int = 0,
           device="cpu") -> torch.Tensor:
    """The ``n`` float32 normals that docs/DESIGN.md, Noise, assigns to elements ``offset .. offset+n-1``."""
    n = kernels.check_int("n", n, 0, 2**62)
    if torch_noise.in_use(device):
        ahead = torch_noise.take(n, seed, uid, step, draw, offset, device)
        if ahead is not None:  # drawn with the step's other tensors (the fallback)
            return ahead.clone()
        return torch_noise.normal(
            n, seed=kernels.check_int("seed", seed, 0, kernels.U64),
            uid=kernels.check_int("uid", uid, 0, 2**32),
            step=kernels.check_int("step", step, 0, kernels.U64),
            draw=kernels.check_int("draw", draw, 0, 2**32),
            offset=kernels.check_int("offset", offset, 0, 2**62), device=device,
            exact=torch_noise.exact_mode())
    out = torch.empty(n, dtype=torch.float32, device=device)
    kernels.fill_normal(out, seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    return out


def normal_runs(n: int, *, seed: int, uid: int, step: int, draw: int, offset: int = 0,
                runs=None, device="cpu") -> torch.Tensor:
    """:func:`normal` for the ``n`` local elements of a shard whose element ``l`` has the global
    index ``offset + (l // run) * stride + l % run`` (``runs`` = (run, stride); None: one run,
    ``offset + l``): a tensor-parallel shard on another dim than 0 is made of such runs."""
    if runs is None or runs[0] >= n:
        return normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset, device=device)
    run, stride = runs
    if torch_noise.in_use(device):
        return torch.cat([normal(run, seed=seed, uid=uid, step=step, draw=draw,
                                 offset=offset + r * stride, device=device)
                          for r in range(n // run)])
    out = torch.empty(n, dtype=torch.float32, device=device).view(-1, run)
    for r in range(out.shape[0]):
        kernels.fill_normal(out[r], seed=seed, uid=uid, step=step, draw=draw,
                            offset=offset + r * stride)
    return out.view(-1)


def philox(counter, key) -> torch.Tensor:
    """Philox4x32-10 words for ``counter`` (..., 4) and ``key`` (..., 2), as an int64 tensor (..., 4).

    Accepts sequences or integer tensors; leading dimensions broadcast.
    """
    c = torch.as_tensor(counter, dtype=torch.int64, device="cpu")
    k = torch.as_tensor(key, dtype=torch.int64, device="cpu")
    if c.shape[-1:] != (4,):
        raise ValueError(f"counter: expected last dimension 4, got shape {tuple(c.shape)}")
    if k.shape[-1:] != (2,):
        raise ValueError(f"key: expected last dimension 2, got shape {tuple(k.shape)}")
    for name, t in (("counter", c), ("key", k)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 2**32):
            raise ValueError(f"{name}: words must lie in [0, 2**32)")
    shape = torch.broadcast_shapes(c.shape[:-1], k.shape[:-1])
    c = c.expand(*shape, 4).contiguous()
    k = k.expand(*shape, 2).contiguous()
    return kernels.philox_words(c, k)
