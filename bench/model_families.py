"""Named methods against Adam(lr=1e-3) on common model families, the same number of steps each.

Families (all single-threaded, seconds to a minute per run on one core):

* ``mlp``: 64-128-128-10 ReLU MLP on scikit-learn's 8x8 digits, batch 32, 10 epochs.
* ``cnn``: Conv(1->16)+Conv(16->32)+maxpool+Linear on the digits as 1x8x8 images, batch 32,
  15 epochs.
* ``gru``: a GRU (hidden 64) reading a digit row by row (8 steps of 8 pixels), batch 32,
  15 epochs.
* ``transformer``: a 2-layer TransformerEncoder (d_model 32, 4 heads, feed-forward 64, a learned
  positional embedding owned by the top module) sorting length-8 sequences of 10 tokens; fresh
  batches of 64, 1500 steps; accuracy = whole sequence right.

Test accuracy (%) is printed per method x family, one column per seed and the mean.

    python bench/model_families.py                          # the table: defaults and Adam
    python bench/model_families.py --preset paper           # the paper's spiral setting
    python bench/model_families.py --methods LOL --families cnn --seeds 1 \
        --grid LOL.lr=0.2,0.3 --grid LOL.gamma=1,3          # a coarse sweep (cartesian)
    python bench/model_families.py --signals                # instability signals per group

``--signals`` records what the instability monitor (thermo_ext.stability) looks at, every
``--every`` steps, and prints per group the largest value of each over the run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import thermo_ext as te
from thermo_ext.data import digits, generator
from thermo_ext.stability import StabilityMonitor

# The CNN and the transformer are the examples' (examples/cnn.py, examples/transformer.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from cnn import CNN  # noqa: E402
from transformer import Sorter  # noqa: E402

METHODS = ("Adam", "Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped")


# ============================================================================ families
class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        _, h = self.gru(x.view(-1, 8, 8))
        return self.fc(h[-1])


class Family:
    """A model, its data and its training length."""

    def __init__(self, name: str, make: Callable[[], nn.Module], steps: int, batch: int,
                 describe: str, sort: bool = False):
        self.name, self.make, self.steps, self.batch = name, make, steps, batch
        self.describe, self.sort = describe, sort

    def batches(self, seed: int):
        """``steps`` training batches (x, y)."""
        if self.sort:
            g = generator(seed, "sort-train")
            for _ in range(self.steps):
                x = torch.randint(0, 10, (self.batch, 8), generator=g)
                yield x, x.sort(1).values
            return
        (x, y), _ = digits(seed=0)
        g = generator(seed, "shuffle")
        done = 0
        while True:
            for idx in torch.randperm(len(x), generator=g).split(self.batch):
                if done == self.steps:
                    return
                done += 1
                yield x[idx], y[idx]

    def loss(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def accuracy(self, model) -> float:
        if self.sort:
            x = torch.randint(0, 10, (1000, 8), generator=generator(0, "sort-test"))
            right = (model(x).argmax(-1) == x.sort(1).values).all(1)
        else:
            _, (x, y) = digits(seed=0)
            right = model(x).argmax(-1) == y
        return 100.0 * right.float().mean().item()


def _digit_steps(epochs: int, batch: int = 32) -> int:
    n_train = 1347  # digits(seed=0): 1797 images, a quarter of each class held out
    return epochs * math.ceil(n_train / batch)


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("mlp", lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128),
                                        nn.ReLU(), nn.Linear(128, 10)),
           _digit_steps(10), 32, "64-128-128-10 MLP, digits, batch 32, 10 epochs"),
    Family("cnn", CNN, _digit_steps(15), 32, "Conv16+Conv32+pool+Linear, digits, batch 32, "
                                             "15 epochs"),
    Family("gru", GRUNet, _digit_steps(15), 32, "GRU(8->64) over rows + Linear, digits, batch 32, "
                                                "15 epochs"),
    Family("transformer", Sorter, 1500, 64, "2-layer TransformerEncoder d_model 32, sort length 8, "
                                            "batch 64, 1500 steps, whole-sequence accuracy",
           sort=True),
)}


# ============================================================================ runs
def build(method: str, model: nn.Module, hyper: Dict[str, Any], seed: int, preset: Optional[str]):
    if method == "Adam":
        return torch.optim.Adam(model.parameters(), **{"lr": 1e-3, **hyper})
    kw = dict(hyper)
    if preset is not None:
        kw["preset"] = preset
    return getattr(te, method)(model, seed=seed, **kw)


class Signals:
    """What the instability monitor measures (thermo_ext.stability), every ``every`` steps per
    group: RMS(theta) and the kinetic temperature sum(p^2)/N; keeps the series and the maxima of
    RMS(theta)/RMS(theta at the first check), kinetic temperature / tau and the growth of
    RMS(theta) within the monitor's window."""

    def __init__(self, every: int):
        self.every = every
        self.trace: list = []

    def __enter__(self):
        from thermo_ext.stability import StabilityMonitor

        self._saved = StabilityMonitor.every, StabilityMonitor.trace
        StabilityMonitor.every, StabilityMonitor.trace = self.every, self.trace
        return self

    def __exit__(self, *exc):
        from thermo_ext.stability import StabilityMonitor

        StabilityMonitor.every, StabilityMonitor.trace = self._saved

    @property
    def series(self) -> List[List[Dict[str, float]]]:
        """Per group: the monitor's trace entries (step, rms, kinetic, tau, lr, scale, low)."""
        out: List[List[Dict[str, float]]] = []
        for row in self.trace:
            while len(out) <= row["group"]:
                out.append([])
            out[row["group"]].append({k: v for k, v in row.items() if k != "opt"})
        return out

    def maxima(self) -> List[Dict[str, float]]:
        return [closest_approach(series) for series in self.series]


