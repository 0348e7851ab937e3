"""The torch-op fallback's cost against the fused engine, measured on the CPU as a proxy.

Where no fused CUDA engine can run, CUDA tensors step with thermo_ext.fallback: the reference's
letters with torch-op noise (thermo_ext.torch_noise). No GPU here, so this compares the two on
the CPU, where both run: the same optimizer, the same tensors, the fallback forced in
(thermo_ext.optim.choose_backend), rounds interleaved; the table gives each step's median time
and the median of the per-round ratios (fallback / engine) with their quartiles. On a GPU the
ratio differs (launches instead of loops: the fused engine's few kernels against the fallback's
hundreds of small ones), so treat it as an order of magnitude.

    python bench/fallback.py                 # the sizes below, one and two threads
    python bench/fallback.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import thermo_ext as te
from thermo_ext import fallback, optim

SIZES = {  # name -> tensor sizes
    "spiral net 2-100-1 (401 params)": [200, 100, 100, 1],
    "MLP 0.5 M params, 6 tensors": [256 * 512, 512, 512 * 512, 512, 512 * 256, 256],
    "4 M params, 8 tensors": [500_000] * 8,
}
METHODS = {"Langevin": te.Langevin, "AdL": te.AdL}


def make(method, sizes, forced: bool):
    params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(i)))
              for i, n in enumerate(sizes)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = METHODS[method](params, seed=1)

    def step():
        if forced:
            saved = optim.choose_backend
            optim.choose_backend = lambda requested, calls, on_device: fallback.FALLBACK
            try:
                opt.step()
            finally:
                optim.choose_backend = saved
        else:
            opt.step()
    return step


def timed(step, reps):
    t = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args(argv)
    print("| threads | tensors | method | engine step | fallback step | fallback / engine "
          "(median, quartiles) |")
    print("|---|---|---|---|---|---|")
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        te.set_num_threads(threads)
        for name, sizes in SIZES.items():
            for method in METHODS:
                eng, fb = make(method, sizes, False), make(method, sizes, True)
                for s in (eng, fb):  # warm up (first steps build state and plans)
                    s()
                    s()
                probe = timed(fb, 1)
                reps = max(1, min(200, int(0.3 / max(probe, 1e-6))))
                te_reps = reps * 4
                ratios, te_t, fb_t = [], [], []
                for _ in range(a.rounds):
                    e = timed(eng, te_reps)
                    f = timed(fb, reps)
                    te_t.append(e)
                    fb_t.append(f)
                    ratios.append(f / e)
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                print(f"| {threads} | {name} | {method} | {statistics.median(te_t) * 1e3:.3f} ms "
                      f"| {statistics.median(fb_t) * 1e3:.2f} ms | {statistics.median(ratios):.1f}"
                      f" ({q[0]:.1f}-{q[2]:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
