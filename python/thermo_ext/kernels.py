"""The only module that calls the compiled engine ``thermo_ext._C``.

It validates tensors and hyperparameters, turns a folded scheme and a group's hyperparameters into
an engine program, and dispatches one call per (device, dtype) list of tensors. ``thermo_step`` has
the same signature as :func:`thermo_ext.reference.thermo_step`, its pure-PyTorch oracle.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import _C, cuda_library
from .refusal import Refusal
from .schemes import FoldedScheme

__all__ = ["thermo_step", "fill_normal", "philox_words", "build_program", "coefficients",
           "check_hyper", "check_tensors", "momentum_dtype", "uid", "EnginePlan", "run_plans",
           "Hyper", "DTYPES", "LETTER_CODES", "BAD_KINDS", "MODES", "HYPER_FIELDS"]

# The engine's constants, defined once in C++ (csrc/engine.h, substeps.h) and read from _C.
DTYPES = {getattr(torch, name): code for name, code in _C.DTYPE_CODES.items()}
LETTER_CODES = dict(_C.LETTER_CODES)
BAD_KINDS = tuple(_C.BAD_KINDS)           # by code % 4 of a refused step
MODES = dict(_C.MODES)                    # run_plans / thermo_step mode -> engine code
HYPER_FIELDS = tuple(_C.HYPER_FIELDS)     # the order of a device hyperparameter tensor
U64 = 2**64

#: A group's hyperparameters as numbers: the engine's fields (``HYPER_FIELDS``, csrc/substeps.h
#: Hyper, in that order) and ``maximize`` (B and V see −g). A program is built from one.
#: ``mass_freeze`` None (never frozen) is the engine's 0.
Hyper = collections.namedtuple("Hyper", (*HYPER_FIELDS, "maximize"))


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


def uid(group: int, position: int) -> int:
    """The noise counter's uid of parameter ``position`` of param group ``group`` (both below
    ``_C.UID_LIMIT``; docs/DESIGN.md, Noise)."""
    return _C.make_uid(check_int("group", group, 0, _C.UID_LIMIT),
                       check_int("position", position, 0, _C.UID_LIMIT))


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
    """The engine's (c0, c1, c2) for one letter moving by ``delta`` (csrc/substeps.h,
    letter_coefficients: the formulas the CUDA engine also evaluates on the device).
    ``maximize`` runs the dynamics of −L (B and V see −g; weight decay still pulls θ to 0)."""
    if letter not in LETTER_CODES:
        raise ValueError(f"letter: unknown letter {letter!r}; expected one of "
                         f"{''.join(LETTER_CODES)}")
    return _C.letter_coefficients(LETTER_CODES[letter], delta,
                                  [lr, gamma, tau, sigma, eps, weight_decay], maximize)


@functools.lru_cache(maxsize=256)
def build_program(scheme: FoldedScheme, first: bool, hyper: Hyper,
                  mass: bool = False) -> "_C.Program":
    """The engine program of one step of ``scheme``: its letters with their factors, draws and
    xi versions, the coefficients the engine computes from the hyperparameters, and (``mass``)
    the adaptive mass's settings."""
    letters = [(LETTER_CODES[x.letter], x.factor, x.draw or 0, x.xi_version)
               for x in scheme.program(first)]
    values = [0.0 if v is None else v for v in hyper[:len(HYPER_FIELDS)]]  # mass_freeze None: 0
    return _C.Program(letters, values, hyper.maximize, mass)


def _device_index(t: torch.Tensor) -> int:
    if t.device.type == "cpu":
        return -1
    if t.device.type == "cuda":
        return t.device.index if t.device.index is not None else torch.cuda.current_device()
    raise ValueError(f"device {t.device}: thermo_ext runs on cpu and cuda tensors only")


def _engine_index(t: torch.Tensor) -> int:
    """``_device_index`` of a tensor the engine is about to run on: on a CUDA device, the CUDA
    engine library is loaded (the first time) and must be able to run there, else RuntimeError
    saying why and what fixes it (thermo_ext.cuda_library)."""
    dev = _device_index(t)
    if dev >= 0 and t.device.type == "cuda":
        cuda_library.require(dev)
    return dev


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
    dev = _engine_index(out)
    _C.fill_normal(dev, _stream(dev), out.data_ptr(), out.numel(), seed, uid, step, draw, offset)
    return out


