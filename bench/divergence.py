"""Divergence signals (issue #22, item 4): which rule on what the optimizer sees flags the runs
whose loss climbs, and raises no false alarm on the healthy ones.

The runs and their per-group signal series come from the model-family benchmark's dumps:

    python bench/model_families.py --families mlp,cnn,gru,transformer,gpt2,resnet_own,\\
        mnist1d_mlp,mnist1d_cnn,resnet_own_zero,frozen_head_own --seeds 3 --signals \\
        --every 0 --quiet-groups --dump main.json       # torch 2.13.0 venv
    .venv-tv/bin/python bench/model_families.py --families resnet18_tv,resnet18_timm,\\
        frozen_head --seeds 3 --signals --every 2 --quiet-groups --dump tv.json
    python bench/divergence.py main.json tv.json --cadence 2 --cadence 16   # a later dump's
                                                        # run replaces an earlier one's
    python bench/divergence.py --cost                   # what each signal costs a step

Labels (from the loss, which the rules never see; named methods only, the baselines give the
reference): **failing** when the final train loss (mean of the last 10 % of steps) is above
ln(classes) (worse than a uniform guess) or above the loss of the first 3 steps, or when the
loss climbed on the way: a 5-step mean of the batch loss reached 1.5 ln(classes) (3.45 for 10
classes; the torchvision ResNet-18's spike, which the run may recover from later);
**healthy** when not failing and the test accuracy is within 5 points of AdamW(1e-3)'s mean on
the family (or above it); **slow** otherwise (trains, but behind AdamW: an alarm there is
reported, not counted as false).

Signals per group g at a check (step t; sums over the group's N elements; p the momentum after
the step, Δθ the step's change of θ, h the step size):

* ``grad``: RMS(∇L) / RMS(∇L) at the group's first check (gradient growth);
* ``grad_low``: RMS(∇L) / its smallest value at the earlier checks of the last 128 steps;
* ``kin_low``: Σp²/N / its smallest value at the earlier checks of the last 128 steps;
* ``upd``: RMS(Δθ) / max(RMS(θ), RMS of the model's θ at the first check), the relative step
  (exact: θ before and after the step; the floor as the monitor's scale, so that a
  zero-initialised group does not read every step as huge);
* ``upd_p``: h·RMS(p) / the same, the relative step from the momentum alone (no copy of θ;
  Overdamped: h·RMS(∇L));
* ``uphill``: cos(∇L, Δθ) of the step the gradient drove, averaged over the last 3 checks (a
  control: the kick makes it about −1 whatever happens);
* ``overshoot``: cos(∇L_t, Δθ_(t−1)), the new gradient against the previous step, averaged over
  the last 3 checks (> 0: that step went past the valley along its direction);
* ``mom_uphill``: cos(∇L_t, p_(t−1)), the new gradient against the momentum before its kick
  (what a fused B kick could sum for free), averaged over the last 3 checks;
* ``theta``: RMS(θ) / RMS(θ at the first check) (what the weight-growth rule looks at).

Each signal is also computed for the model as one group (scope "model": every sum pooled over
the param groups; h·RMS(p) weighted per group). A rule "signal ≥ T" (or two such conditions at
the same check) fires for a run at the first check after the reference check where a group (or
the pooled model) meets it; the monitor's own rule (``weights``) is its recorded
InstabilityWarning. For each rule the table gives the setting with no false alarm that flags
the most failing runs (and, if it misses some, the setting with the best flagged − 3 × false
alarms): failing runs flagged (first step, and how many at or before the loss's onset), healthy
runs flagged (false alarms), slow runs flagged, and for single signals the largest peak among
the healthy runs and the smallest among the failing ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BASELINES = ("AdamW", "Adam", "SGD")
WINDOW = 128  # steps, as the monitor's window


# ============================================================================ labels
def classes_of(family: str) -> int:
    try:
        from model_families import FAMILIES
        return FAMILIES[family].classes
    except Exception:  # an environment without the bench's imports: all are 10 but gpt2's 16
        return 16 if family == "gpt2" else 10


def label_runs(runs: List[Dict[str, Any]], margin: float = 5.0, climb: float = 1.5) -> None:
    """Adds ``label`` (failing / healthy / slow / baseline / error), ``onset`` (the first step
    whose 5-step mean loss reaches ``climb`` x ln(classes), None if none) and ``peak5`` (the
    largest 5-step mean loss) to each run."""
    ref: Dict[str, List[float]] = defaultdict(list)
    for r in runs:
        if r["method"] == "AdamW" and not r.get("error"):
            ref[r["family"]].append(r["acc"])
    for r in runs:
        chance = math.log(classes_of(r["family"]))
        losses = r.get("losses") or []
        r["onset"], r["peak5"] = None, float("nan")
        means = [sum(losses[i - 4: i + 1]) / 5 for i in range(4, len(losses))]
        if means:
            r["peak5"] = max(means)
            r["onset"] = next((i + 5 for i, m in enumerate(means) if not m < climb * chance),
                              None)
        if r.get("error"):
            r["label"] = "error"
        elif r["method"] in BASELINES:
            r["label"] = "baseline"
        elif (not math.isfinite(r["loss"]) or r["loss"] > chance or r["loss"] > r["loss_first"]
              or r["onset"] is not None):
            r["label"] = "failing"
        elif ref[r["family"]] and r["acc"] >= statistics.fmean(ref[r["family"]]) - margin:
            r["label"] = "healthy"
        else:
            r["label"] = "slow"


# ============================================================================ signals
def group_series(run: Dict[str, Any], cadence: int = 0) -> Dict[int, List[Dict[str, float]]]:
    """Per group: the probes with the derived signals, checks at multiples of ``cadence``
    (and step 1) only when it is given."""
    out: Dict[int, List[Dict[str, float]]] = defaultdict(list)
    for row in run.get("probes") or []:
        if cadence and row["step"] != 1 and row["step"] % cadence:
            continue
        out[row["group"]].append(dict(row))
    # The model as one group (key -1): every sum pooled over the groups; the step's h per group
    # weighs its momentum (hp2 = Σ h²p², Overdamped: Σ h²g²).
    pooled: Dict[int, Dict[str, Any]] = {}
    for rows in list(out.values()):
        for row in rows:
            h2 = (row["lr"] or 0.0) ** 2
            hp2 = h2 * (row["p2"] if row["p2"] > 0 and "overdamped" not in row["scheme"]
                        else row["g2"])
            row["hp2"] = hp2
            m = pooled.setdefault(row["step"], dict(step=row["step"], loss=row["loss"],
                                                    scheme="model", lr=1.0))
            for k in ("n", "theta2", "p2", "g2", "gp", "d2", "gd", "gdp", "dp2", "gpp", "pp2",
                      "hp2"):
                m[k] = m.get(k, 0.0) + row.get(k, float("nan"))
    if pooled:
        out[-1] = [pooled[k] for k in sorted(pooled)]
    # The floor of the relative step's denominator, as the monitor's scale: RMS(θ) of the whole
    # model at the first check (a zero-initialised group, e.g. timm's last BN weights, would
    # otherwise show any step as huge).
    floor = math.sqrt(out[-1][0]["theta2"] / max(out[-1][0]["n"], 1)) if pooled else 0.0
    for gi, rows in out.items():
        first_g = first_t = None
        for i, row in enumerate(rows):
            n = max(row["n"], 1)
            rms_t = math.sqrt(row["theta2"] / n)
            rms_g = math.sqrt(row["g2"] / n)
            kin = row["p2"] / n
            first_g = rms_g if first_g is None else first_g
            first_t = rms_t if first_t is None else first_t
            early = [r for r in rows[:i] if r["step"] >= row["step"] - WINDOW]
            low_g = min((r["_g"] for r in early), default=rms_g)
            low_k = min((r["_k"] for r in early), default=kin)
            step_p = math.sqrt(row["hp2"] / n)
            cos = row["gd"] / math.sqrt(row["g2"] * row["d2"]) if row["g2"] > 0 and \
                row["d2"] > 0 else 0.0
            gdp, dp2, gpp, pp2 = (row.get(k, float("nan")) for k in ("gdp", "dp2", "gpp", "pp2"))
            over = gdp / math.sqrt(row["g2"] * dp2) if row["g2"] > 0 and dp2 > 0 else \
                float("nan")
            mom = gpp / math.sqrt(row["g2"] * pp2) if row["g2"] > 0 and pp2 > 0 else float("nan")
            row.update(_g=rms_g, _k=kin, _cos=cos, _over=over, _mom=mom)
            recent = [r["_cos"] for r in rows[max(0, i - 2): i + 1]]

            def avg(key):
                vals = [r[key] for r in rows[max(0, i - 2): i + 1] if math.isfinite(r[key])]
                return sum(vals) / len(vals) if vals else -1.0
            row["sig"] = dict(
                grad=rms_g / first_g if first_g > 0 else 0.0,
                grad_low=rms_g / low_g if low_g > 0 else 0.0,
                kin_low=kin / low_k if low_k > 0 else 0.0,
                upd=math.sqrt(row["d2"] / n) / max(rms_t, floor) if rms_t > 0 else 0.0,
                upd_p=step_p / max(rms_t, floor) if rms_t > 0 else 0.0,
                uphill=sum(recent) / len(recent),
                overshoot=avg("_over"),
                mom_uphill=avg("_mom"),
                theta=rms_t / first_t if first_t > 0 else 0.0,
            )
    return out


SIGNALS = ("grad", "grad_low", "kin_low", "upd", "upd_p", "uphill", "overshoot", "mom_uphill",
           "theta")
#: The thresholds tried per signal.
GRIDS: Dict[str, List[float]] = {
    "grad": [1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100],
    "grad_low": [1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100],
    "kin_low": [2, 3, 5, 10, 20, 50, 100, 300, 1000],
    "upd": [0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5],
    "upd_p": [0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5],
    "uphill": [0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
    "overshoot": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "mom_uphill": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "theta": [1.5, 2, 3, 5, 10],
}


def _scope(series, scope: str):
    return [(gi, rows) for gi, rows in series.items() if (gi == -1) == (scope == "model")]


Cond = Tuple[str, float]  # (signal, threshold): signal >= threshold


def first_flag(series: Dict[int, List[Dict[str, float]]], conds: Sequence[Cond],
               scope: str = "group", skip_first: bool = True) -> Optional[Tuple[int, int]]:
    """(step, group) of the first check where a group meets every condition (scope "group":
    any param group; "model": the pooled model, group -1); the first check is the reference
    and never fires."""
    best: Optional[Tuple[int, int]] = None
    for gi, rows in _scope(series, scope):
        for row in rows[1:] if skip_first else rows:
            if all(row["sig"][k] >= t for k, t in conds):
                if best is None or row["step"] < best[0]:
                    best = (row["step"], gi)
                break
    return best


def peak(series: Dict[int, List[Dict[str, float]]], signal: str, scope: str = "group",
         skip_first: bool = True) -> float:
    vals = [row["sig"][signal] for _, rows in _scope(series, scope)
            for row in (rows[1:] if skip_first else rows)]
    return max(vals, default=0.0)


def rules() -> List[Tuple[str, str, List[List[Cond]]]]:
    """(name, scope, threshold grid: each entry a list of conditions)."""
    out: List[Tuple[str, str, List[List[Cond]]]] = []
    for scope in ("group", "model"):
        for signal in SIGNALS:
            out.append((f"{signal} ≥ T", scope, [[(signal, t)] for t in GRIDS[signal]]))
        out.append(("upd_p ≥ A and overshoot ≥ B", scope,
                    [[("upd_p", a), ("overshoot", b)] for a in (0.003, 0.005, 0.01, 0.02)
                     for b in (0.0, 0.1, 0.2, 0.3)]))
        out.append(("grad_low ≥ A and overshoot ≥ B", scope,
                    [[("grad_low", a), ("overshoot", b)] for a in (1.2, 1.5, 2, 3)
                     for b in (0.0, 0.1, 0.2, 0.3)]))
        out.append(("kin_low ≥ A and overshoot ≥ B", scope,
                    [[("kin_low", a), ("overshoot", b)] for a in (1.5, 2, 3, 5)
                     for b in (0.0, 0.1, 0.2, 0.3)]))
    return out


# ============================================================================ per tensor
def tensor_series(run: Dict[str, Any], cadence: int = 0, scope: str = "tensor"
                  ) -> List[Tuple[int, Dict[str, Dict[str, float]]]]:
    """Per check (multiples of ``cadence`` and step 1 when given), per parameter tensor (scope
    "tensor") or module (scope "layer": a module's own tensors pooled), the signals:

    * ``rel``: the relative step RMS(Δθ) / max(RMS(θ), its RMS at the first check, RMS of all
      parameters at the first check) — the step measured against the tensor's own scale,
      floored by the model's so that a tensor initialised at zero does not read every step as
      huge (thermo_ext.stability's step rule);
    * ``rev``: cos(Δθ, Δθ_prev), this step against the one before (−1: thrown back);
    * ``over``: cos(∇L, Δθ_prev), the gradient this step saw against the step before
      (> 0: that step went past the valley).
    """
    checks = [c for c in run.get("layers") or []
              if not cadence or c["step"] == 1 or c["step"] % cadence == 0]
    if not checks:
        return []
    first = checks[0]["rows"]
    floor = math.sqrt(sum(r[1] for r in first.values()) / max(sum(r[0] for r in first.values()),
                                                              1))
    nan = float("nan")
    out = []
    first_rms: Dict[str, float] = {}  # each key's RMS at the first check, as the monitor's
    for c in checks:
        rows: Dict[str, List[float]] = {}
        for name, vals in c["rows"].items():
            key = name if scope == "tensor" else name.rsplit(".", 1)[0]
            acc = rows.setdefault(key, [0.0] * 7)
            for i, v in enumerate(vals):
                acc[i] += v
        sig = {}
        for k, (n, t2, d2, g2, ddp, dp2, gdp) in rows.items():
            n = max(n, 1)
            ref = first_rms.setdefault(k, math.sqrt(t2 / n))
            rel = math.sqrt(d2 / n) / max(math.sqrt(t2 / n), ref, floor, 1e-30)
            rev = ddp / math.sqrt(d2 * dp2) if d2 > 0 and dp2 > 0 else nan
            over = gdp / math.sqrt(g2 * dp2) if g2 > 0 and dp2 > 0 else nan
            sig[k] = dict(rel=rel, rev=rev, over=over)
        out.append((c["step"], sig))
    return out


def tensor_flag(series, conds: Sequence[Tuple[str, float]], checks: int = 1
                ) -> Optional[Tuple[int, str]]:
    """(step, tensor) of the first check after the reference where a tensor has met every
    condition (signal ≥ threshold; ``rev`` ≤ −threshold) at ``checks`` consecutive checks."""
    def meets(sig):
        if sig is None:
            return False
        for k, t in conds:
            v = sig[k]
            if not (v <= -t if k == "rev" else v >= t):
                return False
        return True
    for i in range(max(1, checks), len(series)):
        window = series[i - checks + 1: i + 1]
        if window[0][0] == series[0][0]:  # the reference check never counts
            continue
        for key in series[i][1]:
            if all(meets(c[1].get(key)) for c in window):
                return series[i][0], key
    return None


TENSOR_RULES: List[Tuple[str, List[List[Tuple[str, float]]]]] = [
    ("rel ≥ T", [[("rel", t)] for t in (0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)]),
    ("rel ≥ T and cos(Δθ, Δθ_prev) ≤ −C",
     [[("rel", t), ("rev", c)] for t in (0.03, 0.05, 0.1, 0.15, 0.2)
      for c in (0.0, 0.2, 0.4, 0.6)]),
    ("rel ≥ T and cos(∇L, Δθ_prev) ≥ C",
     [[("rel", t), ("over", c)] for t in (0.03, 0.05, 0.1, 0.15, 0.2)
      for c in (0.0, 0.2, 0.4, 0.6)]),
]


def score_tensors(runs: List[Dict[str, Any]], cadence: int, show_all: bool = False
                  ) -> List[str]:
    """The per-tensor / per-module rules: for each rule, scope and number of consecutive checks,
    the setting with no false alarm that flags the most failing runs, and the best flagged −
    3 × false alarms (``show_all``: every setting)."""
    cands = [r for r in runs if r["label"] in ("failing", "healthy", "slow") and r.get("layers")]
    fail = [r for r in cands if r["label"] == "failing"]
    healthy = [r for r in cands if r["label"] == "healthy"]
    slow = [r for r in cands if r["label"] == "slow"]
    out = [f"Per tensor / module, checks every {cadence or 'recorded'} steps: {len(fail)} "
           f"failing, {len(healthy)} healthy, {len(slow)} slow runs", "",
           "| rule | scope | checks in a row | thresholds | failing flagged (steps; ≤ onset) | "
           "false alarms (healthy) | slow flagged |", "|---|---|---|---|---|---|---|"]
    for scope in ("tensor", "layer"):
        series = {id(r): tensor_series(r, cadence, scope) for r in cands}
        for name, grid in TENSOR_RULES:
            for checks in (1, 2):
                rows = []
                for conds in grid:
                    got = {id(r): tensor_flag(series[id(r)], conds, checks) for r in cands}
                    rows.append((conds, got, [r for r in fail if got[id(r)]],
                                 [r for r in healthy if got[id(r)]],
                                 [r for r in slow if got[id(r)]]))
                zero = [x for x in rows if not x[3]]
                pick = rows if show_all else []
                if not show_all:
                    if zero:
                        pick.append(max(zero, key=lambda x: (len(x[2]), [-t for _, t in x[0]])))
                    pick.append(max(rows, key=lambda x: (len(x[2]) - 3 * len(x[3]),
                                                         [-t for _, t in x[0]])))
                seen = set()
                for conds, got, fl, fa, sl in pick:
                    if tuple(conds) in seen:
                        continue
                    seen.add(tuple(conds))
                    steps = sorted(got[id(r)][0] for r in fl)
                    early = sum(1 for r in fl if r["onset"] is None or got[id(r)][0] <= r["onset"])
                    txt = f" ({steps[0]}–{steps[-1]}; {early} ≤ onset)" if steps else ""
                    missed = [r for r in fail if not got[id(r)]]
                    miss = f"; missed: {_names(missed, 4)}" if missed else ""
                    far = (": " + ", ".join(f"{_run_name(r)} [{got[id(r)][1]}@{got[id(r)][0]}]"
                                            for r in fa[:3]) + (" …" if len(fa) > 3 else "")
                           ) if fa else ""
                    thr = ", ".join(f"{k} {t:g}" for k, t in conds)
                    out.append(f"| {name} | {scope} | {checks} | {thr} | {len(fl)}/{len(fail)}"
                               f"{txt}{miss} | {len(fa)}/{len(healthy)}{far} | "
                               f"{len(sl)}/{len(slow)} |")
    return out


def rule_table(runs: List[Dict[str, Any]], scope: str, threshold: float, checks: int,
               cadence: int) -> List[str]:
    """One rule (relative step ≥ ``threshold`` at ``checks`` measurements in a row, one every
    ``cadence`` steps) per dump and family: failing runs flagged (first step), false alarms
    on healthy runs, slow runs flagged."""
    out = [f"Rule: a {scope}'s relative step ≥ {threshold:g} at {checks} measurements in a row, "
           f"one every {cadence} steps", "",
           "| dump | family | failing flagged (step) | false alarms / healthy | slow flagged |",
           "|---|---|---|---|---|"]
    cells: Dict[Tuple[str, str], List[Dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["label"] in ("failing", "healthy", "slow") and r.get("layers"):
            cells[(r.get("_dump", "?"), r["family"])].append(r)
    total = defaultdict(int)
    for (dump, family), rs in sorted(cells.items()):
        got = {id(r): tensor_flag(tensor_series(r, cadence, scope), [("rel", threshold)], checks)
               for r in rs}
        fail = [r for r in rs if r["label"] == "failing"]
        healthy = [r for r in rs if r["label"] == "healthy"]
        slow = [r for r in rs if r["label"] == "slow"]
        fl = [r for r in fail if got[id(r)]]
        fa = [r for r in healthy if got[id(r)]]
        sl = [r for r in slow if got[id(r)]]
        for k, v in (("fail", len(fail)), ("fl", len(fl)), ("healthy", len(healthy)),
                     ("fa", len(fa)), ("slow", len(slow)), ("sl", len(sl))):
            total[k] += v
        steps = ", ".join(f"{r['method']}/s{r['seed']}@{got[id(r)][0]}" for r in fl)
        missed = ", ".join(f"{r['method']}/s{r['seed']}" for r in fail if not got[id(r)])
        fa_txt = ", ".join(f"{r['method']}/s{r['seed']} [{got[id(r)][1]}@{got[id(r)][0]}]"
                           for r in fa)
        out.append(f"| {dump} | {family} | {len(fl)}/{len(fail)}"
                   f"{' (' + steps + ')' if steps else ''}"
                   f"{'; missed ' + missed if missed else ''} | {len(fa)}/{len(healthy)}"
                   f"{' (' + fa_txt + ')' if fa_txt else ''} | {len(sl)}/{len(slow)} |")
    out.append(f"| all | | {total['fl']}/{total['fail']} | {total['fa']}/{total['healthy']} | "
               f"{total['sl']}/{total['slow']} |")
    return out


def _run_name(r: Dict[str, Any]) -> str:
    return f"{r['family']}/{r['method']}/s{r['seed']}"


def _names(rs: List[Dict[str, Any]], k: int = 4) -> str:
    return ", ".join(_run_name(r) for r in rs[:k]) + (" …" if len(rs) > k else "")


def score(runs: List[Dict[str, Any]], cadence: int, only_best: bool = False) -> List[str]:
    out: List[str] = []
    cands = [r for r in runs if r["label"] in ("failing", "healthy", "slow") and r.get("probes")]
    series = {id(r): group_series(r, cadence) for r in cands}
    fail = [r for r in cands if r["label"] == "failing"]
    healthy = [r for r in cands if r["label"] == "healthy"]
    slow = [r for r in cands if r["label"] == "slow"]
    out.append(f"Runs with signals: {len(fail)} failing, {len(healthy)} healthy, {len(slow)} "
               f"slow; checks every {cadence or 'recorded'} steps (the first is the reference).")
    out.append("")
    out.append("| rule | scope | threshold | failing flagged (first step; ≤ loss onset) | "
               "false alarms (healthy) | slow flagged | largest healthy | smallest failing |")
    out.append("|---|---|---|---|---|---|---|---|")

    def warned(r):
        return any("while still finite" in w for w in r["warnings"])

    out.append("| weights (today's monitor) | group | 5x scale & 2x in 128 steps | "
               f"{sum(map(warned, fail))}/{len(fail)} | "
               f"{sum(map(warned, healthy))}/{len(healthy)} | {sum(map(warned, slow))}/{len(slow)}"
               f" | – | – |")
    for name, scope, grid in rules():
        single = len(grid[0]) == 1
        hmax = fmin = None
        if single:
            signal = grid[0][0][0]
            ph = [(peak(series[id(r)], signal, scope), r) for r in healthy]
            pf = [(peak(series[id(r)], signal, scope), r) for r in fail]
            hmax = max(ph, key=lambda x: x[0], default=None)
            fmin = min(pf, key=lambda x: x[0], default=None)
        rows = []
        for conds in grid:
            flagged = [(r, first_flag(series[id(r)], conds, scope)) for r in fail]
            flagged = [(r, f) for r, f in flagged if f is not None]
            false = [r for r in healthy if first_flag(series[id(r)], conds, scope) is not None]
            sl = [r for r in slow if first_flag(series[id(r)], conds, scope) is not None]
            rows.append((conds, flagged, false, sl))
        # Shown: the setting with no false alarm that flags most (ties: the largest threshold),
        # and, if it misses failing runs, the one with the best flagged - 3 x false alarms.
        zero = [x for x in rows if not x[2]]
        pick = []
        if zero:
            pick.append(max(zero, key=lambda x: (len(x[1]), [t for _, t in x[0]])))
        if not zero or len(pick[0][1]) < len(fail):
            if not only_best or not zero:
                pick.append(max(rows, key=lambda x: (len(x[1]) - 3 * len(x[2]),
                                                     [t for _, t in x[0]])))
        seen = set()
        for conds, flagged, false, sl in pick:
            key = tuple(conds)
            if key in seen:
                continue
            seen.add(key)
            steps = sorted(f[0] for _, f in flagged)
            early = sum(1 for r, f in flagged if r["onset"] is None or f[0] <= r["onset"])
            step_txt = (f" (steps {steps[0]}–{steps[-1]}, median {statistics.median(steps):g}; "
                        f"{early} ≤ onset)" if steps else "")
            missed = [r for r in fail if all(r is not x for x, _ in flagged)]
            miss_txt = f"; missed: {_names(missed, 3)}" if missed and len(missed) <= 6 else ""
            thr = ", ".join(f"{t:g}" for _, t in conds)
            ext = ""
            if single and hmax is not None and fmin is not None:
                ext = (f" | {hmax[0]:.3g} ({_run_name(hmax[1])}) | {fmin[0]:.3g} "
                       f"({_run_name(fmin[1])})")
            else:
                ext = " | – | –"
            out.append(f"| {name} | {scope} | {thr} | {len(flagged)}/{len(fail)}{step_txt}"
                       f"{miss_txt} | {len(false)}/{len(healthy)}"
                       f"{': ' + _names(false) if false else ''} | {len(sl)}/{len(slow)}{ext} |")
    return out


def per_run_peaks(runs: List[Dict[str, Any]], cadence: int, signals: Sequence[str],
                  scope: str = "group") -> List[str]:
    out = [f"Peaks per run ({scope} scope):", "",
           "| run | label | " + " | ".join(f"peak {s}" for s in signals) + " |",
           "|---|---|" + "---|" * len(signals)]
    for r in runs:
        if r["label"] not in ("failing", "healthy", "slow") or not r.get("probes"):
            continue
        s = group_series(r, cadence)
        out.append(f"| {_run_name(r)} | {r['label']} | "
                   + " | ".join(f"{peak(s, x, scope):.3g}" for x in signals) + " |")
    return out


def describe(runs: List[Dict[str, Any]]) -> List[str]:
    out = ["| run | label | loss first → final | peak 5-step loss | acc | 5-step loss ≥ "
           "1.5 ln C from step | InstabilityWarning |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["label"] not in ("failing", "slow"):
            continue
        warned = "yes" if any("while still finite" in w for w in r["warnings"]) else "no"
        out.append(f"| {_run_name(r)} | {r['label']} | {r['loss_first']:.2f} → {r['loss']:.2f} | "
                   f"{r['peak5']:.2f} | {r['acc']:.1f} | {r['onset'] or '–'} | {warned} |")
    return out


# ============================================================================ cost
def bench_cost(numel: int, tensors: int, rounds: int, every: int) -> List[str]:
    """Per-check time of each signal's reads against a Langevin step on ``numel`` float32
    parameters in ``tensors`` tensors (one thread), interleaved rounds; amortised over a
    check every ``every`` steps."""
    import torch

    import thermo_ext as te

    torch.set_num_threads(1)
    te.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    size = numel // tensors
    params = [torch.nn.Parameter(0.05 * torch.randn(size, generator=g)) for _ in range(tensors)]
    for p in params:
        p.grad = 1e-3 * torch.randn(size, generator=g)
    opt = te.Langevin(params, seed=1, check_stability=False)
    for _ in range(3):
        opt.step()
    moms = [opt.state[p]["momentum_buffer"] for p in params]
    grads = [p.grad for p in params]
    theta = [p.detach() for p in params]
    copies = [t.clone() for t in theta]

    def step():
        opt.step()

    def norms_theta_p():  # today's monitor: Σθ², Σp² (one multi-tensor norm, one read)
        torch.stack(torch._foreach_norm(theta + moms)).tolist()

    def norm_g():  # + Σg²
        torch.stack(torch._foreach_norm(grads)).tolist()

    def dot_gp():  # + Σg·p
        torch.stack([torch.dot(a, b) for a, b in zip(grads, moms)]).tolist()

    def copy_theta():  # the exact Δθ: a copy of θ before the step (read + write), then Δθ
        torch._foreach_copy_(copies, theta)

    def delta():  # ... and Σ(θ - θ_before)² after it
        torch.stack(torch._foreach_norm(torch._foreach_sub(theta, copies))).tolist()

    fns = dict(step=step, norms_theta_p=norms_theta_p, norm_g=norm_g, dot_gp=dot_gp,
               copy_theta=copy_theta, delta=delta)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = [f"# {numel / 1e6:g} M float32 in {tensors} tensors, 1 thread, {rounds} interleaved "
           f"rounds; torch {torch.__version__}; Langevin step median {med['step'] * 1e3:.1f} ms",
           "", f"| reads at a check | per check / step | amortised, a check every {every} "
           "steps |", "|---|---|---|"]
    for k, label in (("norms_theta_p", "Σθ², Σp² (today's monitor)"), ("norm_g", "Σ∇L²"),
                     ("dot_gp", "Σ∇L·p"), ("copy_theta", "copy of θ before the step (for Δθ)"),
                     ("delta", "Σ(Δθ)² after the step")):
        r = med[k] / med["step"]
        out.append(f"| {label} | {100 * r:.1f} % | {100 * r / every:.2f} % |")
    return out


# ============================================================================ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dumps", nargs="*", help="bench/model_families.py --signals --dump files")
    ap.add_argument("--cadence", type=int, default=None, action="append",
                    help="score the rules on checks every N steps only (repeatable); "
                    "default: every recorded check")
    ap.add_argument("--margin", type=float, default=5.0,
                    help="healthy: accuracy within this many points of AdamW's mean")
    ap.add_argument("--cost", action="store_true", help="measure each signal's cost")
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--peaks", action="store_true", help="print every run's peak signals")
    ap.add_argument("--rule", default=None, metavar="SCOPE:T:CHECKS:CADENCE",
                    help="only the per-family table of one step rule, e.g. layer:0.2:2:8 "
                    "(thermo_ext.stability's)")
    args = ap.parse_args(argv)
    if args.cost:
        print("\n".join(bench_cost(args.numel, args.tensors, args.rounds, args.every)))
    if not args.dumps:
        return 0
    runs: List[Dict[str, Any]] = []
    for path in args.dumps:
        with open(path) as fh:
            data = json.load(fh)
        print(f"# {path}: {data.get('command', '?')}")
        for r in data["runs"]:
            r["_dump"] = os.path.basename(path).rsplit(".", 1)[0]
        runs.extend(data["runs"])
    from model_families import dedupe
    runs = dedupe(runs)
    label_runs(runs, args.margin)
    counts = defaultdict(int)
    for r in runs:
        counts[r["label"]] += 1
    print(f"# {len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print()
    if args.rule:
        scope, t, checks, cadence = args.rule.split(":")
        print("\n".join(rule_table(runs, scope, float(t), int(checks), int(cadence))))
        return 0
    print("\n".join(describe(runs)))
    for cadence in sorted(set(args.cadence or [0])):
        print()
        print("\n".join(score(runs, cadence)))
        print()
        print("\n".join(score_tensors(runs, cadence)))
    if args.peaks:
        print()
        for scope in ("group", "model"):
            print()
            print("\n".join(per_run_peaks(runs, 0, SIGNALS, scope)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
