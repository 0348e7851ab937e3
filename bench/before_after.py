"""Before and after: one build's step ratios to Adam(fused), for comparing two builds.

Run it alternately with the build under test and an older one (installed into a directory with
``pip install --no-build-isolation --no-deps --target DIR .`` from the older checkout); each
process times Adam(fused) and the contenders side by side in interleaved rounds, one thread,
and prints ratios to Adam(fused) (median/of minimums): the spiral net's AdLaLa and Langevin
steps with their defaults, and langevin (BAOAB) and adl (BADODAB) on 10 M float32 parameters
in 20 tensors.

    for i in 1 2 3; do
        OLD_SITE=/tmp/old_site python bench/before_after.py before
        python bench/before_after.py after
    done
"""
import os, sys
if os.environ.get("OLD_SITE"):  # the older build: bypass the editable install's finder
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, os.environ["OLD_SITE"])
import time, statistics, torch, thermo_ext as te
torch.set_num_threads(1); te.set_num_threads(1)
def spiral_net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2,100), torch.nn.ReLU(), torch.nn.Linear(100,1))
    for p in m.parameters(): p.grad = torch.randn_like(p)*1e-3
    return m
def big(n=10_000_000, k=20):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n//k, generator=g)*0.1) for _ in range(k)]
    for p in ps: p.grad = torch.randn(p.shape, generator=g)*1e-3
    return ps
def bench(contenders, rounds, block):
    res = {k: [] for k in contenders}
    for f in contenders.values():
        for _ in range(max(3, block//4)): f()
    for r in range(rounds):
        names = list(contenders); names = names[r % len(names):] + names[:r % len(names)]
        for k in names:
            f = contenders[k]; t = time.perf_counter()
            for _ in range(block): f()
            res[k].append((time.perf_counter() - t) / block)
    return {k: (statistics.median(v), min(v)) for k, v in res.items()}
out = {}
c = {"Adam": torch.optim.Adam(spiral_net().parameters(), lr=1e-3, fused=True).step,
     "AdLaLa": te.AdLaLa(spiral_net(), seed=1).step,
     "Langevin": te.Langevin(spiral_net(), seed=1).step}
r = bench(c, 15, 400)
for k in ("AdLaLa", "Langevin"):
    out[f"spiral {k}"] = (r[k][0] / r["Adam"][0], r[k][1] / r["Adam"][1])
c = {"Adam": torch.optim.Adam(big(), lr=1e-3, fused=True).step,
     "langevin": te.Thermo(big(), scheme="BAOAB", lr=0.1, gamma=1.0, tau=1e-4, seed=1).step,
     "adl": te.Thermo(big(), scheme="BADODAB", lr=0.1, tau=1e-4, seed=1).step}
r = bench(c, 5, 3)
for k in ("langevin", "adl"):
    out[f"10M {k}"] = (r[k][0] / r["Adam"][0], r[k][1] / r["Adam"][1])
print(sys.argv[1] if len(sys.argv) > 1 else "this build", " ".join(f"{k}={a:.3f}/{b:.3f}" for k, (a, b) in out.items()), flush=True)
