"""Step-time benchmark: thermo_ext against torch.optim and thermo_ext.reference, side by side.

Every contender runs in this one process on the same tensors. Each is first warmed up (state
allocated, pages faulted, thread pools started, lazy imports done), then timed in interleaved
rounds (the order rotates from round to round) of short blocks of calls. The table shows each
contender's median, minimum and maximum time per call over the rounds, and its ratio to
Adam(fused)'s median (and minimum): a stall of the machine spoils one block, not the result, and
the spread says how quiet the machine was.

    thermo-ext bench                     # CPU: 10 M float32 parameters in 20 tensors
    thermo-ext bench --device cuda       # GPU: 2**26 float32 elements in 200 tensors
    thermo-ext bench --spiral            # per-step overhead on the paper's 2-100-1 net
    thermo-ext bench --isa all           # the CPU tables once per instruction set, then a summary

The engine picks its instruction set once per process (``THERMO_EXT_ISA`` or the best the CPU
has); ``--isa`` runs the benchmark in a fresh process per named set. When ``posteriors`` is
installed, its BAOA, SGNHT and SGLD updates join the step table (their gradient function
replaced by the fixed gradients the other contenders read from ``.grad``).

``python bench/step.py`` (from a checkout) runs the same code with the same options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import thermo_ext as te  # the package itself: bench_* use its public API

#: Defaults: rounds of the large-tensor tables and of the spiral table (its blocks are short, so
#: more rounds cost little), seconds of warm-up per contender (and at least WARMUP_CALLS calls),
#: and the length of one timed block (calls are repeated until a block lasts about this long).
#: A median over 7 rounds survives 3 spoiled ones.
ROUNDS = 7
SPIRAL_ROUNDS = 21
WARMUP_S = 0.3
WARMUP_CALLS = 2
BLOCK_S = 0.02


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of one contender: one sample per round, each the mean of ``reps``
    calls."""

    samples: Tuple[float, ...]
    reps: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def per_round(self, base: "Timing") -> Tuple[float, float]:
        """The quartiles (25th, 75th percentile) over the rounds of this contender's time over
        ``base``'s in the same round: the spread of the ratio itself, each pair timed moments
        apart, which a machine busy for a while moves less than it moves the times."""
        ratios = [a / b for a, b in zip(self.samples, base.samples)]
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        return q[0], q[2]


