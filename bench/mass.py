"""What the adaptive mass costs a step: each scheme with ``mass="adaptive"`` against the same
scheme with the unit mass, side by side in one process (docs/DESIGN.md, Mass).

10 M float32 parameters in 20 tensors on the CPU (2**26 in 200 tensors with --device cuda),
every contender warmed up and then timed in interleaved rounds; the table gives each contender's
median time and its ratio to Adam(fused), and below it the ratio of every adaptive-mass step to
its unit-mass twin (of the medians, of the minimums, and the quartiles of the per-round ratio).

Below that, where the cost comes from (docs/BENCHMARKS.md, The adaptive mass's cost): Langevin
at tau = 0 (no normals drawn: the step is memory traffic plus the mass's arithmetic) with and
without the mass, the engine's normals alone (``thermo_ext.kernels.fill_normal`` into a
preallocated buffer: one per element, what a tau > 0 step draws, plus writing them, 4 bytes per
element that the step keeps in L1), and how well the additive model
``step(tau) = step(tau = 0) + normals`` predicts the tau > 0 steps.

    python bench/mass.py                  # all threads
    OMP_NUM_THREADS=1 python bench/mass.py
    python bench/mass.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

import thermo_ext as te
from thermo_ext import kernels
from thermo_ext.benchmark import ROUNDS, Row, _params, _ratios, measure, print_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--numel", type=int, default=None)
    ap.add_argument("--tensors", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    numel = args.numel or (2**26 if cuda else 10_000_000)
    n_tensors = args.tensors or (200 if cuda else 20)
    make = lambda: _params(numel, n_tensors, device)  # noqa: E731
    optims = {"Adam(fused)": torch.optim.Adam(make(), lr=1e-3, fused=True)}
    pairs = []
    for scheme, kw in (("langevin", dict(gamma=1.0, tau=1e-7)),
                       ("adl", dict(eps=1e-9, tau=1e-7)),
                       ("overdamped", dict(tau=1e-7))):
        for check in (True, False):
            label = scheme + ("" if check else ", no check")
            for mass in ("unit", "adaptive"):
                optims[f"{label}, {mass}"] = te.Thermo(make(), lr=0.01, scheme=scheme, seed=1,
                                                       mass=mass, check_finite=check, **kw)
            pairs.append(label)
    # The decomposition: no normals (tau = 0), and the normals alone.
    for mass in ("unit", "adaptive"):
        optims[f"langevin tau 0, no check, {mass}"] = te.Thermo(
            make(), lr=0.01, scheme="langevin", seed=1, mass=mass, check_finite=False,
            gamma=1.0, tau=0.0)
    fns = {k: o.step for k, o in optims.items()}
    buf = torch.empty(numel, device=device)
    fns["normals alone"] = lambda: kernels.fill_normal(buf, seed=1, uid=0, step=1, draw=0,
                                                       offset=0)
    t = measure(fns, device, args.rounds)
    print(f"thermo_ext {te.__version__} | torch {torch.__version__} | {device} | "
          f"ISA {te.build_info()['isa']} | threads {te.get_num_threads()} | {numel} float32 in "
          f"{n_tensors} tensors | {args.rounds} rounds")
    print_table("Step time", _ratios(t, "Adam(fused)"), "median / Adam(fused)")
    rows = []
    for label in pairs:
        a, u = t[f"{label}, adaptive"], t[f"{label}, unit"]
        q = a.per_round(u)
        rows.append(Row(f"{label}: adaptive / unit", a.median / u.median,
                        f"x  (of minimums {a.min / u.min:.3f}; per round p25-p75 "
                        f"{q[0]:.3f}-{q[1]:.3f})"))
    print_table("The adaptive mass's cost", rows, "")
    u0, a0 = t["langevin tau 0, no check, unit"], t["langevin tau 0, no check, adaptive"]
    z = t["normals alone"]
    u, a = t["langevin, no check, unit"], t["langevin, no check, adaptive"]
    q = a0.per_round(u0)
    print_table("Where it comes from (langevin, no check)", [
        Row("tau = 0: adaptive / unit", a0.median / u0.median,
            f"x  (per round p25-p75 {q[0]:.3f}-{q[1]:.3f}; bytes moved per element 28 / 20 = "
            f"1.400)"),
        Row("normals alone / unit step at tau = 0", z.median / u0.median, "x"),
        Row("unit: step / (step at tau 0 + normals)", u.median / (u0.median + z.median),
            "x  (1: no overlap of the normals with the memory traffic)"),
        Row("adaptive: step / (step at tau 0 + normals)", a.median / (a0.median + z.median),
            "x"),
        Row("additive model's adaptive / unit", (a0.median + z.median) / (u0.median + z.median),
            "x  (measured above)"),
    ], "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
