"""The only module that calls the compiled engine ``thermo_ext._C``.

It validates tensors and hyperparameters, turns a folded scheme and a group's hyperparameters into
an engine program, and dispatches one call per (device, dtype) list of tensors. ``thermo_step`` has
the same signature as :func:`thermo_ext.reference.thermo_step`, its pure-PyTorch oracle.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import _C
from .schemes import FoldedScheme

__all__ = ["thermo_step", "fill_normal", "philox_words", "build_program", "coefficients",
           "check_hyper", "check_tensors", "momentum_dtype", "DTYPES", "BAD_KINDS"]

DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
LETTER_CODES = {"A": 0, "B": 1, "O": 2, "C": 3, "D": 4, "E": 5, "V": 6}
BAD_KINDS = ("gradient", "parameter", "momentum", "thermostat")
U64 = 2**64


def check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are fine
            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not lo <= value < hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}), got {value}")
    return value


def check_hyper(where: str, **values) -> None:
    """Each value a real number >= 0 (gamma may be inf; the others finite)."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
                v = float(v)
            else:
                raise TypeError(f"{where}{key}: expected a real number, got {type(v).__name__}")
        if math.isnan(v) or v < 0 or (math.isinf(v) and key != "gamma"):
            expect = ">= 0 (inf allowed)" if key == "gamma" else "a finite number >= 0"
            raise ValueError(f"{where}{key}: expected {expect}, got {v}")


def momentum_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 parameters keep float32 momenta."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(params: Sequence[torch.Tensor], momenta: Sequence[Optional[torch.Tensor]],
                  grads: Sequence[Optional[torch.Tensor]], *, needs_momentum: bool) -> None:
    """Raises TypeError/ValueError naming the first bad tensor; touches nothing."""
    if not (len(params) == len(momenta) == len(grads)):
        raise ValueError(f"params, momenta, grads: expected lists of one length, got "
                         f"{len(params)}, {len(momenta)}, {len(grads)}")
    device = dtype = None
    for i, (p, m, g) in enumerate(zip(params, momenta, grads)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}]: expected a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in DTYPES:
            raise TypeError(f"params[{i}]: dtype {p.dtype} not supported; expected one of "
                            f"{', '.join(str(d) for d in DTYPES)}")
        if p.layout != torch.strided or not p.is_contiguous():
            raise ValueError(f"params[{i}]: expected a contiguous dense tensor")
        if device is None:
            device, dtype = p.device, p.dtype
        elif p.device != device or p.dtype != dtype:
            raise ValueError(f"params[{i}]: on {p.device} as {p.dtype}, but params[0] is on "
                             f"{device} as {dtype}; one call takes one device and dtype")
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}]: expected a torch.Tensor, got {type(g).__name__}")
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"grads[{i}]: sparse gradients are not supported; expected a dense "
                             f"tensor")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)}, {p.dtype} on "
                             f"{p.device} like its parameter, got {tuple(g.shape)}, {g.dtype} "
                             f"on {g.device}")
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}]: expected a contiguous tensor")
        if needs_momentum:
            want = momentum_dtype(p.dtype)
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"momenta[{i}]: expected a torch.Tensor, got {type(m).__name__}")
            if m.shape != p.shape or m.dtype != want or m.device != p.device:
                raise ValueError(f"momenta[{i}]: expected shape {tuple(p.shape)}, {want} on "
                                 f"{p.device}, got {tuple(m.shape)}, {m.dtype} on {m.device}")
            if m.layout != torch.strided or not m.is_contiguous():
                raise ValueError(f"momenta[{i}]: expected a contiguous dense tensor")