def closest_approach(series, growth: Optional[float] = None, rate: Optional[float] = None
                     ) -> Dict[str, Any]:
    """How near a group came to the monitor's rule: the largest RMS/scale, the largest growth
    within the window, the largest RMS/scale at checks where the growth reached ``rate``, the
    largest growth at checks where RMS/scale reached ``growth``, and kinetic temperature/tau."""
    from thermo_ext.stability import StabilityMonitor

    growth = StabilityMonitor.growth if growth is None else growth
    rate = StabilityMonitor.rate if rate is None else rate
    m: Dict[str, Any] = dict(theta=0.0, rate=0.0, theta_at_rate=0.0, rate_at_theta=0.0, kt=0.0)
    for row in series:
        if row["warned"]:
            break
        g = row["rms"] / row["scale"] if row["scale"] > 0 else math.inf
        r = row["rms"] / row["low"] if row["low"] > 0 else math.inf
        kt = row["kinetic"] / row["tau"] if row["tau"] > 0 else math.inf
        for key, v, cond in (("theta", g, True), ("rate", r, True), ("kt", kt, True),
                             ("theta_at_rate", g, r >= rate), ("rate_at_theta", r, g >= growth)):
            if cond and v > m[key]:
                m[key], m[key + "_at"] = v, row["step"]
    return m


def run(family: Family, method: str, seed: int, hyper: Dict[str, Any], preset: Optional[str],
        signals_every: int = 0, check_stability: Optional[bool] = None) -> Dict[str, Any]:
    torch.manual_seed(seed)
    model = family.make()
    if check_stability is not None and method != "Adam":
        hyper = {**hyper, "check_stability": check_stability}
    sig = Signals(signals_every) if signals_every and method != "Adam" else None
    t0 = time.perf_counter()
    loss = float("nan")
    warned: List[str] = []
    with warnings.catch_warnings(record=True) as caught, (sig or contextlib.nullcontext()):
        warnings.simplefilter("always")
        opt = build(method, model, hyper, seed, preset)
        for x, y in family.batches(seed):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = family.loss(out, y)
            loss.backward()
            try:
                opt.step()
            except FloatingPointError as e:
                warned.append(f"FloatingPointError: {e}")
                break
    stability_warning = getattr(te, "InstabilityWarning", None)
    for w in caught:
        if stability_warning is not None and issubclass(w.category, stability_warning):
            warned.append(str(w.message))
    acc = family.accuracy(model) if all(torch.isfinite(p).all() for p in model.parameters()) \
        else float("nan")
    return dict(family=family.name, method=method, seed=seed, acc=acc, loss=loss.item()
                if torch.is_tensor(loss) else loss, time=time.perf_counter() - t0,
                warnings=warned, signals=None if sig is None else sig.maxima(),
                series=None if sig is None else sig.series, hyper=hyper,
                taus=None if method == "Adam" else [g["tau"] for g in opt.param_groups],
                groups=None if method == "Adam" else
                [g.get("name", str(i)) for i, g in enumerate(opt.param_groups)])