def warm_up(fn: Callable[[], None], device: torch.device, seconds: float = WARMUP_S,
            calls: int = WARMUP_CALLS) -> float:
    """Calls ``fn`` until it has run ``calls`` times and ``seconds`` have passed; returns the
    median time of the later half of the calls (an estimate of one warm call).

    Why so long: the first calls of an optimizer allocate its state and, on CPU, start the
    OpenMP thread pool; on a busy machine those first calls take up to a thousand times a warm
    call (Adam(fused) on the spiral net: 30-70 ms for each of its first eight steps, against
    50 µs), which a count of two warm-up calls did not cover.
    """
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < calls or time.perf_counter() - start < seconds:
        times.append(_timer(fn, device, 1))
    return statistics.median(times[len(times) // 2:])


@contextlib.contextmanager
def _no_gc():
    """A garbage collection inside a block would be charged to whichever contender ran (as
    timeit does, collection is off while timing)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(contenders: Dict[str, Callable[[], None]], device: torch.device, rounds: int,
            reps: Optional[Dict[str, int]] = None, *, block_s: Optional[float] = None,
            warmup_s: Optional[float] = None) -> Dict[str, Timing]:
    """Times every contender in ``rounds`` interleaved rounds (the order rotated each round so
    that no contender always follows the same one), each after its warm-up of ``warmup_s``
    (default ``WARMUP_S``). ``reps`` fixes the calls per block; by default they are chosen from
    the warm-up so that a block lasts about ``block_s`` (default ``BLOCK_S``)."""
    block_s = BLOCK_S if block_s is None else block_s
    warmup_s = WARMUP_S if warmup_s is None else warmup_s
    names = list(contenders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", te.InstabilityWarning)
        estimate = {k: warm_up(contenders[k], device, warmup_s) for k in names}
    reps = dict(reps or {})
    for k in names:
        reps.setdefault(k, max(1, math.ceil(block_s / max(estimate[k], 1e-9))))
    samples: Dict[str, List[float]] = {k: [] for k in names}
    with _no_gc(), warnings.catch_warnings():
        # Fixed gradients drive the parameters away for real: the stability check (part of a
        # default step's cost) rightly warns, which is not the benchmark's business.
        warnings.simplefilter("ignore", te.InstabilityWarning)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                samples[k].append(_timer(contenders[k], device, reps[k]))
    return {k: Timing(tuple(samples[k]), reps[k]) for k in names}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table: a timed contender (``timing`` set, ``value`` its ratio to the
    baseline's median) or a derived ratio (``timing`` None)."""

    name: str
    value: float
    note: str = ""
    timing: Optional[Timing] = None
    min_ratio: Optional[float] = None  # the contender's minimum over the baseline's minimum
    per_round: Optional[Tuple[float, float]] = None  # Timing.per_round against the baseline


def _ratios(t: Dict[str, Timing], base: str) -> List[Row]:
    b = t[base]
    return [Row(k, v.median / b.median, "", v, v.min / b.min, v.per_round(b))
            for k, v in t.items()]


@contextlib.contextmanager
def threads(n: int):
    """``n`` torch and engine threads inside the block (restored after)."""
    before = torch.get_num_threads(), te.get_num_threads()
    torch.set_num_threads(n)
    te.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        te.set_num_threads(before[1])


def _params(numel: int, n_tensors: int, device, seed: int = 0) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    base, extra = divmod(numel, n_tensors)
    sizes = [base + (1 if i < extra else 0) for i in range(n_tensors)]
    ps = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=g).to(device))
        p.grad = torch.randn(n, generator=g).to(device)
        ps.append(p)
    return ps


#: posteriors' samplers in the step table, with the settings of its sgmcmc module's build():
#: (module, keyword arguments). Their lr is the thermo_ext contenders' h.
POSTERIORS_SAMPLERS = {
    "posteriors BAOA": ("baoa", dict(lr=0.01, alpha=0.01, sigma=1.0, temperature=1.0)),
    "posteriors SGNHT": ("sgnht", dict(lr=0.01, alpha=0.01, sigma=1.0, temperature=1.0)),
    "posteriors SGLD": ("sgld", dict(lr=0.01, temperature=1.0)),
}


