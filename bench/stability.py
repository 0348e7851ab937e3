"""The instability monitor (thermo_ext.stability): what it costs, and what it sees on the paper's
spiral runs.

    python bench/stability.py --cost            # 10 M float32 parameters: step without the
                                                # monitor, with the weights' rule, with both
                                                # rules; side by side, interleaved
    python bench/stability.py --cost --numel 20000 --tensors 6   # a spiral-sized model
    python bench/stability.py --spiral          # the paper's spiral runs (thermo-ext spiral's
                                                # code path, preset "paper"): warnings and the
                                                # largest signals per method

Ratios only (no bare times): the cost is the median step time with the check over the median
without it, measured in the same process in interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import List, Optional, Sequence

import torch

import thermo_ext as te
from thermo_ext.stability import InstabilityWarning, StabilityMonitor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_families import closest_approach  # noqa: E402


def bench_cost(numel: int, tensors: int, steps: int, rounds: int, threads: Optional[int]) -> None:
    """Step time with the monitor off, with the weights' rule only (``step_checks = 0``) and
    with both rules (the default), side by side in interleaved rounds."""
    if threads:
        torch.set_num_threads(threads)
        te.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    size = numel // tensors
    modes = ("off", "weights", "both")
    contenders = {}
    for method in ("Langevin", "AdLaLa"):
        for mode in modes:
            params = [torch.nn.Parameter(0.05 * torch.randn(size, generator=g))
                      for _ in range(tensors)]
            for p in params:
                p.grad = 1e-3 * torch.randn(size, generator=g)
            parts = [params[: tensors // 2], params[tensors // 2:]]
            check = mode != "off"
            opt = (te.Langevin(params, lr=0.1, gamma=1.0, tau=1e-6, seed=1,
                               check_stability=check) if method == "Langevin" else
                   te.AdLaLa(parts, seed=1, check_stability=check))
            if mode == "weights":
                opt._stability.step_checks = 0
            contenders[(method, mode)] = opt
    for opt in contenders.values():  # warm-up: state, plans, caches
        for _ in range(StabilityMonitor.every + 1):
            opt.step()
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for key, opt in contenders.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[key].append((time.perf_counter() - t0) / steps)
    print(f"# {numel / 1e6:g} M float32 parameters in {tensors} tensors, "
          f"{te.get_num_threads()} thread(s), {rounds} interleaved rounds of {steps} steps "
          f"(the weights' rule every {StabilityMonitor.every} steps, the step rule every "
          f"{StabilityMonitor.step_every}); torch {torch.__version__}")
    print("method    monitor / off (median; spread of the rounds min..max)")
    for method in ("Langevin", "AdLaLa"):
        off = times[(method, "off")]
        cells = []
        for mode in ("weights", "both"):
            on = times[(method, mode)]
            ratios = sorted(a / b for a, b in zip(on, off))
            cells.append(f"{mode}: {statistics.median(on) / statistics.median(off):.3f} "
                         f"({ratios[0]:.3f}..{ratios[-1]:.3f})")
        print(f"{method:9s} " + "   ".join(cells))
    # One check alone against one step: what every-step checking would cost.
    opt = contenders[("Langevin", "both")]
    mon = StabilityMonitor(every=1)
    check_t, step_t = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        mon.observe(opt)
        check_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opt.step()
        step_t.append(time.perf_counter() - t0)
    print(f"one check / one Langevin step (medians): "
          f"{statistics.median(check_t) / statistics.median(step_t):.3f}")


def bench_spiral(epochs: int, seeds: Sequence[int], every: int) -> None:
    from thermo_ext import experiments as ex

    torch.set_num_threads(1)
    te.set_num_threads(1)
    methods = ["Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped"]
    print(f"# the paper's spiral runs (preset 'paper', {epochs} epochs, batch 25, seeds "
          f"{list(seeds)}), monitor checks every {every} steps")
    print(f"method      seed  test %  warnings  RMS/scale  growth  RMS/scale at growth>="
          f"{StabilityMonitor.rate:g}  growth at RMS/scale>={StabilityMonitor.growth:g}  kT/tau")
    for method in methods:
        for seed in seeds:
            hyper = te.methods.preset_values(method, "paper")
            spec = ex.RunSpec(task=ex.SpiralTask(), method=method, hyper=hyper, seed=seed,
                              epochs=epochs, eval_every=max(1, epochs // 10), batch=25)
            trace: List[dict] = []
            saved = StabilityMonitor.every, StabilityMonitor.trace
            StabilityMonitor.every, StabilityMonitor.trace = every, trace
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = ex.train_run(spec)
            finally:
                StabilityMonitor.every, StabilityMonitor.trace = saved
            warned = [w for w in caught if issubclass(w.category, InstabilityWarning)]
            groups = {}
            for row in trace:
                groups.setdefault(row["group"], []).append(row)
            near = [closest_approach(g) for g in groups.values()]
            print(f"{method:11s} {seed:4d}  {res['final_test_acc']:6.1f}  {len(warned):8d}  "
                  f"{max(m['theta'] for m in near):9.2f}  {max(m['rate'] for m in near):6.2f}  "
                  f"{max(m['theta_at_rate'] for m in near):17.2f}  "
                  f"{max(m['rate_at_theta'] for m in near):17.2f}  "
                  f"{max(m['kt'] for m in near):8.1f}", flush=True)
            for w in warned:
                print("    ", str(w.message)[:200])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--spiral", action="store_true")
    ap.add_argument("--epochs", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--every", type=int, default=StabilityMonitor.every)
    args = ap.parse_args(argv)
    if not (args.cost or args.spiral):
        ap.error("choose --cost and/or --spiral")
    if args.cost:
        bench_cost(args.numel, args.tensors, args.steps, args.rounds, args.threads)
    if args.spiral:
        bench_spiral(args.epochs, range(args.seeds), args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
