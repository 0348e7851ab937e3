"""The noise stream of docs/DESIGN.md, Noise, computed with torch ops on any device: what the
torch-op fallback draws where no fused engine can run (:mod:`thermo_ext.fallback`).

* Philox4x32-10 in int64 torch ops: every 32x32-bit product is split into 16-bit halves so that
  no intermediate leaves int64; the words are exact (they equal ``thermo_ext.random.philox``).
* Box–Muller (:func:`box_muller`, ``exact``) as ``csrc/philox.h`` writes it: the same float32 operations in the same order (the
  bit tricks of its logarithm and quarter-turn reduction in integer ops), and each of its fused
  multiply-adds as philox.h's software fma (``fma_soft``: an exact double product, TwoSum, and the
  midpoint correction), which rounds as the FMA instruction does. Every step is an IEEE add, mul
  or sqrt in one torch kernel (the sqrt in double, rounded to float: torch's float32 sqrt on the
  CPU is not correctly rounded), so nothing can be contracted or reassociated: the normals equal
  the engine's bit for bit (tests/test_cuda_library.py checks it on the CPU against the engine;
  on a GPU it rests on torch's CUDA kernels rounding add, mul and sqrt as IEEE does, which they
  do unless torch is built with fast math).

That costs some 450 elementwise kernels per draw (Philox's ten rounds about 240 of them), so by
default the fallback maps the words to normals with torch's float64 log, sin and cos instead
(:func:`box_muller_fast`, about 40 kernels): within 4 ulps of the engine's normals, as philox.h's
own polynomials are of a float64 Box–Muller. ``THERMO_EXT_FALLBACK_NOISE=exact`` asks for the
engine's bits. Either way a step's noise costs far more than the engine's fused kernels: it is a
fallback, not a replacement.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

__all__ = ["philox_words", "box_muller", "box_muller_fast", "normal", "normal_many",
           "normal_runs", "native", "in_use", "exact_mode", "prefetch", "take", "clear",
           "ENV_MODE"]

_forced = threading.local()
#: How the torch-op noise maps words to normals where thermo_ext.random uses it (the fallback):
#: "fast" (the default: torch's float64 log/sin/cos, within 4 ulps of the engine's normals) or
#: "exact" (philox.h's arithmetic, the engine's bits; about twice the time).
ENV_MODE = "THERMO_EXT_FALLBACK_NOISE"


def exact_mode() -> bool:
    """Whether thermo_ext.random's torch-op noise is bit for bit the engine's (``exact`` in
    :func:`native`, else ``THERMO_EXT_FALLBACK_NOISE=exact``) or within 4 ulps (``fast``)."""
    forced = getattr(_forced, "exact", None)
    if forced is not None:
        return forced
    mode = os.environ.get(ENV_MODE, "fast").strip().lower()
    if mode not in ("fast", "exact"):
        raise ValueError(f"{ENV_MODE}={mode!r}: expected 'fast' or 'exact'")
    return mode == "exact"


@contextlib.contextmanager
def native(exact: Optional[bool] = None):
    """Within it, :mod:`thermo_ext.random` draws with torch ops on every device (the fallback
    backend steps under it, so that it draws the same way on the CPU, where tests compare it
    with the reference); ``exact`` overrides :func:`exact_mode`."""
    prev = getattr(_forced, "on", False), getattr(_forced, "exact", None)
    _forced.on = True
    if exact is not None:
        _forced.exact = exact
    try:
        yield
    finally:
        _forced.on, _forced.exact = prev


def in_use(device) -> bool:
    """Whether :mod:`thermo_ext.random` draws with torch ops on ``device``: under
    :func:`native`, or on a CUDA device where the fused engine cannot run."""
    if getattr(_forced, "on", False):
        return True
    device = torch.device(device)
    if device.type != "cuda":
        return False
    from . import cuda_library  # the first CUDA draw loads the library

    index = device.index if device.index is not None else torch.cuda.current_device()
    return not cuda_library.verdict(index).usable

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(m: int, x: torch.Tensor):
    """(high, low) 32-bit words of m * x for m, x < 2**32, exactly, in int64."""
    a = x & 0xFFFF
    b = x >> 16
    pa = a * m                       # < 2**48
    pb = b * m                       # < 2**48
    t = pa + ((pb & 0xFFFF) << 16)   # < 2**49
    return (t >> 32) + (pb >> 16), t & _MASK


def philox_words(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counter`` (..., 4) and ``key`` (..., 2), words in [0, 2**32):
    an int64 tensor (..., 4) on their device (what ``thermo_ext.random.philox`` computes)."""
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for r in range(10):
        kr0 = (k0 + r * _W0) & _MASK
        kr1 = (k1 + r * _W1) & _MASK
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ kr0, lo1, hi0 ^ c3 ^ kr1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


# ---------------------------------------------------------------------------------------------
# float32 arithmetic of csrc/philox.h

def _c32(x: float) -> float:
    """A float32 literal of philox.h (``1.5e-01f``): the float nearest the decimal."""
    return torch.tensor(x, dtype=torch.float32).item()


