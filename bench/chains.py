"""K chains of AdLaLa on the spiral net in one fused loop, against K separate runs.

Both sides train the paper's 2-100-1 net on the two-spiral data with the same batches, side by
side in this process; the table prints the per-chain speed-up of the stacked loop (never bare
times), then trains the stacked chains longer and reports each chain's and the ensemble's test
accuracy.

    python bench/chains.py                     # K = 16
    python bench/chains.py --chains 8 --epochs 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import thermo_ext as te
from thermo_ext.data import two_spirals


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 1))


def batches(n: int, epoch: int, batch: int = 25):
    g = torch.Generator().manual_seed(epoch)
    return torch.randperm(n, generator=g).split(batch)


def epoch_chains(chains, opt, x, y, epoch, loss_fn):
    for idx in batches(len(x), epoch):
        opt.zero_grad()
        out = chains(x[idx])                                           # [K, b, 1]
        loss_fn(out, y[idx].expand_as(out)).mean(dim=(1, 2)).sum().backward()  # independent
        opt.step()


def epoch_separate(models, opts, x, y, epoch, loss_fn):
    for model, opt in zip(models, opts):
        for idx in batches(len(x), epoch):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).mean().backward()
            opt.step()


def accuracy(logits, y) -> float:
    return ((logits > 0).float() == y).float().mean().item()


def _spread(times, epochs: int) -> str:
    per = [t / epochs for t in times]
    return f"{statistics.median(per) * 1e3:.0f} ms [{min(per) * 1e3:.0f}, {max(per) * 1e3:.0f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chains", type=int, default=16, help="K (default 16)")
    ap.add_argument("--timing-epochs", type=int, default=3, help="epochs per timing round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--epochs", type=int, default=400,
                    help="training epochs of the stacked chains for the accuracy table")
    args = ap.parse_args(argv)
    for name in ("chains", "timing_epochs", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if args.epochs < 0:
        ap.error("--epochs: expected an integer >= 0")
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    K = args.chains
    (x, y), (x_test, y_test) = two_spirals(seed=0)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    chains = te.Chains(make_net, K, init_seed=0)
    opt = te.AdLaLa(chains, seed=1)
    models = [chains.chain(k) for k in range(K)]
    opts = [te.AdLaLa(m, seed=te.random.chain_seed(1, k)) for k, m in enumerate(models)]
    t_chains, t_sep = [], []
    # One untimed epoch on both sides first: the first steps allocate the optimizers' state and
    # vmap's first call traces, which would otherwise land in the first timing round.
    epoch_chains(chains, opt, x, y, 0, loss_fn)
    epoch_separate(models, opts, x, y, 0, loss_fn)
    epoch = 1
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.timing_epochs):
            epoch_chains(chains, opt, x, y, epoch, loss_fn)
            epoch += 1
        t_chains.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e in range(epoch - args.timing_epochs, epoch):
            epoch_separate(models, opts, x, y, e, loss_fn)
        t_sep.append(time.perf_counter() - t0)
    ratio = statistics.median(t_sep) / statistics.median(t_chains)
    info = te.build_info()
    print(f"thermo_ext {info['version']} | torch {torch.__version__} | ISA {info['isa']} | "
          f"torch threads 1")
    print(f"\nAdLaLa on the spiral net (2-100-1, batch 25, 500 points), K = {K} chains")
    print(f"  per-chain speed-up of one stacked loop over {K} separate runs: {ratio:6.2f} x")
    n = args.timing_epochs
    print(f"  (per epoch, median [min, max] over {args.rounds} rounds: stacked "
          f"{_spread(t_chains, n)}, separate {_spread(t_sep, n)})")
    # The two sides saw the same batches from the same starting point: chain 0 and model 0
    # should agree up to the rounding of batched against unbatched matmuls.
    drift = max((chains.stacked_parameters()[n][0] - p.detach()).abs().max().item()
                for n, p in models[0].named_parameters())
    print(f"  max |chain 0 - separate run 0| after {epoch} epochs: {drift:.2e}")
    for e in range(args.epochs):
        epoch_chains(chains, opt, x, y, epoch + e, loss_fn)
    with torch.no_grad():
        out = chains(x_test)                                           # [K, n, 1]
        single = [accuracy(out[k], y_test) for k in range(K)]
        ens = accuracy(torch.sigmoid(out).mean(0) - 0.5, y_test)
    print(f"\nTest accuracy after {epoch + args.epochs} epochs")
    print(f"  chains: mean {statistics.mean(single):.3f}, min {min(single):.3f}, "
          f"max {max(single):.3f}")
    print(f"  ensemble average of the {K} chains' probabilities: {ens:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
