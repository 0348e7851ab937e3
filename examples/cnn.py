"""A small CNN on scikit-learn's 8x8 handwritten digits, trained by a thermo_ext optimizer.

    python examples/cnn.py                        # AdLaLa with its defaults, 15 epochs
    python examples/cnn.py --method LOL --epochs 30
    python examples/cnn.py --method Adam          # the same loop with torch.optim.Adam(1e-3)
    python examples/cnn.py --short                # 5 epochs, seconds (what CI runs)

What it shows: a thermo_ext optimizer drops into an ordinary PyTorch loop (zero_grad, backward,
step); the layer methods take the model itself and partition it by layer (printed at the
start); the step size h is the optimizer's ``lr``, so a torch LR scheduler (here a cosine decay,
``--constant`` to turn it off) drives it; ``te.InstabilityWarning`` reports a run that is
blowing up while still finite (made an error here, so a bad setting stops the script instead of
training to chance accuracy: try ``--method Langevin --paper``).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
from torch import nn

import thermo_ext as te
from thermo_ext.data import digits, generator

METHODS = ("Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped", "Adam")


class CNN(nn.Module):
    """Conv(1->c1) + Conv(c1->c2) + maxpool + Linear on 8x8 images (the model-family benchmark
    and the tests use it too)."""

    def __init__(self, widths=(16, 32)):
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CNN on the 8x8 digits with a thermo_ext optimizer")
    ap.add_argument("--method", default="AdLaLa", choices=METHODS)
    ap.add_argument("--paper", action="store_true",
                    help="the paper's spiral setting (preset='paper'): too large a step here")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--constant", action="store_true",
                    help="keep the step size constant (default: cosine decay to 0 over the run)")
    ap.add_argument("--short", action="store_true", help="5 epochs (a smoke run)")
    ap.add_argument("--min-acc", type=float, default=None,
                    help="exit with status 1 if the final test accuracy (%%) is below this")
    args = ap.parse_args(argv)
    if args.short:
        args.epochs = 5
    torch.set_num_threads(1)
    te.set_num_threads(1)
    warnings.simplefilter("error", te.InstabilityWarning)

    (x, y), (x_test, y_test) = digits(seed=0)
    torch.manual_seed(args.seed)
    model = CNN()
    if args.method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        # The defaults (docs/GUIDE.md), or the paper's spiral setting with --paper.
        opt = getattr(te, args.method)(model, preset="paper" if args.paper else None)
        for i, g in enumerate(opt.param_groups):
            print(f"group {i} {g['name']!r}: {len(g['params'])} tensors, scheme {g['scheme']}, "
                  f"h={g['lr']:g} gamma={g['gamma']:g} tau={g['tau']:g}")
    shuffle = generator(args.seed, "shuffle")
    # lr is the step size h, so torch's LR schedulers drive it: decaying it over the run ends
    # on a quiet iterate (at a constant large step the accuracy jumps by a few points from
    # epoch to epoch early on, as SGD's does).
    steps = args.epochs * math.ceil(len(x) / args.batch)
    decay = None if args.constant else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            total = 0.0
            for idx in torch.randperm(len(x), generator=shuffle).split(args.batch):
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                if decay is not None:
                    decay.step()
                total += loss.item() * len(idx)
            with torch.no_grad():
                acc = 100.0 * (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch:3d}  train loss {total / len(x):.4f}  test accuracy {acc:5.1f} %")
    except te.InstabilityWarning as w:
        print(f"stopped: {w}", file=sys.stderr)
        return 2
    print(f"final test accuracy: {acc:.1f} %")
    if args.min_acc is not None and acc < args.min_acc:
        print(f"below --min-acc {args.min_acc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
