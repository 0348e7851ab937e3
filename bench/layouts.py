"""Step time of conv weights in the default layout and in channels_last, side by side.

A conv net moved to channels_last (``model.to(memory_format=torch.channels_last)``, as torch
recommends for CNNs on CPUs and GPUs) has 4-D weights that are dense but not contiguous. The
engine steps them through a contiguous copy (kept from step to step, as is the copy of their
gradients); torch's Adam(fused) walks them as they lie. Twelve 3x3 conv weights (7.1 M float32
elements: 8 of 256x128, 4 of 512x256), fixed gradients in the parameters' layout; every
contender is timed in interleaved rounds in this one process. The table prints each one's ratio
to Adam(fused) on the default layout, with the quartiles of the per-round ratio, and for each
optimizer the ratio of its channels_last step to its default-layout step.

    python bench/layouts.py                 # torch's and the engine's default threads
    python bench/layouts.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

import thermo_ext as te
from thermo_ext.benchmark import measure, threads

SHAPES = [(256, 128, 3, 3)] * 8 + [(512, 256, 3, 3)] * 4

OPTIMIZERS = {
    "Adam(fused)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "Langevin": lambda ps: te.Langevin(ps),
    "AdL": lambda ps: te.AdL(ps),
}


def weights(channels_last: bool):
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.05)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        if channels_last:
            p.data = p.data.to(memory_format=torch.channels_last)
            p.grad = p.grad.to(memory_format=torch.channels_last)
        out.append(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch and engine threads")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    args = ap.parse_args(argv)
    n = args.threads or torch.get_num_threads()
    with threads(n):
        contenders = {}
        for name, make in OPTIMIZERS.items():
            for cl in (False, True):
                opt = make(weights(cl))
                contenders[f"{name}{', channels_last' if cl else ''}"] = opt.step
        t = measure(contenders, torch.device("cpu"), args.rounds)
    base = t["Adam(fused)"]
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    print(f"thermo_ext {te.__version__} | torch {torch.__version__} | ISA "
          f"{te.build_info()['isa']} | threads {n} | {numel / 1e6:.1f} M float32 in "
          f"{len(SHAPES)} conv weights")
    print(f"\n  {'contender':28s} {'median':>9s}  {'/ Adam(fused)':>13s}  "
          f"{'per round, p25-p75':>18s}  {'channels_last / default':>23s}")
    for k, v in t.items():
        lo, hi = v.per_round(base)
        own = ""
        if k.endswith(", channels_last"):
            d = t[k[:-len(", channels_last")]]
            q = v.per_round(d)
            own = f"{v.median / d.median:.2f} ({q[0]:.2f}-{q[1]:.2f})"
        print(f"  {k:28s} {v.median * 1e3:7.2f} ms  {v.median / base.median:13.2f}  "
              f"{lo:8.2f}-{hi:<9.2f}  {own:>23s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
