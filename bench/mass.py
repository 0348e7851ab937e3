"""What the adaptive mass costs a step: each scheme with ``mass="adaptive"`` against the same
scheme with the unit mass, side by side in one process (docs/DESIGN.md, Mass).

10 M float32 parameters in 20 tensors on the CPU (2**26 in 200 tensors with --device cuda),
every contender warmed up and then timed in interleaved rounds; the table gives each contender's
median time and its ratio to Adam(fused), and below it the ratio of every adaptive-mass step to
its unit-mass twin (of the medians, of the minimums, and the quartiles of the per-round ratio).

    python bench/mass.py                  # all threads
    OMP_NUM_THREADS=1 python bench/mass.py
    python bench/mass.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

import thermo_ext as te
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
    t = measure({k: o.step for k, o in optims.items()}, device, args.rounds)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
