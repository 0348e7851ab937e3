"""docs/DESIGN.md, Letters, written with plain torch ops, letter by letter, noise from thermo_ext.random.

The oracle of the tests and the baseline of the benchmarks: it is written to be obviously
correct, not fast. ``thermo_step`` has the signature of :func:`thermo_ext.kernels.thermo_step`.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import _C
from . import random as te_random
from .refusal import Refusal
from .schemes import FoldedScheme

__all__ = ["thermo_step", "round_bf16_stochastic", "global_index", "mass_step"]

ROUNDING_DRAW = _C.ROUNDING_DRAW  # the draw field of the stochastic-rounding bits


def _noise(p: torch.Tensor, *, seed, uid, step, draw, offset, runs=None) -> torch.Tensor:
    return te_random.normal_runs(p.numel(), seed=seed, uid=uid, step=step, draw=draw,
                                 offset=offset, runs=runs, device=p.device).view(p.shape)


def global_index(n: int, offset: int, runs=None) -> torch.Tensor:
    """The global indices of a shard's ``n`` local elements: ``offset + l``, or with ``runs`` =
    (run, stride) ``offset + (l // run) * stride + l % run``."""
    local = torch.arange(n, dtype=torch.int64)
    if runs is None or runs[0] >= n:
        return offset + local
    run, stride = runs
    return offset + local // run * stride + local % run


def round_bf16_stochastic(x: torch.Tensor, *, seed: int, uid: int, step: int,
                          offset: int, runs=None) -> torch.Tensor:
    """float32 -> bf16 by adding 16 random bits below bf16 precision, then truncating.

    The bits of global element g are the top 16 bits of Philox word (g mod 4) of counter
    (g >> 2, uid, step, 0xFFFF).
    """
    g = global_index(x.numel(), offset, runs)
    counter = torch.stack([g >> 2, torch.full_like(g, uid), torch.full_like(g, step % 2**32),
                           torch.full_like(g, ROUNDING_DRAW)], dim=-1)
    key = torch.tensor([seed % 2**32, seed >> 32], dtype=torch.int64)
    words = te_random.philox(counter, key)
    r = words.gather(1, (g & 3).view(-1, 1)).view(-1) >> 16
    bits = x.detach().float().reshape(-1).cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = x.detach().float().reshape(-1).cpu().isfinite()
    rounded = torch.where(finite, (bits + r) >> 16, bits >> 16)
    rounded = torch.where(x.detach().float().reshape(-1).cpu().isnan(), (bits >> 16) | 0x40,
                          rounded)
    out = (rounded << 16).to(torch.int32).view(torch.float32).to(torch.bfloat16)
    return out.view(x.shape).to(x.device)


def _first_nonfinite(params, momenta, grads, scheme) -> Optional[Refusal]:
    for i, (p, m, g) in enumerate(zip(params, momenta, grads)):
        if not torch.isfinite(g).all():
            return Refusal(None, i, "gradient")
        if not torch.isfinite(p).all():
            return Refusal(None, i, "parameter")
        if m is not None and scheme.n_e and not torch.isfinite(m).all():
            return Refusal(None, i, "momentum")
    return None


def thermo_step(params: List[torch.Tensor], momenta: List[Optional[torch.Tensor]],
                grads: List[torch.Tensor], *, scheme: FoldedScheme, lr: float, gamma: float,
                tau: float, sigma: float, eps: float, weight_decay: float,
                xi: Optional[torch.Tensor], segments: Sequence[int],
                seg_numel: Optional[Sequence[float]] = None, seed: int, step: int,
                uids: Sequence[int], offsets: Optional[Sequence[int]] = None,
                runs: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
                first: bool = False, check_finite: bool = True,
                stochastic_rounding: bool = True, workspace=None,
                sum_hook: Optional[Callable[[torch.Tensor], None]] = None,
                step_tensor=None, flag=None, validate: bool = True, mode: str = "all",
                maximize: bool = False, masses: Optional[List[torch.Tensor]] = None,
                mass_starts: Optional[Sequence[int]] = None, mass_beta: float = 0.999,
                mass_eps: float = 1e-8, mass_freeze: float = 0) -> Optional[Refusal]:
    """Letter by letter on copies; commits only when every check passed (and mode != "pre").
    ``maximize`` steps on −g. A refused "pre" with a ``sum_hook`` still calls the hook once per
    E (with zeros), as the engine does, so that ranks' collectives match. ``masses``: the
    adaptive mass (docs/DESIGN.md, Mass), as :func:`thermo_ext.kernels.thermo_step` takes it."""
    n = len(params)
    if n == 0:
        return None
    if offsets is None:
        offsets = [0] * n
    if runs is None:
        runs = [None] * n
    h = float(lr)
    cdt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    if check_finite and mode != "finish":
        bad = _first_nonfinite(params, momenta, grads, scheme)
        if bad is not None:
            if sum_hook is not None and mode != "all":
                # Other ranks are in the thermostat's collectives: join them with zero sums.
                for _ in range(scheme.n_e):
                    sum_hook(torch.zeros_like(xi, dtype=torch.float64))
            return bad

    th = [p.detach().to(cdt).clone() for p in params]
    mo = [m.detach().clone() if m is not None else None for m in momenta]
    gr = [(-g if maximize else g).detach().to(cdt) for g in grads]
    xi_now = xi.detach().clone() if xi is not None else None
    if seg_numel is None and xi is not None:
        seg_numel = [0.0] * xi.numel()
        for p, s in zip(params, segments):
            seg_numel[s] += p.numel()

    def R(i, draw):
        return _noise(th[i], seed=seed, uid=uids[i], step=step, draw=draw,
                      offset=offsets[i], runs=runs[i]).to(cdt)

    # The adaptive mass: v updated with this step's force (unless frozen), then m, and the
    # factors each letter takes, in the compute type (a unit mass: all ones, the same bits).
    one = torch.ones((), dtype=cdt)
    inv = sm = rs = [one] * n
    v_new = None
    if masses is not None:
        beta_t, omb_t = (torch.tensor(x, dtype=cdt) for x in (mass_beta, 1.0 - mass_beta))
        eps_t = torch.tensor(mass_eps, dtype=cdt)
        v_new, inv, sm, rs = [], [], [], []
        for i in range(n):
            update, bias = mass_step(mass_beta, mass_freeze, step, mass_starts[i])
            v = masses[i].detach().to(cdt).clone()
            if update:  # the force of B and V: the gradient plus weight decay
                f = gr[i] + weight_decay * th[i]
                v = beta_t * v + omb_t * (f * f)
            m = torch.sqrt(v * torch.tensor(bias, dtype=cdt)) + eps_t
            v_new.append(v if update else None)
            inv.append(1 / m)
            sm.append(torch.sqrt(m))
            rs.append(1 / sm[-1])

    for x in scheme.program(first):
        d = x.factor * h
        for i in range(n):
            if x.letter == "A":
                th[i] = th[i] + d * (mo[i] * inv[i])
            elif x.letter == "B":
                mo[i] = mo[i] - d * (gr[i] + weight_decay * th[i])
            elif x.letter == "O":
                if math.isinf(gamma):
                    a, b = 0.0, math.sqrt(tau)
                else:
                    a = math.exp(-gamma * d)
                    b = math.sqrt(tau * (1.0 - math.exp(-2.0 * gamma * d)))
                mo[i] = a * mo[i] + b * (sm[i] * R(i, x.draw))
            elif x.letter == "C":
                try:  # math.exp raises instead of returning inf
                    c = math.exp(-float(xi_now[segments[i]]) * d)
                except OverflowError:
                    c = math.inf
                if check_finite and not (c <= torch.finfo(cdt).max):  # must fit the compute type
                    return Refusal(None, segments[i], "thermostat")
                mo[i] = c * mo[i]
            elif x.letter == "D":
                mo[i] = mo[i] + sigma * math.sqrt(d) * (sm[i] * R(i, x.draw))
            elif x.letter == "V":
                th[i] = (th[i] - h * (inv[i] * (gr[i] + weight_decay * th[i]))
                         + math.sqrt(2 * h * tau) * (rs[i] * R(i, x.draw)))
        if x.letter == "E":
            sums = torch.zeros_like(xi_now)
            for i in range(n):
                sums[segments[i]] += (mo[i].double().pow(2) * inv[i].double()).sum()
            if sum_hook is not None:
                sum_hook(sums)
            for s in range(xi_now.numel()):
                new = float(xi_now[s]) + d * eps * (float(sums[s]) - seg_numel[s] * tau)
                if check_finite and not (math.isfinite(float(sums[s])) and math.isfinite(new)):
                    return Refusal(None, s, "thermostat")
                xi_now[s] = new

    if mode == "pre":
        return None
    for i, p in enumerate(params):
        if p.dtype == torch.bfloat16 and stochastic_rounding:
            p.copy_(round_bf16_stochastic(th[i], seed=seed, uid=uids[i], step=step,
                                          offset=offsets[i], runs=runs[i]))
        else:
            p.copy_(th[i])
        if momenta[i] is not None:
            momenta[i].copy_(mo[i])
        if v_new is not None and v_new[i] is not None:
            masses[i].copy_(v_new[i])
    if xi is not None:
        xi.copy_(xi_now)
    return None


def mass_step(beta: float, freeze: float, step: int, start: int) -> Tuple[bool, float]:
    """(whether v takes this step's gradient, the bias correction of the v the step uses) of a
    tensor whose v took its first gradient at step ``start`` (docs/DESIGN.md, Mass; the
    engine's csrc/substeps.h mass_step): t = step − start + 1 updates, at most ``freeze`` (0:
    no limit); bias = 1 / (1 − beta^t)."""
    t = step - start + 1 if step >= start else 1
    update = not freeze > 0 or t <= freeze
    n = t if update else freeze
    return update, 1.0 if beta == 0 else 1.0 / -math.expm1(n * math.log(beta))