def _fma(a, b, c) -> torch.Tensor:
    """a * b + c rounded once to float32 (philox.h, fma_soft); float32 tensors, or float32
    literals as Python floats (rounded to float32 here). One of a, b is a tensor."""
    a, b, c = (x.double() if isinstance(x, torch.Tensor) else _c32(x) for x in (a, b, c))
    p = a * b          # exact: two floats' product fits a double
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))
    f1 = s.float()
    d = s - f1.double()
    far = s + d
    f2 = far.float()
    take_far = (d != 0) & d.isfinite() & (f2.double() == far) & (err * d > 0)
    return torch.where(take_far, f2, f1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & _MASK


def _from_bits(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def _minus_2_log(u: torch.Tensor) -> torch.Tensor:
    ix = _bits(u) - 0x3F3504F3                   # u > 0: the int32 value is the same
    e = ix >> 23                                  # floor, as the arithmetic shift
    m = _from_bits((ix & 0x007FFFFF) + 0x3F3504F3)
    f = m - 1.0
    f2 = f * f
    q01 = _fma(-6.666790247e-01, f, 9.999998212e-01)
    q23 = _fma(-3.992414176e-01, f, 5.000351071e-01)
    q45 = _fma(-2.983597815e-01, f, 3.314102888e-01)
    q67 = _fma(-1.746950150e-01, f, 2.861496508e-01)
    q03 = _fma(q23, f2, q01)
    q47 = _fma(q67, f2, q45)
    q = _fma(q47, f2 * f2, q03)
    l_ = _fma(f2, q, -2.0 * f)
    fe = e.to(torch.float32)
    inner = _fma(fe, 4.243888834e-04, l_)
    return fe * -1.38671875 + inner  # the product is exact: one rounding, as philox.h


def _sincos_turn(w: torch.Tensor):
    q = ((w + 0x20000000) & _MASK) >> 30
    d = (w - (q << 30)) & _MASK
    d = torch.where(d >= 2**31, d - 2**32, d)
    t = d.to(torch.float32) * 2.0**-32  # exact
    y = t * t
    s3 = _fma(-7.539356232e+01, y, 8.159235382e+01)
    s2 = _fma(s3, y, -4.134166336e+01)
    s = t * _fma(s2, y, 6.283185482e+00)
    c3 = _fma(5.922924042e+01, y, -8.544323730e+01)
    c2 = _fma(c3, y, 6.493932343e+01)
    c1 = _fma(c2, y, -1.973920822e+01)
    c = _fma(y, c1, 1.0)
    odd = (q & 1) != 0
    cv = torch.where(odd, s, c)
    sv = torch.where(odd, c, s)
    c_out = torch.where(((q + 1) & 2) != 0, -cv, cv)  # a sign flip, as philox.h's bit xor
    s_out = torch.where((q & 2) != 0, -sv, sv)
    return s_out, c_out


def box_muller(wa: torch.Tensor, wb: torch.Tensor):
    """The float32 normals (even lane, odd lane) of int64 words (w_a, w_b) (philox.h)."""
    # (float)w_a * 2^-32 is exact; the add rounds once: philox.h's fma_exact_product
    u = wa.to(torch.float32) * 2.0**-32 + 2.0**-33
    # sqrt in double, rounded to float: the correctly rounded float sqrt (torch's float32 sqrt
    # on the CPU is not: it differed by 2 ulps here); double rounding cannot occur for sqrt.
    r = _minus_2_log(u).double().sqrt().float()
    s, c = _sincos_turn(wb)
    return r * c, r * s


def box_muller_fast(wa: torch.Tensor, wb: torch.Tensor):
    """:func:`box_muller` through torch's float64 log, sin and cos, rounded to float32: a tenth
    of its kernels, and within a few ulps of the engine's normals (philox.h's polynomials are
    within 4 ulps of a float64 Box–Muller; docs/DESIGN.md, Noise). The quarter-turn reduction
    is philox.h's, in integers, so that the angle keeps its relative accuracy near the zeros."""
    u = wa.to(torch.float32) * 2.0**-32 + 2.0**-33  # as the engine: float32, one rounding
    r = torch.sqrt(-2.0 * torch.log(u.double()))
    q = ((wb + 0x20000000) & _MASK) >> 30
    d = (wb - (q << 30)) & _MASK
    d = torch.where(d >= 2**31, d - 2**32, d)
    t = d.double() * (2.0 * torch.pi * 2.0**-32)
    s, c = torch.sin(t), torch.cos(t)
    odd = (q & 1) != 0
    cv = torch.where(odd, s, c)
    sv = torch.where(odd, c, s)
    c_out = torch.where(((q + 1) & 2) != 0, -cv, cv)
    s_out = torch.where((q & 2) != 0, -sv, sv)
    return (r * c_out).float(), (r * s_out).float()


def normal(n: int, *, seed: int, uid: int, step: int, draw: int, offset: int = 0,
           device="cpu", exact: bool = True) -> torch.Tensor:
    """The ``n`` float32 normals of elements ``offset .. offset+n-1`` (docs/DESIGN.md, Noise),
    as :func:`thermo_ext.random.normal` gives them, computed with torch ops on ``device``:
    bit for bit with ``exact`` (:func:`box_muller`), else within a few ulps
    (:func:`box_muller_fast`, several times cheaper)."""
    device = torch.device(device)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    q0, q1 = offset >> 2, (offset + n - 1) >> 2
    q = torch.arange(q0, q1 + 1, dtype=torch.int64, device=device) & _MASK
    counter = torch.stack([q, torch.full_like(q, uid), torch.full_like(q, step % 2**32),
                           torch.full_like(q, draw)], dim=-1)
    key = torch.tensor([seed % 2**32, seed >> 32], dtype=torch.int64, device=device)
    w = philox_words(counter, key)
    bm = box_muller if exact else box_muller_fast
    z0, z1 = bm(w[:, 0], w[:, 1])
    z2, z3 = bm(w[:, 2], w[:, 3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(-1)
    start = offset - 4 * q0
    return z[start:start + n].contiguous()


def normal_many(specs, device, exact: bool = True):
    """:func:`normal` of many (n, seed, uid, step, draw, offset) at once: one Philox pass and one
    Box–Muller pass over all of them (a step's many small tensors cost a few hundred kernels
    instead of a few hundred each). Returns one tensor per spec."""
    device = torch.device(device)
    specs = [s for s in specs]
    if not specs:
        return []
    q0s = [off >> 2 for n, _, _, _, _, off in specs]
    counts = [((off + n - 1) >> 2) - q + 1 if n else 0
              for (n, _, _, _, _, off), q in zip(specs, q0s)]
    total = sum(counts)
    cnt = torch.tensor(counts, dtype=torch.int64, device=device)

    def col(values):
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64, device=device),
                                       cnt, output_size=total)

    first = [0]
    for c in counts[:-1]:
        first.append(first[-1] + c)
    q = (torch.arange(total, dtype=torch.int64, device=device) - col(first) + col(q0s)) & _MASK
    counter = torch.stack([q, col([u for _, _, u, _, _, _ in specs]),
                           col([st % 2**32 for _, _, _, st, _, _ in specs]),
                           col([d for _, _, _, _, d, _ in specs])], dim=-1)
    key = torch.stack([col([sd % 2**32 for _, sd, _, _, _, _ in specs]),
                       col([sd >> 32 for _, sd, _, _, _, _ in specs])], dim=-1)
    w = philox_words(counter, key)
    bm = box_muller if exact else box_muller_fast
    z0, z1 = bm(w[:, 0], w[:, 1])
    z2, z3 = bm(w[:, 2], w[:, 3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(-1)
    out = []
    for (n, _, _, _, _, off), q0_, f, c in zip(specs, q0s, first, counts):
        start = 4 * f + off - 4 * q0_
        out.append(z[start:start + n])
    return out


# The fallback's noise drawn ahead for a step (prefetch), by (n, seed, uid, step mod 2**32,
# draw, offset, device): thermo_ext.random.normal takes it from here under native().
_ahead = threading.local()
#: Tensors up to this many elements are drawn together (prefetch); larger ones on their own
#: (their kernels are long enough, and the batch would hold their noise in memory at once).
PREFETCH_MAX_NUMEL = 1 << 20


def prefetch(specs, exact: bool) -> None:
    """Draws the normals of (n, seed, uid, step, draw, offset, device) specs ahead in one batch
    per device (only those of at most PREFETCH_MAX_NUMEL elements), for :func:`take`."""
    table = {}
    by_device = {}
    for spec in specs:
        n, seed, uid, step, draw, offset, device = spec
        if 0 < n <= PREFETCH_MAX_NUMEL:
            by_device.setdefault(torch.device(device), []).append(
                (n, seed, uid, step % 2**32, draw, offset))
    for device, group in by_device.items():
        group = list(dict.fromkeys(group))
        for spec, z in zip(group, normal_many(group, device, exact)):
            table[spec + (device,)] = z
    _ahead.table = table


def take(n, seed, uid, step, draw, offset, device) -> Optional[torch.Tensor]:
    """The prefetched normals of this draw, or None."""
    table = getattr(_ahead, "table", None)
    if not table:
        return None
    return table.get((n, seed, uid, step % 2**32, draw, offset, torch.device(device)))


def clear() -> None:
    _ahead.table = None


def normal_runs(n: int, *, seed: int, uid: int, step: int, draw: int, offset: int = 0,
                runs=None, device="cpu", exact: bool = True) -> torch.Tensor:
    """:func:`normal` for a shard made of runs (``thermo_ext.random.normal_runs``)."""
    if runs is None or runs[0] >= n:
        return normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset,
                      device=device, exact=exact)
    run, stride = runs
    return torch.cat([normal(run, seed=seed, uid=uid, step=step, draw=draw,
                             offset=offset + r * stride, device=device, exact=exact)
                      for r in range(n // run)])
