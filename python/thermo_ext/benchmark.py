"""Step-time benchmark: thermo_ext against torch.optim and thermo_ext.reference, side by side.

Every contender runs in this one process on the same tensors, in interleaved rounds; the table
prints ratios (never bare times): each contender's median step time over Adam(fused)'s, and the
speed-up of the engine over the reference.

    thermo-ext bench                     # CPU: 10 M float32 parameters in 20 tensors
    thermo-ext bench --device cuda       # GPU: 2**26 float32 elements in 200 tensors
    thermo-ext bench --spiral            # per-step overhead on the paper's 2-100-1 net

``python bench/step.py`` (from a checkout) runs the same code with the same options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import thermo_ext as te  # the package itself: bench_* use its public API


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


def measure(contenders: Dict[str, Callable[[], None]], device: torch.device, rounds: int,
            reps: Dict[str, int]) -> Dict[str, float]:
    """Median seconds per call of each contender, measured in interleaved rounds."""
    for name, fn in contenders.items():  # warm up: allocate state, fault pages, load code
        fn()
        fn()
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(_timer(fn, device, reps.get(name, 1)))
    return {k: statistics.median(v) for k, v in times.items()}


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


def bench_step(device: torch.device, numel: int, n_tensors: int, rounds: int,
               with_reference: bool = True) -> List[tuple]:
    """Rows of (name, ratio to Adam(fused), note)."""
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
    fast_reps = 20 if device.type == "cuda" else 3
    reps = {k: (1 if k.startswith("reference") else fast_reps) for k in contenders}
    t = measure(contenders, device, rounds, reps)
    base = t["Adam(fused)"]
    rows = [(k, v / base, "") for k, v in t.items()]
    if with_reference:
        for scheme in ("langevin", "adl"):
            rows.append((f"speed-up of the engine ({scheme}) over the reference",
                         t[f"reference {scheme}"] / t[f"thermo_ext {scheme}"], "x"))
    if device.type == "cuda":
        # Achieved bandwidth against a device-to-device copy of the same bytes. A Langevin step
        # reads theta, p, g and writes theta, p (20 B/element); the check adds a read of theta
        # and g (8 B). adl adds a read-only pass over p and g (8 B), and over theta too when it
        # is checked (weight decay 0 here: nothing else in that pass reads theta).
        src = torch.empty(5 * numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t_copy = measure({"copy": lambda: dst.copy_(src)}, device, rounds, {"copy": 20})["copy"]
        copy_bw = 2 * src.numel() * 4 / t_copy
        for name, nbytes in (("thermo_ext langevin, no check", 20),
                             ("thermo_ext langevin", 28), ("thermo_ext adl, no check", 28),
                             ("thermo_ext adl", 32)):
            bw = numel * nbytes / t[name]
            rows.append((f"{name}: bandwidth / copy bandwidth", bw / copy_bw, "of copy"))
    return rows


def bench_noise(device: torch.device, numel: int, rounds: int) -> List[tuple]:
    x = torch.empty(numel, dtype=torch.float32, device=device)
    contenders = {
        "torch normal_": lambda: x.normal_(),
        "thermo_ext noise": lambda: te.kernels.fill_normal(x, seed=1, uid=0, step=0, draw=0),
    }
    t = measure(contenders, device, rounds, {k: 5 for k in contenders})
    return [("noise: thermo_ext speed-up over torch normal_", t["torch normal_"] /
             t["thermo_ext noise"], "x")]


def bench_spiral(rounds: int) -> List[tuple]:
    """Per-step time on the paper's 2-100-1 net (four tensors): Python overhead dominates."""
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
    contenders = {k: o.step for k, o in optims.items()}
    t = measure(contenders, torch.device("cpu"), rounds, {k: 500 for k in contenders})
    base = t["Adam(fused)"]
    return [(k, v / base, "") for k, v in t.items()]


def print_table(title: str, rows: List[tuple], ref: str) -> None:
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows) + 2
    print(f"  {'contender':<{width}} {ref}")
    for name, value, note in rows:
        print(f"  {name:<{width}} {value:8.3f} {note}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``bench/step.py`` and ``thermo-ext bench``)."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--numel", type=int, default=None,
                    help="elements in all (default 10M on cpu, 2**26 on cuda)")
    ap.add_argument("--tensors", type=int, default=None,
                    help="number of tensors (default 20 on cpu, 200 on cuda)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--spiral", action="store_true", help="only the spiral-net overhead table")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")


def run(args: argparse.Namespace, prog: str = "bench/step.py",
        error: Optional[Callable[[str], Any]] = None) -> int:
    """Runs the benchmark for parsed ``args``; ``error(message)`` reports a bad option (it may
    raise, as ``ArgumentParser.error`` does)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    for bad, message in ((args.numel is not None and args.numel < 1,
                          "--numel: expected a positive integer"),
                         (args.tensors is not None and args.tensors < 1,
                          "--tensors: expected a positive integer"),
                         (args.rounds < 1, "--rounds: expected a positive integer")):
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
    print(f"thermo_ext {info['version']} | torch {torch.__version__} | {name} | ISA {info['isa']}"
          f" | OpenMP threads {info['openmp_threads']} | torch threads {torch.get_num_threads()}")
    if not args.spiral:
        rows = bench_step(device, numel, tensors, args.rounds, not args.no_reference)
        print_table(f"Step time on {numel:,} float32 parameters in {tensors} tensors "
                    f"({device.type}), median of {args.rounds} interleaved rounds",
                    rows, "time / Adam(fused)")
        print_table("Noise generation", bench_noise(device, numel, args.rounds), "ratio")
    if args.spiral or device.type == "cpu":
        print_table("Per-step time on the spiral net (2-100-1, four tensors, cpu)",
                    bench_spiral(args.rounds), "time / Adam(fused)")
    return 0


def main(argv=None, prog: Optional[str] = None) -> int:
    """``python bench/step.py``: parses ``argv`` and runs the benchmark."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args, error=ap.error)


if __name__ == "__main__":
    sys.exit(main())