def posteriors_version() -> Optional[str]:
    """posteriors' version, or None when it is not installed (it is an optional contender)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its dataclasses warn about tensordict defaults
            import posteriors
    except ImportError:
        return None
    return getattr(posteriors, "__version__", "?")


@contextlib.contextmanager
def posteriors_updates(make: Callable[[], List[torch.nn.Parameter]]):
    """posteriors' in-place sampler updates (POSTERIORS_SAMPLERS) on parameters from ``make``,
    as {name: step function}; empty when posteriors is not installed. Inside the block each
    module's ``grad_and_value`` returns the parameters' fixed ``.grad`` tensors, so that a step
    costs its update minus its gradient function, as the torch optimizers' steps do."""
    if posteriors_version() is None:
        yield {}
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import importlib
        modules = {m: importlib.import_module(f"posteriors.sgmcmc.{m}")
                   for m, _ in POSTERIORS_SAMPLERS.values()}
    steps, current = {}, [None]
    for name, (m, kw) in POSTERIORS_SAMPLERS.items():
        params = make()
        transform = modules[m].build(lambda p, batch: (torch.zeros(()), None), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a dict: posteriors' state keeps a dict of tensors as it is (a list it converts)
            state = transform.init({str(i): p.detach() for i, p in enumerate(params)})

        def step(transform=transform, state=state,
                 grads={str(i): p.grad for i, p in enumerate(params)}):
            current[0] = grads  # what the patched gradient function hands this update
            transform.update(state, None, inplace=True)
        step.state = state  # the sampler's state, for tests
        steps[name] = step

    def fixed_grads(fn, has_aux=False):
        return lambda params, batch: (current[0], (torch.zeros(()), None))

    saved = {m: mod.grad_and_value for m, mod in modules.items()}
    try:
        for mod in modules.values():
            mod.grad_and_value = fixed_grads
        yield steps
    finally:
        for m, mod in modules.items():
            mod.grad_and_value = saved[m]


def bench_step(device: torch.device, numel: int, n_tensors: int, rounds: int = ROUNDS,
               with_reference: bool = True, with_posteriors: bool = True) -> List[Row]:
    """Rows: every contender against Adam(fused), the engine's speed-up over the reference, and
    on CUDA the achieved bandwidth against a copy."""
    make = lambda: _params(numel, n_tensors, device)  # noqa: E731
    optims = {
        "Adam(fused)": torch.optim.Adam(make(), lr=1e-3, fused=True),
        "Adam(foreach)": torch.optim.Adam(make(), lr=1e-3, foreach=True),
        "SGD(momentum, foreach)": torch.optim.SGD(make(), lr=1e-3, momentum=0.9, foreach=True),
        "thermo_ext langevin": te.Thermo(make(), lr=0.01, scheme="langevin", seed=1),
        "thermo_ext langevin, no check": te.Thermo(make(), lr=0.01, scheme="langevin", seed=1,
                                                   check_finite=False),
        "thermo_ext adl": te.Thermo(make(), lr=0.01, scheme="adl", eps=1e-9, seed=1),
        "thermo_ext adl, no check": te.Thermo(make(), lr=0.01, scheme="adl", eps=1e-9, seed=1,
                                              check_finite=False),
    }
    if with_reference:
        optims["reference langevin"] = te.Thermo(make(), lr=0.01, scheme="langevin", seed=1,
                                                 backend="reference")
        optims["reference adl"] = te.Thermo(make(), lr=0.01, scheme="adl", eps=1e-9, seed=1,
                                            backend="reference")
    contenders = {k: o.step for k, o in optims.items()}
    others = (posteriors_updates(make) if with_posteriors and device.type == "cpu"
              else contextlib.nullcontext({}))
    with others as extra:
        contenders.update(extra)
        t = measure(contenders, device, rounds)
    rows = _ratios(t, "Adam(fused)")
    def speed_up(name: str, slow: str, fast: str) -> Row:
        return Row(name, t[slow].median / t[fast].median,
                   f"x  (of minimums {t[slow].min / t[fast].min:.3f} x)")

    if with_reference:
        for scheme in ("langevin", "adl"):
            rows.append(speed_up(f"speed-up of the engine ({scheme}) over the reference",
                                 f"reference {scheme}", f"thermo_ext {scheme}"))
    for name, ours in (("posteriors BAOA", "langevin"), ("posteriors SGNHT", "adl"),
                       ("posteriors SGLD", "langevin")):
        if name in t:
            rows.append(speed_up(f"speed-up of thermo_ext {ours} over {name}", name,
                                 f"thermo_ext {ours}"))
    if device.type == "cuda":
        # Achieved bandwidth against a device-to-device copy of the same bytes. A Langevin step
        # reads theta, p, g and writes theta, p (20 B/element); the check adds a read of theta
        # and g (8 B). adl adds a read-only pass over p and g (8 B), and over theta too when it
        # is checked (weight decay 0 here: nothing else in that pass reads theta).
        src = torch.empty(5 * numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t_copy = measure({"copy": lambda: dst.copy_(src)}, device, rounds)["copy"].median
        copy_bw = 2 * src.numel() * 4 / t_copy
        for name, nbytes in (("thermo_ext langevin, no check", 20),
                             ("thermo_ext langevin", 28), ("thermo_ext adl, no check", 28),
                             ("thermo_ext adl", 32)):
            bw = numel * nbytes / t[name].median
            rows.append(Row(f"{name}: bandwidth / copy bandwidth", bw / copy_bw, "of copy"))
    return rows


def bench_noise(device: torch.device, numel: int, rounds: int = ROUNDS) -> List[Row]:
    """thermo_ext's normals against torch's normal_, and on CPU the cost of one normal per
    thread: fill_normal timed on one engine thread, and on all of them (time x threads / n)."""
    x = torch.empty(numel, dtype=torch.float32, device=device)
    fill = lambda: te.kernels.fill_normal(x, seed=1, uid=0, step=0, draw=0)  # noqa: E731
    contenders = {"torch normal_": lambda: x.normal_(), "thermo_ext noise": fill}
    if device.type == "cpu":
        def one_thread():
            with threads(1):
                fill()
        contenders["thermo_ext noise, 1 thread"] = one_thread
    t = measure(contenders, device, rounds)
    rows = _ratios(t, "torch normal_") + [
        Row("noise: thermo_ext speed-up over torch normal_",
            t["torch normal_"].median / t["thermo_ext noise"].median, "x")]
    if device.type == "cpu":
        n_threads = te.get_num_threads()
        rows.append(Row("ns per normal per thread, 1 thread",
                        t["thermo_ext noise, 1 thread"].median / numel * 1e9, "ns"))
        if n_threads > 1:
            rows.append(Row(f"ns per normal per thread, {n_threads} threads",
                            t["thermo_ext noise"].median * n_threads / numel * 1e9, "ns"))
    return rows


#: Threads of the spiral table: the experiments run their tiny nets single-threaded
#: (``thermo-ext spiral --threads 1``, the default).
SPIRAL_THREADS = 1


def bench_spiral(rounds: int = SPIRAL_ROUNDS) -> List[Row]:
    """Per-step time on the paper's 2-100-1 net (four tensors): Python overhead dominates.

    Measured with ``SPIRAL_THREADS`` torch and engine threads, as the experiments train these
    nets. With more threads torch's fused Adam opens an OpenMP parallel region on every step
    even for four tiny tensors, and on a busy machine each such step can wait for a descheduled
    thread (a scheduler tick, milliseconds): that measured the machine's load, not the
    optimizers (it once printed Langevin at 0.003x Adam(fused)).
    """
    def net():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(2, 100), torch.nn.ReLU(), torch.nn.Linear(100, 1))
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        return m

    optims = {
        "Adam(fused)": torch.optim.Adam(net().parameters(), lr=5e-3, fused=True),
        "Adam(foreach)": torch.optim.Adam(net().parameters(), lr=5e-3, foreach=True),
        "SGD(momentum)": torch.optim.SGD(net().parameters(), lr=5e-3, momentum=0.9),
        "AdLaLa": te.AdLaLa(net(), seed=1),
        "LOL": te.LOL(net(), seed=1),
        "LaLa": te.LaLa(net(), seed=1),
        "Langevin": te.Langevin(net(), seed=1),
        "AdL": te.AdL(net(), seed=1),
        "Overdamped": te.Overdamped(net(), seed=1),
        "AdLaLa, no check": te.AdLaLa(net(), seed=1, check_finite=False),
    }
    with threads(SPIRAL_THREADS):
        t = measure({k: o.step for k, o in optims.items()}, torch.device("cpu"), rounds)
    return _ratios(t, "Adam(fused)")


def bench_compile(rounds: int = SPIRAL_ROUNDS) -> List[Row]:
    """torch.compile on the spiral net (2-100-1, batch 25, one thread): the optimizer step alone
    and a whole train step (forward, backward, step), eager and compiled (AdLaLa with
    fullgraph=True, Adam without: torch's optimizers cannot), for AdLaLa and torch's
    Adam(fused=True), side by side."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25, 2, generator=g)
    y = (x[:, :1] * x[:, 1:] > 0).float()

    def net():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(2, 100), torch.nn.ReLU(), torch.nn.Linear(100, 1))
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return m

    def train_step(m, opt):
        def fn():
            for p in m.parameters():
                p.grad = None
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return fn

    contenders = {}
    for name, make in (("Adam(fused)", lambda m: torch.optim.Adam(m.parameters(), lr=5e-3,
                                                                   fused=True)),
                       ("AdLaLa", lambda m: te.AdLaLa(m, seed=1))):
        m = net()
        opt = make(m)
        contenders[f"{name} step"] = opt.step
        m = net()
        opt = make(m)
        # torch's optimizers break the graph around their step on purpose
        # (torch.optim.optimizer._use_grad): they cannot compile with fullgraph=True.
        full = name == "AdLaLa"
        contenders[f"{name} step, compiled"] = torch.compile(opt.step, fullgraph=full)
        m = net()
        contenders[f"{name} train step"] = train_step(m, make(m))
        m = net()
        contenders[f"{name} train step, compiled"] = torch.compile(train_step(m, make(m)),
                                                                   fullgraph=full)
    with threads(SPIRAL_THREADS):
        for name, fn in contenders.items():  # compile outside the timed warm-up
            # AdLaLa's train step traces loss.backward() into its one graph; torch's Adam
            # breaks the graph there (with trace_autograd_ops its graph pieces fail to run).
            with torch._dynamo.config.patch(trace_autograd_ops=name.startswith("AdLaLa")):
                for _ in range(3):
                    fn()
        t = measure(contenders, torch.device("cpu"), rounds)
    rows = _ratios(t, "Adam(fused) step")
    for what in ("step", "train step"):
        for name in ("AdLaLa", "Adam(fused)"):
            rows.append(Row(f"{name} {what}: compiled / eager",
                            t[f"{name} {what}, compiled"].median / t[f"{name} {what}"].median,
                            "x"))
        rows.append(Row(f"compiled {what}: AdLaLa / Adam(fused)",
                        t[f"AdLaLa {what}, compiled"].median
                        / t[f"Adam(fused) {what}, compiled"].median, "x"))
    return rows


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:7.3g} {unit}"
    return f"{seconds / 1e-9:7.3g} ns"


def print_table(title: str, rows: Sequence[Row], ref: str) -> None:
    """Timed rows: median, min and max time per call over the rounds, the ratio of medians to
    the baseline's (``ref``), the ratio of minimums, and the quartiles of the per-round ratio
    (Timing.per_round); derived rows: their value."""
    print(f"\n{title}")
    width = max(len(r.name) for r in rows) + 2
    timed = [r for r in rows if r.timing is not None]
    if timed:
        print(f"  {'contender':<{width}} {'median':>10} {'min':>10} {'max':>10}  "
              f"{ref:>18}  {'(of minimums)':>13}  {'per round, p25-p75':>18}")
    for r in rows:
        if r.timing is None:
            print(f"  {r.name:<{width}} {r.value:8.3f} {r.note}")
        else:
            t = r.timing
            spread = "" if r.per_round is None else f"{r.per_round[0]:.3f}-{r.per_round[1]:.3f}"
            print(f"  {r.name:<{width}} {_time(t.median):>10} {_time(t.min):>10} "
                  f"{_time(t.max):>10}  {r.value:18.3f}  {r.min_ratio:13.3f}  {spread:>18}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``bench/step.py`` and ``thermo-ext bench``)."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--numel", type=int, default=None,
                    help="elements in all (default 10M on cpu, 2**26 on cuda)")
    ap.add_argument("--tensors", type=int, default=None,
                    help="number of tensors (default 20 on cpu, 200 on cuda)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"interleaved timing rounds, each a block of about {BLOCK_S * 1e3:g} "
                         f"ms (or one call) per contender, after {WARMUP_S:g} s (and at least "
                         f"{WARMUP_CALLS} calls) of warm-up each (default {ROUNDS}, on the "
                         f"spiral net {SPIRAL_ROUNDS})")
    ap.add_argument("--spiral", action="store_true", help="only the spiral-net overhead table")
    ap.add_argument("--compile", action="store_true",
                    help="only the torch.compile table (spiral net: step and train step, eager "
                         "and compiled, AdLaLa and Adam(fused))")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    ap.add_argument("--no-posteriors", action="store_true",
                    help="skip posteriors' samplers (otherwise in the step table when installed)")
    ap.add_argument("--isa", choices=ISAS + ("all",), default=None,
                    help="the engine's instruction set: run in a fresh process with "
                         "THERMO_EXT_ISA set (the engine picks it once per process); 'all': "
                         "every set this CPU supports, one after the other, then a summary "
                         "table (default: the one the engine picks, printed in the header)")
    ap.add_argument("--summary-json", default=None, help=argparse.SUPPRESS)


#: The engine's instruction sets, as THERMO_EXT_ISA names them.
ISAS = ("baseline", "avx2", "avx512")


def _child_argv(args: argparse.Namespace, isa: str, summary: str) -> List[str]:
    argv = ["--device", args.device, "--isa", isa, "--summary-json", summary]
    for flag in ("numel", "tensors", "rounds"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("spiral", "compile", "no_reference", "no_posteriors"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def _run_per_isa(args: argparse.Namespace, isas: Sequence[str], prog: str) -> int:
    """The benchmark once per instruction set, each in a fresh process, then one summary."""
    import tempfile

    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            path = os.path.join(tmp, f"{isa}.json")
            env = dict(os.environ, THERMO_EXT_ISA=isa)
            cmd = [sys.executable, "-m", "thermo_ext.benchmark", *_child_argv(args, isa, path)]
            print(f"\n=== ISA {isa} ===", flush=True)
            rc = subprocess.call(cmd, env=env)
            if rc != 0:
                print(f"{prog}: the run with ISA {isa} failed (exit status {rc})",
                      file=sys.stderr)
                return rc
            if os.path.exists(path):
                with open(path) as f:
                    summaries.append(json.load(f))
    if summaries:
        print_isa_summary(summaries)
    return 0


#: The summary table's columns: (heading, key in a run's summary, format).
SUMMARY_COLUMNS = (
    ("langevin", "thermo_ext langevin", "ratio"),
    ("langevin, no check", "thermo_ext langevin, no check", "ratio"),
    ("adl", "thermo_ext adl", "ratio"),
    ("adl, no check", "thermo_ext adl, no check", "ratio"),
    ("ns/normal (1 thread)", "ns per normal per thread, 1 thread", "value"),
    ("ns/normal (all threads)", "ns per normal per thread, all threads", "value"),
    ("spiral AdLaLa", "spiral AdLaLa", "ratio"),
)


def print_isa_summary(summaries: Sequence[Dict[str, Any]]) -> None:
    """One line per instruction set: the step ratios to Adam(fused) (median; of minimums) and
    the cost of a normal per thread."""
    print("\nPer instruction set: step time / Adam(fused) (median; of minimums, each measured in "
          "that ISA's process), and ns per normal per thread")
    head = "  " + f"{'ISA':<9}" + "".join(f"{h:>24}" for h, _, _ in SUMMARY_COLUMNS)
    print(head)
    for sm in summaries:
        cells = []
        for _, key, kind in SUMMARY_COLUMNS:
            v = sm.get(key)
            if v is None:
                cells.append(f"{'-':>24}")
            elif kind == "ratio":
                cells.append(f"{v[0]:>15.3f}; {v[1]:>6.3f}")
            else:
                cells.append(f"{v:>24.3f}")
        print("  " + f"{sm['isa']:<9}" + "".join(cells))


def _summary(rows: Sequence[Row]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for r in rows:
        if r.timing is not None:
            out[r.name] = [r.value, r.min_ratio]
        elif r.note == "ns" or r.note.startswith("x"):
            out[r.name] = r.value
    for k in list(out):
        if k.startswith("ns per normal per thread, ") and not k.endswith("1 thread"):
            out["ns per normal per thread, all threads"] = out[k]
    return out


def run(args: argparse.Namespace, prog: str = "bench/step.py",
        error: Optional[Callable[[str], Any]] = None) -> int:
    """Runs the benchmark for parsed ``args``; ``error(message)`` reports a bad option (it may
    raise, as ``ArgumentParser.error`` does)."""
    isa = getattr(args, "isa", None)
    if isa is not None:
        supported = te.build_info()["isas"]
        if isa != "all" and isa not in supported:
            message = (f"--isa: {isa} is not supported by this CPU or build (supported: "
                       f"{', '.join(supported)})")
            if error is None:
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2
            error(message)
            return 2
        wanted = list(supported) if isa == "all" else [isa]
        if wanted != [te.build_info()["isa"]]:
            return _run_per_isa(args, wanted, prog)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    for bad, message in ((args.numel is not None and args.numel < 1,
                          "--numel: expected a positive integer"),
                         (args.tensors is not None and args.tensors < 1,
                          "--tensors: expected a positive integer"),
                         (args.rounds is not None and args.rounds < 1,
                          "--rounds: expected a positive integer")):
        if bad:
            if error is None:
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2
            error(message)
            return 2
    numel = args.numel or (2**26 if device.type == "cuda" else 10_000_000)
    tensors = args.tensors or (200 if device.type == "cuda" else 20)
    info = te.build_info()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with_posteriors = not getattr(args, "no_posteriors", False)
    pv = posteriors_version() if with_posteriors else None
    print(f"thermo_ext {info['version']} | torch {torch.__version__} | {name} | ISA {info['isa']}"
          f" (of {', '.join(info['isas'])}) | OpenMP threads {info['openmp_threads']} | torch "
          f"threads {torch.get_num_threads()} | posteriors "
          f"{pv or ('not installed' if with_posteriors else 'skipped')}")
    summary: Dict[str, Any] = {"isa": info["isa"]}
    if args.compile:
        rounds = args.rounds or SPIRAL_ROUNDS
        print_table(f"torch.compile on the spiral net (2-100-1, batch 25, cpu, {SPIRAL_THREADS} "
                    f"thread), over {rounds} interleaved rounds", bench_compile(rounds),
                    "median / Adam step")
        return 0
    if not args.spiral:
        rounds = args.rounds or ROUNDS
        rows = bench_step(device, numel, tensors, rounds, not args.no_reference,
                          with_posteriors)
        print_table(f"Step time on {numel:,} float32 parameters in {tensors} tensors "
                    f"({device.type}), time per step over {rounds} interleaved rounds",
                    rows, "median / Adam(fused)")
        noise = bench_noise(device, numel, rounds)
        print_table(f"Noise generation ({numel:,} float32 normals), time per call over "
                    f"{rounds} rounds", noise, "median / normal_")
        summary.update(_summary(rows))
        summary.update(_summary(noise))
    if args.spiral or device.type == "cpu":
        rounds = args.rounds or SPIRAL_ROUNDS
        spiral = bench_spiral(rounds)
        print_table(f"Per-step time on the spiral net (2-100-1, four tensors, cpu, "
                    f"{SPIRAL_THREADS} thread), over {rounds} interleaved rounds",
                    spiral, "median / Adam(fused)")
        summary.update({f"spiral {k}": v for k, v in _summary(spiral).items()})
    if getattr(args, "summary_json", None):
        with open(args.summary_json, "w") as f:
            json.dump(summary, f)
    return 0


def main(argv=None, prog: Optional[str] = None) -> int:
    """``python bench/step.py``: parses ``argv`` and runs the benchmark."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args, error=ap.error)


if __name__ == "__main__":
    sys.exit(main())