def coefficients(letter: str, delta: float, *, lr: float, gamma: float, tau: float,
                 sigma: float, eps: float, weight_decay: float,
                 maximize: bool = False) -> Tuple[float, float, float]:
    """The engine's (c0, c1, c2) for one letter (see csrc/substeps.h). ``maximize`` runs the
    dynamics of −L (B and V see −g; weight decay still pulls θ towards 0)."""
    sign = -1.0 if maximize else 1.0
    if letter == "A":
        return delta, 0.0, 0.0
    if letter == "B":
        return sign * delta, sign * weight_decay, 0.0
    if letter == "O":
        if math.isinf(gamma):
            return 0.0, math.sqrt(tau), 0.0
        return math.exp(-gamma * delta), math.sqrt(tau * -math.expm1(-2.0 * gamma * delta)), 0.0
    if letter == "C":
        return delta, 0.0, 0.0
    if letter == "D":
        return sigma * math.sqrt(delta), 0.0, 0.0
    if letter == "E":
        return eps * delta, tau, 0.0
    if letter == "V":
        return sign * lr, sign * weight_decay, math.sqrt(2.0 * lr * tau)
    raise ValueError(f"unknown letter {letter!r}")


@functools.lru_cache(maxsize=256)
def build_program(scheme: FoldedScheme, first: bool, lr: float, gamma: float, tau: float,
                  sigma: float, eps: float, weight_decay: float,
                  maximize: bool = False) -> "_C.Program":
    ops = []
    for x in scheme.program(first):
        c = coefficients(x.letter, x.factor * lr, lr=lr, gamma=gamma, tau=tau, sigma=sigma,
                         eps=eps, weight_decay=weight_decay, maximize=maximize)
        ops.append((LETTER_CODES[x.letter], x.draw or 0, x.xi_version, *c))
    return _C.Program(ops)


def _device_index(t: torch.Tensor) -> int:
    if t.device.type == "cpu":
        return -1
    if t.device.type == "cuda":
        if not _C.cuda_compiled():
            raise RuntimeError(
                "thermo_ext was built without CUDA, so it cannot step CUDA tensors: reinstall "
                "where nvcc is on PATH with `pip install --no-build-isolation "
                "-C cmake.define.THERMO_EXT_CUDA=ON .`")
        return t.device.index if t.device.index is not None else torch.cuda.current_device()
    raise ValueError(f"device {t.device}: thermo_ext runs on cpu and cuda tensors only")


def on_device(t: torch.Tensor) -> bool:
    """Whether the CUDA engine steps ``t`` (whose step then signals failures through a device
    flag instead of a return value)."""
    return _device_index(t) >= 0


def _stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device >= 0 else 0


def set_num_threads(n: int) -> None:
    """Threads of the CPU engine. With torch's bundled libgomp (Linux wheels) the engine shares
    torch's OpenMP runtime, so this and ``torch.set_num_threads`` set the same number."""
    _C.set_num_threads(check_int("n", n, 1, 2**16))


def get_num_threads() -> int:
    return int(_C.get_num_threads())


def fill_normal(out: torch.Tensor, *, seed: int, uid: int, step: int, draw: int,
                offset: int = 0) -> torch.Tensor:
    """Fills a contiguous float32 tensor with the normals of docs/DESIGN.md, Noise."""
    seed = check_int("seed", seed, 0, U64)
    uid = check_int("uid", uid, 0, 2**32)
    step = check_int("step", step, 0, U64) % 2**32
    draw = check_int("draw", draw, 0, 2**32)
    offset = check_int("offset", offset, 0, 2**62)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out: expected a contiguous float32 tensor")
    dev = _device_index(out)
    _C.fill_normal(dev, _stream(dev), out.data_ptr(), out.numel(), seed, uid, step, draw, offset)
    return out


