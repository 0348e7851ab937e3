"""Whole training steps (forward, backward and optimizer step) side by side: what the optimizer's
cost is once the model's own work is counted.

Two models on random data of fixed shape: a small CNN (three conv + batch-norm layers, 95 k
parameters, 32x32 RGB inputs, 10 classes) and an MLP with 8.4 M parameters (1024-2048-2048-1024-10),
each at a small and a large batch. Every contender trains its own copy of the model on the same
batch; contenders are timed in interleaved rounds in this one process, and the table prints the
ratio of each one's median (and minimum) step time to Adam(fused)'s.

    python bench/train_step.py                  # torch's and the engine's default threads
    OMP_NUM_THREADS=1 python bench/train_step.py --threads 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import thermo_ext as te
from thermo_ext.benchmark import measure


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.c3, self.b3 = nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(F.relu(self.b3(self.c3(x))).mean((2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10))


OPTIMIZERS = {
    "Adam(fused)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "SGD(momentum)": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Langevin": lambda m: te.Langevin(m.parameters()),
    "LaLa": lambda m: te.LaLa(m),
    "AdLaLa": lambda m: te.AdLaLa(m),
    "AdL": lambda m: te.AdL(m.parameters()),
}


def train_steps(model_fn, x: torch.Tensor, y: torch.Tensor, rounds: int):
    def contender(make):
        torch.manual_seed(0)
        model = model_fn()
        opt = make(model)

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    return measure({k: contender(make) for k, make in OPTIMIZERS.items()},
                   torch.device("cpu"), rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and engine threads (default: as configured)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        te.set_num_threads(args.threads)
    print(f"thermo_ext {te.__version__} | torch {torch.__version__} | ISA "
          f"{te.build_info()['isa']} | torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    cases = [("small CNN, batch 64", SmallCNN, 64, (3, 32, 32)),
             ("small CNN, batch 256", SmallCNN, 256, (3, 32, 32)),
             ("MLP 8.4 M, batch 32", mlp, 32, (1024,)),
             ("MLP 8.4 M, batch 256", mlp, 256, (1024,))]
    names = list(OPTIMIZERS)
    print("\nWhole training step (forward + backward + step), median / Adam(fused) "
          "(of minimums in brackets)")
    print(f"  {'case':24s}{'Adam(fused)':>14s}" + "".join(f"{n:>16s}" for n in names[1:]))
    for label, model_fn, batch, shape in cases:
        x = torch.randn((batch,) + shape, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        t = train_steps(model_fn, x, y, args.rounds)
        base = t["Adam(fused)"]
        cells = "".join(f"{t[n].median / base.median:>9.2f} ({t[n].min / base.min:.2f})"
                        for n in names[1:])
        print(f"  {label:24s}{base.median * 1e3:>11.1f} ms{cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
