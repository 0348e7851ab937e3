"""A small transformer encoder learning to sort, trained by a thermo_ext optimizer.

The task: a sequence of 8 tokens (digits 0-9) in, the same tokens sorted out (one
classification per position). The model: token embedding + a learned positional embedding (a
parameter of the top module), a 2-layer ``nn.TransformerEncoder`` (d_model 32, 4 heads), a
linear head.

    python examples/transformer.py                    # AdLaLa with its defaults, 1500 steps
    python examples/transformer.py --method LOL
    python examples/transformer.py --method Adam      # torch.optim.Adam(1e-3), same loop
    python examples/transformer.py --short            # 300 steps, seconds (what CI runs)

What it shows besides the loop: how the layer methods partition a transformer (printed at the
start: the first layer is the token embedding; the positional embedding, owned by the top
module, goes with the rest; ``first=`` chooses otherwise), and two schedules: ``--decay``, a
torch LR scheduler driving the step size h (``lr``) down to 0, and ``--cool``, cooling the
temperature to zero over the run with ``te.TemperatureScheduler``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn

import thermo_ext as te
from thermo_ext.data import generator

METHODS = ("Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped", "Adam")
VOCAB, LENGTH = 10, 8


class Sorter(nn.Module):
    def __init__(self, d_model: int = 32):
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(LENGTH, d_model))
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos))


def batch(n: int, g: torch.Generator):
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return x, x.sort(1).values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="a transformer encoder learning to sort")
    ap.add_argument("--method", default="AdLaLa", choices=METHODS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cool", action="store_true",
                    help="cool tau linearly to 0 over the run (thermo_ext methods)")
    ap.add_argument("--decay", action="store_true",
                    help="decay the step size to 0 over the run (cosine)")
    ap.add_argument("--short", action="store_true", help="300 steps (a smoke run)")
    ap.add_argument("--min-acc", type=float, default=None,
                    help="exit with status 1 if the final per-token test accuracy (%%) is "
                         "below this")
    args = ap.parse_args(argv)
    if args.short:
        args.steps = 300
    torch.set_num_threads(1)
    te.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    warnings.simplefilter("error", te.InstabilityWarning)

    torch.manual_seed(args.seed)
    model = Sorter()
    cooling = None
    if args.method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = getattr(te, args.method)(model)  # the defaults: see docs/GUIDE.md
        for i, g in enumerate(opt.param_groups[:3]):
            print(f"group {i} {g['name']!r}: {len(g['params'])} tensors, scheme {g['scheme']}")
        if len(opt.param_groups) > 3:
            print(f"... {len(opt.param_groups)} groups in all")
        if args.cool:
            cooling = te.TemperatureScheduler(opt, lambda s: max(0.0, 1 - s / args.steps))
    # lr is the step size h: torch's LR schedulers drive it like any learning rate.
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps) if args.decay else None
    train_g = generator(args.seed, "sort-train")
    x_test, y_test = batch(1000, generator(0, "sort-test"))
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch, train_g)
        opt.zero_grad()
        loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
        if cooling is not None:
            cooling.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            with torch.no_grad():
                right = model(x_test).argmax(-1) == y_test
            token = 100.0 * right.float().mean().item()
            seq = 100.0 * right.all(1).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.4f}  test accuracy: per token "
                  f"{token:5.1f} %, whole sequence {seq:5.1f} %")
    print(f"final test accuracy: per token {token:.1f} %, whole sequence {seq:.1f} %")
    if args.min_acc is not None and token < args.min_acc:
        print(f"below --min-acc {args.min_acc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