def philox_words(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(counters)
    n = counters.numel() // 4
    _C.philox(counters.data_ptr(), keys.data_ptr(), out.data_ptr(), n)
    return out


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class EnginePlan:
    """The fixed part of one engine call: a (device, dtype) list of parameters with their
    momenta, uids, offsets, thermostat segments and buffers. Built once and reused while the
    tensors stay the same; each step only sets gradients, hyperparameters and the counter."""

    __slots__ = ("plan", "scheme", "device", "params", "momenta", "xi", "workspace", "scratch",
                 "step_tensor", "n_seg", "seg_numel", "sum_hook", "program", "program_key")

    def __init__(self, params: Sequence[torch.Tensor], momenta: Sequence[Optional[torch.Tensor]],
                 *, scheme: FoldedScheme, xi: Optional[torch.Tensor], segments: Sequence[int],
                 seg_numel: Optional[Sequence[float]], seed: int, uids: Sequence[int],
                 offsets: Optional[Sequence[int]] = None,
                 step_tensor: Optional[torch.Tensor] = None,
                 workspace: Optional[torch.Tensor] = None):
        n = len(params)
        p0 = params[0]
        dev = _device_index(p0)
        if scheme.uses_thermostat:
            n_seg = xi.numel()
        else:
            n_seg, xi, segments = 1, None, [0] * n
        if seg_numel is None:
            seg_numel = [0.0] * n_seg
            for p, s in zip(params, segments):
                seg_numel[s] += p.numel()
        elif len(seg_numel) != n_seg or any(not (n >= 0) for n in seg_numel):
            raise ValueError(f"seg_numel: expected {n_seg} element counts >= 0 (one per "
                             f"segment), got {list(seg_numel)}")
        offsets = list(offsets) if offsets is not None else [0] * n
        for i, (o, p) in enumerate(zip(offsets, params)):
            # The counter's first word is (i >> 2) mod 2**32: indices must stay below 2**34.
            if o + p.numel() > 2**34:
                raise ValueError(f"offsets[{i}]: global indices must stay below 2**34 (the "
                                 f"noise counter's range); got offset {o} + {p.numel()} elements")
        n_e = scheme.n_e
        if n_e and workspace is not None and (
                workspace.numel() < 2 * n_e * n_seg or workspace.dtype != torch.float64
                or workspace.device != p0.device or not workspace.is_contiguous()):
            raise ValueError(f"workspace: expected a contiguous float64 tensor of at least "
                             f"{2 * n_e * n_seg} elements on {p0.device}")
        if n_e and workspace is None:
            workspace = torch.empty(2 * n_e * n_seg, dtype=torch.float64, device=p0.device)
        numels = [p.numel() for p in params]
        scratch, scratch_len = None, 0
        if dev >= 0:
            scratch_len = _C.cuda_scratch_doubles(numels)
            scratch = torch.empty(scratch_len, dtype=torch.float64, device=p0.device)
        self.plan = _C.Plan(dev, DTYPES[p0.dtype], [p.data_ptr() for p in params],
                            [_ptr(m) for m in momenta], numels, offsets, list(uids),
                            list(segments), int(seed), _ptr(step_tensor), _ptr(xi), n_seg,
                            [float(x) for x in seg_numel], _ptr(workspace) if n_e else 0,
                            _ptr(scratch), scratch_len)
        self.scheme = scheme
        self.device = dev
        self.params = list(params)
        self.momenta = list(momenta)
        self.xi = xi
        self.workspace = workspace
        self.scratch = scratch
        self.step_tensor = step_tensor
        self.n_seg = n_seg
        self.seg_numel = list(seg_numel)
        #: Reduces each E phase's segment sums in place before the xi update (distributed).
        self.sum_hook: Optional[Callable[[torch.Tensor], None]] = None
        self.program, self.program_key = None, None  # the last program set_fast built

    def set(self, grads: Sequence[torch.Tensor], *, lr, gamma, tau, sigma, eps, weight_decay,
            step: int, first: bool, stochastic_rounding: bool = True,
            maximize: bool = False) -> None:
        prog = build_program(self.scheme, first, lr, gamma, tau, sigma, eps, weight_decay,
                             maximize)
        self.plan.set([g.data_ptr() for g in grads], prog, step % 2**32, stochastic_rounding)

    def set_fast(self, grads: Sequence[torch.Tensor], hyper: tuple, step: int, first: bool,
                 stochastic_rounding: bool) -> None:
        """``set`` for callers that validated ``hyper`` = (lr, gamma, tau, sigma, eps,
        weight_decay[, maximize]) and the gradients already (the optimizer's hot path)."""
        key = (hyper, first)
        if key != self.program_key:  # a step's program changes when its settings do
            self.program = build_program(self.scheme, first, *hyper)
            self.program_key = key
        self.plan.set([g.data_ptr() for g in grads], self.program, step % 2**32,
                      stochastic_rounding)

    def stream(self) -> int:
        return _stream(self.device)

    def check_phase(self, check: bool, flag: Optional[torch.Tensor]) -> Optional[tuple]:
        """This rank's local checks of a distributed step, without a collective: the first
        read-only phase (checked, its sums into the workspace) or, for a scheme without E, the
        input check. Returns None or (index, kind)."""
        phase = 0 if self.scheme.n_e else -2
        bad = _C.run_phase(self.plan, self.stream(), phase, check, _ptr(flag))
        return None if bad < 0 else (bad // 4, BAD_KINDS[bad % 4])

    def reduce_phases(self, check: bool, flag: Optional[torch.Tensor]) -> Optional[tuple]:
        """The rest of a distributed step's read-only half after :meth:`check_phase`: each E's
        sums reduced by ``sum_hook``, the thermostat updated, the next read-only phase."""
        n_e, n_seg, ws = self.scheme.n_e, self.n_seg, self.workspace
        sum_hook = self.sum_hook or (lambda sums: None)
        stream, flag_ptr = self.stream(), _ptr(flag)
        for k in range(n_e):
            if k > 0:
                bad = _C.run_phase(self.plan, stream, k, check, flag_ptr)
                if bad >= 0:
                    return bad // 4, BAD_KINDS[bad % 4]
            sum_hook(ws[(n_e + k) * n_seg:(n_e + k + 1) * n_seg])
            bad = _C.update_xi(self.plan, stream, k, flag_ptr, check)
            if bad >= 0:
                return bad // 4, BAD_KINDS[bad % 4]
        return None

    def run_phases(self, check: bool, flag_ptr: int, mode: str) -> int:
        """The step phase by phase, with ``sum_hook`` reducing each E's sums (distributed)."""
        sum_hook = self.sum_hook or (lambda sums: None)
        n_e, n_seg, ws = self.scheme.n_e, self.n_seg, self.workspace
        stream = self.stream()
        if mode == "finish":  # the write phase checks its C factors before writing anything
            return _C.run_phase(self.plan, stream, n_e, check, flag_ptr)
        if n_e == 0:
            return _C.run_phase(self.plan, stream, -1 if mode == "all" else -2, check, flag_ptr)
        for k in range(n_e):
            bad = _C.run_phase(self.plan, stream, k, check, flag_ptr)
            if bad >= 0:
                return bad
            sum_hook(ws[(n_e + k) * n_seg:(n_e + k + 1) * n_seg])
            bad = _C.update_xi(self.plan, stream, k, flag_ptr, check)
            if bad >= 0:
                return bad
        return _C.run_phase(self.plan, stream, n_e, check, flag_ptr) if mode == "all" else -1


_MODES = {"all": -1, "pre": -2, "finish": -3}


def run_plans(plans: Sequence[EnginePlan], *, check: bool, flag: Optional[torch.Tensor] = None,
              mode: str = "all") -> Optional[Tuple[int, int, str]]:
    """One step over several plans (set beforehand). With a check and several plans, every
    plan's checks and sum phases run before any plan writes. Returns None or
    (plan index, tensor or segment index, kind)."""
    flag_ptr = _ptr(flag)
    if any(pl.sum_hook is not None and pl.scheme.n_e for pl in plans):
        staged = mode == "all" and check and len(plans) > 1
        for i, pl in enumerate(plans):
            bad = pl.run_phases(check, flag_ptr, "pre" if staged else mode)
            if bad >= 0:
                return i, bad // 4, BAD_KINDS[bad % 4]
        if staged:
            for i, pl in enumerate(plans):
                bad = pl.run_phases(check, flag_ptr, "finish")
                if bad >= 0:
                    return i, bad // 4, BAD_KINDS[bad % 4]
        return None
    streams = [pl.stream() if pl.device >= 0 else 0 for pl in plans]
    i, bad = _C.run_plans([pl.plan for pl in plans], streams, bool(check), flag_ptr,
                          _MODES[mode])
    if i < 0:
        return None
    return i, bad // 4, BAD_KINDS[bad % 4]


def thermo_step(params: List[torch.Tensor], momenta: List[Optional[torch.Tensor]],
                grads: List[torch.Tensor], *, scheme: FoldedScheme, lr: float, gamma: float,
                tau: float, sigma: float, eps: float, weight_decay: float,
                xi: Optional[torch.Tensor], segments: Sequence[int],
                seg_numel: Optional[Sequence[float]] = None, seed: int, step: int,
                uids: Sequence[int], offsets: Optional[Sequence[int]] = None,
                first: bool = False, check_finite: bool = True,
                stochastic_rounding: bool = True, workspace: Optional[torch.Tensor] = None,
                sum_hook: Optional[Callable[[torch.Tensor], None]] = None,
                step_tensor: Optional[torch.Tensor] = None,
                flag: Optional[torch.Tensor] = None,
                validate: bool = True, mode: str = "all",
                maximize: bool = False) -> Optional[Tuple[int, str]]:
    """One step of ``scheme`` on the tensors, in place. Returns None, or (index, kind) of the
    first non-finite value found by the check (kind in BAD_KINDS; for "thermostat" the index is
    the segment), in which case nothing was modified.

    ``xi`` is a float64 tensor of one thermostat variable per segment; ``segments[i]`` is tensor
    i's segment; ``seg_numel`` the elements per segment (defaults to the local tensors');
    ``offsets[i]`` the global index of tensor i's first element (a shard of a bigger tensor);
    ``sum_hook(sums)``, when given, may reduce the segment sums of each E in place (distributed).
    On CUDA nothing is returned: a non-finite value sets ``flag`` (int32, device, zeroed by the
    caller) and skips the step.

    ``mode="pre"`` does everything that can fail (the checks, the sum phases and xi updates, into
    ``workspace``) without touching params, momenta or xi; ``mode="finish"`` then writes. An
    optimizer with several calls per step runs every "pre" before any "finish", so a failed step
    changes nothing anywhere.
    """
    n = len(params)
    if n == 0:
        return None
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {tuple(_MODES)}, got {mode!r}")
    if validate:
        check_tensors(params, momenta, grads, needs_momentum=scheme.uses_momentum)
        check_hyper("", lr=lr, gamma=gamma, tau=tau, sigma=sigma, eps=eps,
                    weight_decay=weight_decay)
        check_int("seed", seed, 0, U64)
        check_int("step", step, 0, U64)
        if scheme.uses_thermostat:
            if (not isinstance(xi, torch.Tensor) or xi.dtype != torch.float64 or xi.dim() != 1
                    or not xi.is_contiguous() or xi.device != params[0].device):
                raise ValueError("xi: expected a contiguous 1-D float64 tensor on the "
                                 "parameters' device")
            if len(segments) != n or any(not 0 <= s < xi.numel() for s in segments):
                raise ValueError(f"segments: expected {n} indices in [0, {xi.numel()})")
        if len(uids) != n or any(not 0 <= u < 2**32 for u in uids):
            raise ValueError(f"uids: expected {n} entries in [0, 2**32)")
        if offsets is not None and (len(offsets) != n or any(o < 0 for o in offsets)):
            raise ValueError(f"offsets: expected {n} entries >= 0")
    if scheme.n_e and mode != "all" and workspace is None:
        raise ValueError("workspace: mode 'pre'/'finish' needs the caller's workspace")
    plan = EnginePlan(params, momenta, scheme=scheme, xi=xi, segments=segments,
                      seg_numel=seg_numel, seed=seed, uids=uids, offsets=offsets,
                      step_tensor=step_tensor, workspace=workspace)
    plan.set(grads, lr=float(lr), gamma=float(gamma), tau=float(tau), sigma=float(sigma),
             eps=float(eps), weight_decay=float(weight_decay), step=int(step), first=bool(first),
             stochastic_rounding=stochastic_rounding, maximize=bool(maximize))
    plan.sum_hook = sum_hook
    bad = run_plans([plan], check=bool(check_finite), flag=flag, mode=mode)
    return None if bad is None else bad[1:]