# ============================================================================ main
def _value(text: str):
    if text in ("inf", "math.inf"):
        return math.inf
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_sets(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = _value(value)
    return out


def _parse_grid(items: Sequence[str]) -> Dict[str, Dict[str, List[Any]]]:
    out: Dict[str, Dict[str, List[Any]]] = {}
    for item in items:
        key, _, values = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = [_value(v) for v in values.split(",")]
    return out


def _fmt(acc: float) -> str:
    return "  nan" if math.isnan(acc) else f"{acc:5.1f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--preset", default=None, help="named methods' preset, e.g. paper")
    ap.add_argument("--set", action="append", default=[], metavar="Method.key=value")
    ap.add_argument("--grid", action="append", default=[], metavar="Method.key=v1,v2,...")
    ap.add_argument("--signals", action="store_true", help="record instability signals")
    ap.add_argument("--every", type=int, default=8, help="steps between signal checks")
    ap.add_argument("--dump", default=None, help="write every run (with --signals: the "
                    "signal series) to this JSON file")
    ap.add_argument("--no-check-stability", action="store_true")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every family's step count (quick looks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    te.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    families = [FAMILIES[f] for f in args.families.split(",")]
    for f in families:
        f.steps = max(1, int(f.steps * args.steps_scale))
    methods = args.methods.split(",")
    sets = _parse_sets(args.set)
    grid = _parse_grid(args.grid)
    seeds = list(range(args.seeds))
    print(f"# torch {torch.__version__}, thermo_ext {te.__version__}, 1 thread, "
          f"preset={args.preset}")
    for f in families:
        print(f"# {f.name}: {f.describe} ({f.steps} steps)")
    rows, runs = [], []
    for method in methods:
        base = sets.get(method, {})
        axes = grid.get(method, {})
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)) if keys else [()]:
            hyper = {**base, **dict(zip(keys, combo))}
            label = method + ("" if not hyper else " " + ",".join(f"{k}={v}" for k, v in
                                                                    hyper.items()))
            for f in families:
                res = [run(f, method, s, hyper, args.preset, args.every if args.signals else 0,
                           False if args.no_check_stability else None) for s in seeds]
                accs = [r["acc"] for r in res]
                mean = sum(accs) / len(accs)
                note = "; ".join(w.split("\n")[0][:110] for r in res for w in r["warnings"])
                print(f"{label:44s} {f.name:12s} " + " ".join(_fmt(a) for a in accs)
                      + f"  mean {_fmt(mean)}  ({sum(r['time'] for r in res) / len(res):.1f} s/run)"
                      + (f"  WARN {note}" if note else ""), flush=True)
                if args.signals:
                    for r in res:
                        for gi, m in enumerate(r["signals"] or []):
                            print(f"    seed {r['seed']} group {gi} {r['groups'][gi]!s:28s} "
                                  f"RMS/scale {m['theta']:6.2f}  growth {m['rate']:5.2f}  "
                                  f"RMS/scale at growth>={StabilityMonitor.rate:g}: "
                                  f"{m['theta_at_rate']:5.2f}  growth at RMS/scale>="
                                  f"{StabilityMonitor.growth:g}: {m['rate_at_theta']:5.2f}  "
                                  f"kT/tau {m['kt']:9.1f}", flush=True)
                rows.append((label, f.name, accs, mean))
                runs.extend(res)
    if args.dump:
        with open(args.dump, "w") as fh:
            json.dump(dict(preset=args.preset, runs=runs), fh)
    if len(families) > 1 or len(rows) > 1:
        print()
        print("| method | " + " | ".join(f.name for f in families) + " |")
        print("|---|" + "---|" * len(families))
        labels = list(dict.fromkeys(r[0] for r in rows))
        for label in labels:
            cells = []
            for f in families:
                r = next(r for r in rows if r[0] == label and r[1] == f.name)
                cells.append(" / ".join(_fmt(a).strip() for a in r[2]))
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