def philox_words(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(counters)
    n = counters.numel() // 4
    _C.philox(counters.data_ptr(), keys.data_ptr(), out.data_ptr(), n)
    return out


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def check_buffer(name: str, t, *, dtype: torch.dtype, device: torch.device,
                 numel: Optional[int] = None, at_least: Optional[int] = None) -> None:
    """A tensor whose pointer the engine reads: a contiguous ``dtype`` tensor on ``device``
    with exactly ``numel`` (or at least ``at_least``) elements; else TypeError/ValueError
    naming it. A kernel handed a CPU pointer, a wrong dtype or too few elements would read
    garbage or fault (and a fault poisons the process's CUDA context)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    size_ok = ((numel is None or t.numel() == numel)
               and (at_least is None or t.numel() >= at_least))
    if (t.dtype != dtype or t.device != device or not size_ok or t.layout != torch.strided
            or not t.is_contiguous()):
        size = (f"{numel} element(s)" if numel is not None else
                f"at least {at_least} element(s)" if at_least is not None else "any size")
        layout = "" if t.layout == torch.strided and t.is_contiguous() else ", not contiguous"
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of {size} on {device}, "
                         f"got {t.numel()} element(s) of {t.dtype} on {t.device}{layout}")


def _pieces(params: Sequence[torch.Tensor], offsets: Sequence[int],
            runs: Optional[Sequence[Optional[Tuple[int, int]]]]) -> List[Tuple[int, int, int, int]]:
    """(tensor, local start, length, global start) of every run of consecutive global indices:
    one per tensor, or with ``runs[i]`` = (run, stride) one per ``run`` elements of tensor i,
    the k-th starting at global index ``offsets[i] + k * stride``."""
    if runs is not None and len(runs) != len(params):
        raise ValueError(f"runs: expected {len(params)} entries (None or (run, stride)), got "
                         f"{len(runs)}")
    out = []
    for i, p in enumerate(params):
        n, r = p.numel(), None if runs is None else runs[i]
        if r is None or r[0] >= n:
            out.append((i, 0, n, offsets[i]))
            continue
        run, stride = r
        if run <= 0 or n % run or stride < run:
            raise ValueError(f"runs[{i}]: expected a run length that divides the tensor's {n} "
                             f"elements and a stride >= it, got {tuple(r)}")
        out.extend((i, k * run, run, offsets[i] + k * stride) for k in range(n // run))
    return out


class EnginePlan:
    """The fixed part of one engine call: a (device, dtype) list of parameters with their
    momenta, uids, offsets, thermostat segments and buffers. Built once and reused while the
    tensors stay the same; each step only sets gradients, hyperparameters and the counter.

    Every tensor whose pointer the engine keeps is checked here (device, dtype, size,
    contiguity): xi, workspace, step_tensor, and later the gradients (``set``) and the device
    hyperparameters (``set_device_hyper``)."""

    __slots__ = ("plan", "scheme", "device", "params", "momenta", "xi", "workspace", "scratch",
                 "step_tensor", "n_seg", "seg_numel", "sum_hook", "hyper", "_sum_views",
                 "program", "program_key", "grad_map", "mass", "masses")

    def __init__(self, params: Sequence[torch.Tensor], momenta: Sequence[Optional[torch.Tensor]],
                 *, scheme: FoldedScheme, xi: Optional[torch.Tensor], segments: Sequence[int],
                 seg_numel: Optional[Sequence[float]], seed: int, uids: Sequence[int],
                 offsets: Optional[Sequence[int]] = None,
                 runs: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
                 step_tensor: Optional[torch.Tensor] = None,
                 workspace: Optional[torch.Tensor] = None,
                 masses: Optional[Sequence[torch.Tensor]] = None,
                 mass_starts: Optional[Sequence[int]] = None):
        n = len(params)
        p0 = params[0]
        dev = _engine_index(p0)
        if masses is not None:  # the adaptive mass: v of each parameter, in the momenta's dtype
            if len(masses) != n or mass_starts is None or len(mass_starts) != n:
                raise ValueError(f"masses, mass_starts: expected {n} of each (one per parameter)")
            for i, (v, p) in enumerate(zip(masses, params)):
                check_buffer(f"masses[{i}]", v, dtype=momentum_dtype(p.dtype), device=p.device,
                             numel=p.numel())
                check_int(f"mass_starts[{i}]", mass_starts[i], 0, 2**63)
        if scheme.uses_thermostat:
            if not isinstance(xi, torch.Tensor):
                raise TypeError(f"xi: scheme {scheme.written!r} has a thermostat; expected a "
                                f"float64 tensor, got {type(xi).__name__}")
            check_buffer("xi", xi, dtype=torch.float64, device=p0.device)
            n_seg = xi.numel()
            if n_seg < 1:
                raise ValueError("xi: expected at least one thermostat variable")
            if len(segments) != n or any(not 0 <= s < n_seg for s in segments):
                raise ValueError(f"segments: expected {n} indices in [0, {n_seg})")
        else:
            n_seg, xi, segments = 1, None, [0] * n
        if step_tensor is not None:
            check_buffer("step_tensor", step_tensor, dtype=torch.int64, device=p0.device,
                         numel=1)
        if seg_numel is None:
            seg_numel = [0.0] * n_seg
            for p, s in zip(params, segments):
                seg_numel[s] += p.numel()
        elif len(seg_numel) != n_seg or any(not (n >= 0) for n in seg_numel):
            raise ValueError(f"seg_numel: expected {n_seg} element counts >= 0 (one per "
                             f"segment), got {list(seg_numel)}")
        offsets = list(offsets) if offsets is not None else [0] * n
        pieces = _pieces(params, offsets, runs)
        for i, _, length, o in pieces:
            # The counter's first word is (i >> 2) mod 2**32: indices must stay below 2**34.
            if o + length > 2**34:
                raise ValueError(f"offsets[{i}]: global indices must stay below 2**34 (the "
                                 f"noise counter's range); got offset {o} + {length} elements")
        n_e = scheme.n_e
        if n_e and workspace is not None:
            check_buffer("workspace", workspace, dtype=torch.float64, device=p0.device,
                         at_least=2 * n_e * n_seg)
        if n_e and workspace is None:
            workspace = torch.empty(2 * n_e * n_seg, dtype=torch.float64, device=p0.device)
        # The engine's tensors: one per run of consecutive global indices (a parameter, or a
        # slice of a tensor-parallel shard), each reading its gradient at grad_map's place.
        numels = [length for _, _, length, _ in pieces]
        scratch, scratch_len = None, 0
        if dev >= 0:
            scratch_len = _C.cuda_scratch_doubles(numels)
            scratch = torch.empty(scratch_len, dtype=torch.float64, device=p0.device)
        size = p0.element_size()
        thetas = [params[i].data_ptr() + lo * size for i, lo, _, _ in pieces]
        moms = [0 if momenta[i] is None else momenta[i].data_ptr() + lo * momenta[i].element_size()
                for i, lo, _, _ in pieces]
        mass_ptrs, starts = [], []
        if masses is not None:
            mass_ptrs = [masses[i].data_ptr() + lo * masses[i].element_size()
                         for i, lo, _, _ in pieces]
            starts = [int(mass_starts[i]) for i, _, _, _ in pieces]
        #: Per engine tensor (its parameter, byte offset of its gradient); None: one per parameter.
        self.grad_map = None if len(pieces) == n else [(i, lo * size) for i, lo, _, _ in pieces]
        self.plan = _C.Plan(dev, DTYPES[p0.dtype], thetas, moms, numels,
                            [o for _, _, _, o in pieces], [uids[i] for i, _, _, _ in pieces],
                            [segments[i] for i, _, _, _ in pieces], int(seed),
                            _ptr(step_tensor), _ptr(xi), n_seg, [float(x) for x in seg_numel],
                            _ptr(workspace) if n_e else 0, _ptr(scratch), scratch_len,
                            mass_ptrs, starts)
        self.scheme = scheme
        self.device = dev
        self.params = list(params)
        self.momenta = list(momenta)
        self.mass = masses is not None
        self.masses = None if masses is None else list(masses)
        self.xi = xi
        self.workspace = workspace
        self.scratch = scratch
        self.step_tensor = step_tensor
        self.n_seg = n_seg
        self.seg_numel = list(seg_numel)
        self.hyper: Optional[torch.Tensor] = None
        self._sum_views = None
        #: Reduces each E phase's segment sums in place before the xi update (distributed).
        self.sum_hook: Optional[Callable[[torch.Tensor], None]] = None
        self.program, self.program_key = None, None  # the last program set_fast built

    def set(self, grads: Sequence[torch.Tensor], *, lr, gamma, tau, sigma, eps, weight_decay,
            step: int, first: bool, stochastic_rounding: bool = True, maximize: bool = False,
            mass_beta: float = 0.999, mass_eps: float = 1e-8, mass_freeze: int = 0) -> None:
        """Gradients, hyperparameters and step counter of the next step; the gradients are
        checked against the parameters (dtype, device, size, contiguity). The mass settings
        matter to a plan made with masses (mass_freeze 0: never frozen)."""
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} tensors (one per parameter), "
                             f"got {len(grads)}")
        for i, (g, p) in enumerate(zip(grads, self.params)):
            check_buffer(f"grads[{i}]", g, dtype=p.dtype, device=p.device, numel=p.numel())
        prog = build_program(self.scheme, first,
                             Hyper(lr, gamma, tau, sigma, eps, weight_decay, mass_beta, mass_eps,
                                   mass_freeze, maximize), self.mass)
        self.plan.set(self._grad_ptrs(grads), prog, step, stochastic_rounding)

    def _grad_ptrs(self, grads: Sequence[torch.Tensor]) -> List[int]:
        ptrs = [g.data_ptr() for g in grads]
        return ptrs if self.grad_map is None else [ptrs[i] + b for i, b in self.grad_map]

    def set_fast(self, grads: Sequence[torch.Tensor], hyper: Hyper, step: int, first: bool,
                 stochastic_rounding: bool) -> None:
        """``set`` for callers that validated ``hyper`` and the gradients already (the
        optimizer's hot path: torch's ``.grad`` setter guarantees dtype, device and shape, and
        the optimizer makes them contiguous)."""
        key = (hyper, first)
        if key != self.program_key:  # a step's program changes when its settings do
            self.program = build_program(self.scheme, first, hyper, self.mass)
            self.program_key = key
        self.plan.set(self._grad_ptrs(grads), self.program, step, stochastic_rounding)

    def set_device_hyper(self, hyper: Optional[torch.Tensor]) -> None:
        """Reads the coefficients' hyperparameters from ``hyper`` (float64, one element per
        ``HYPER_FIELDS``, in that order, on the plan's CUDA device) at the start of every CUDA
        call, instead of from the host values given to ``set``. A CUDA graph captured over this plan then follows in-place changes of the
        tensor (schedulers). The host values still choose the program (first step or not).
        ``None`` goes back to the host values. The device's exp/expm1/sqrt may differ from the
        host's by an ulp, so the coefficients (and the step) may too."""
        if hyper is None:
            self.plan.set_hyper(0)
            self.hyper = None
            return
        if self.device < 0:
            raise ValueError("hyper: device hyperparameters are for CUDA plans (the CPU engine "
                             "uses the host values given to set())")
        check_buffer("hyper", hyper, dtype=torch.float64, device=self.params[0].device,
                     numel=len(HYPER_FIELDS))
        self.plan.set_hyper(hyper.data_ptr())
        self.hyper = hyper

    def stream(self) -> int:
        return _stream(self.device)

    def _hook(self) -> Optional[Callable[[int], None]]:
        """The engine's callback for E number k: ``sum_hook`` on that E's segment sums (a view
        of the workspace)."""
        hook = self.sum_hook
        if hook is None or not self.scheme.n_e:
            return None
        views = self._sum_views
        if views is None:
            n_e, n_seg, ws = self.scheme.n_e, self.n_seg, self.workspace
            views = self._sum_views = [ws[(n_e + k) * n_seg:(n_e + k + 1) * n_seg]
                                       for k in range(n_e)]
        return lambda k: hook(views[k])


def _check_flag(flag, plans: Sequence[EnginePlan]) -> None:
    for pl in plans:
        if pl.device >= 0:
            check_buffer("flag", flag, dtype=torch.int32, device=pl.params[0].device,
                         at_least=1)


def run_plans(plans: Sequence[EnginePlan], *, check: bool, flag: Optional[torch.Tensor] = None,
              mode: str = "all", modes: Optional[Sequence[str]] = None) -> Optional[Refusal]:
    """Runs ``mode`` (or ``modes[i]``) of each plan (set beforehand; a plan may appear more
    than once) in order, in one engine call, up to the first refusal; returns it (its ``plan``
    the entry's position) or None. One plan's ``"all"`` is all or nothing; a step over several
    plans is ordered by :func:`thermo_ext.backends.run_step` (every ``"pre"`` before any
    ``"finish"``). A plan with a ``sum_hook`` runs its sum phases one by one with the hook
    between them (with zero sums after its own refusal, so that the collectives in the hooks
    match across ranks). ``flag``: the CUDA plans' non-finite flag (int32, on their device):
    there a refusal is recorded in the flag instead of returned."""
    if modes is None:
        modes = [mode] * len(plans)
    elif len(modes) != len(plans):
        raise ValueError(f"modes: expected one per plan ({len(plans)}), got {len(modes)}")
    try:
        codes = [MODES[m] for m in modes]
    except (KeyError, TypeError):
        raise ValueError(f"mode: expected one of {tuple(MODES)}, got "
                         f"{next(m for m in modes if m not in MODES)!r}") from None
    if flag is not None:
        _check_flag(flag, plans)
    streams = [pl.stream() if pl.device >= 0 else 0 for pl in plans]
    args = ([pl.plan for pl in plans], streams, bool(check), _ptr(flag), codes)
    if any(pl.sum_hook is not None for pl in plans):
        i, code = _C.run_plans(*args, [pl._hook() for pl in plans])
    else:  # the usual step: no per-plan hooks to convert
        i, code = _C.run_plans(*args)
    if i < 0:
        return None
    refusal = Refusal.from_code(code, plan=i)
    if refusal.kind != "thermostat" and plans[i].grad_map is not None:  # a run: its parameter
        refusal.index = plans[i].grad_map[refusal.index][0]
    return refusal


def thermo_step(params: List[torch.Tensor], momenta: List[Optional[torch.Tensor]],
                grads: List[torch.Tensor], *, scheme: FoldedScheme, lr: float, gamma: float,
                tau: float, sigma: float, eps: float, weight_decay: float,
                xi: Optional[torch.Tensor], segments: Sequence[int],
                seg_numel: Optional[Sequence[float]] = None, seed: int, step: int,
                uids: Sequence[int], offsets: Optional[Sequence[int]] = None,
                runs: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
                first: bool = False, check_finite: bool = True,
                stochastic_rounding: bool = True, workspace: Optional[torch.Tensor] = None,
                sum_hook: Optional[Callable[[torch.Tensor], None]] = None,
                step_tensor: Optional[torch.Tensor] = None,
                flag: Optional[torch.Tensor] = None,
                validate: bool = True, mode: str = "all",
                maximize: bool = False, masses: Optional[List[torch.Tensor]] = None,
                mass_starts: Optional[Sequence[int]] = None, mass_beta: float = 0.999,
                mass_eps: float = 1e-8, mass_freeze: int = 0) -> Optional[Refusal]:
    """One step of ``scheme`` on the tensors, in place. Returns None, or the :class:`Refusal`
    of the first non-finite value found by the check (its ``index`` a tensor, or for kind
    "thermostat" a segment; its ``plan`` None), in which case nothing was modified.

    ``xi`` is a float64 tensor of one thermostat variable per segment; ``segments[i]`` is tensor
    i's segment; ``seg_numel`` the elements per segment (defaults to the local tensors');
    ``offsets[i]`` the global index of tensor i's first element (a shard of a bigger tensor);
    ``runs[i]`` = (run, stride), when given, makes element l's global index
    ``offsets[i] + (l // run) * stride + l % run`` (a shard on another dim than 0);
    ``sum_hook(sums)``, when given, may reduce the segment sums of each E in place (distributed).
    ``masses`` (the adaptive mass of docs/DESIGN.md, Mass), when given: each tensor's second
    moment v (the momenta's dtype), updated in place, ``mass_starts[i]`` the step whose gradient
    was v's first; ``mass_beta``, ``mass_eps``, ``mass_freeze`` (0: never) its settings.
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
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {tuple(MODES)}, got {mode!r}")
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
                      seg_numel=seg_numel, seed=seed, uids=uids, offsets=offsets, runs=runs,
                      step_tensor=step_tensor, workspace=workspace, masses=masses,
                      mass_starts=mass_starts)
    plan.set(grads, lr=float(lr), gamma=float(gamma), tau=float(tau), sigma=float(sigma),
             eps=float(eps), weight_decay=float(weight_decay), step=int(step), first=bool(first),
             stochastic_rounding=stochastic_rounding, maximize=bool(maximize),
             mass_beta=float(mass_beta), mass_eps=float(mass_eps),
             mass_freeze=float(mass_freeze))
    plan.sum_hook = sum_hook
    refusal = run_plans([plan], check=bool(check_finite), flag=flag, mode=mode)
    if refusal is not None:
        refusal.plan = None
    return refusal
