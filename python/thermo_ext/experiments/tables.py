"""The tables of the comparison: per-method summaries and the robustness grid, as fixed-width
text (also valid Markdown when fenced)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

from .methods import METHODS

__all__ = ["summarize", "format_summary", "robustness_table", "format_robustness"]


def _epochs_to(curves: Dict[str, List[float]], threshold: float) -> Optional[int]:
    for epoch, acc in zip(curves["epoch"], curves["test_acc"]):
        if acc >= threshold:
            return int(epoch)
    return None


def summarize(results: Sequence[Dict[str, Any]], methods: Sequence[str],
              thresholds: Sequence[float] = (80.0, 90.0)) -> List[Dict[str, Any]]:
    """One row per method: final test accuracy over seeds (mean, sample std, min, max), the
    median epoch to reach each threshold (a seed that never reached it counts as never; the
    median is None when more than half never did), how many seeds reached it, mean wall time."""
    rows = []
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        if not runs:
            continue
        finals = [r["final_test_acc"] for r in runs]
        row = {
            "method": m, "seeds": len(runs),
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_min": min(finals), "final_best": max(finals),
            "best_seed": runs[finals.index(max(finals))]["seed"],
            "diverged": sum(r["diverged_at"] is not None for r in runs),
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            "epochs": runs[0]["epochs"],
        }
        for t in thresholds:
            reached = [_epochs_to(r["curves"], t) for r in runs]
            times = sorted(math.inf if e is None else e for e in reached)
            med = statistics.median(times)
            row[f"epochs_to_{t:g}"] = None if math.isinf(med) else med
            row[f"reached_{t:g}"] = sum(e is not None for e in reached)
        rows.append(row)
    return rows


def format_summary(rows: Sequence[Dict[str, Any]], title: str,
                   thresholds: Sequence[float] = (80.0, 90.0)) -> str:
    """The comparison table as fixed-width text (also valid Markdown when fenced)."""
    head = ["method", "final test acc %", "best %", *(f"epochs to {t:g}%" for t in thresholds),
            "time/run"]
    body = []
    for r in rows:
        cells = [r["method"], f"{r['final_mean']:5.1f} ± {r['final_std']:4.1f}",
                 f"{r['final_best']:5.1f}"]
        for t in thresholds:
            med, k = r[f"epochs_to_{t:g}"], r[f"reached_{t:g}"]
            cells.append(f"{'never' if med is None else f'{med:g}'} ({k}/{r['seeds']})")
        cells.append(f"{r['wall_s_mean']:6.1f} s")
        if r["diverged"]:
            cells[0] += f" [{r['diverged']} diverged]"
        body.append(cells)
    return _table(title, head, body,
                  note=("mean ± std over seeds of the test accuracy after the last epoch; best "
                        "= best seed; epochs to x% = median over seeds of the first evaluation "
                        "at or above x% (in brackets: seeds that got there)"))


def _table(title: str, head: Sequence[str], body: Sequence[Sequence[str]],
           note: str = "") -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        (str(c).ljust(w) if j == 0 else str(c).rjust(w)) for j, (c, w) in
        enumerate(zip(cells, widths)))
    out = [title, line(head), "  ".join("-" * w for w in widths)]
    out += [line(cells) for cells in body]
    if note:
        out.append(note)
    return "\n".join(out)


def robustness_table(results: Sequence[Dict[str, Any]], methods: Sequence[str],
                     lr_factors: Sequence[float], init_scales: Sequence[float],
                     hyper: Optional[Dict[str, Dict[str, Any]]] = None
                     ) -> Dict[str, Dict[str, Any]]:
    """Per method: the grid of mean final test accuracy (rows init scale, columns lr factor),
    the number of diverged runs per cell, and summary numbers. ``hyper`` (each method's settings
    as run, before the lr factor) gives the step size the factors multiply; without it, the
    method's defaults."""
    out = {}
    for m in methods:
        grid, div = [], []
        for s in init_scales:
            row, drow = [], []
            for f in lr_factors:
                runs = [r for r in results if r["method"] == m and r["init_scale"] == s
                        and r["lr_factor"] == f]
                row.append(statistics.fmean(r["final_test_acc"] for r in runs))
                drow.append(sum(r["diverged_at"] is not None for r in runs))
            grid.append(row)
            div.append(drow)
        cells = [v for row in grid for v in row]
        out[m] = {"grid": grid, "diverged": div, "mean": statistics.fmean(cells),
                  "worst": min(cells), "best": max(cells),
                  "cells_at_80": sum(v >= 80 for v in cells), "cells": len(cells),
                  "default_lr": (hyper[m] if hyper else METHODS[m].defaults)["lr"]}
    return out


def format_robustness(table: Dict[str, Dict[str, Any]], lr_factors: Sequence[float],
                      init_scales: Sequence[float], title: str) -> str:
    parts = [title]
    head = ["method", "mean over grid %", "worst %", "best %", "cells >= 80%", "diverged runs"]
    body = [[m, f"{t['mean']:.1f}", f"{t['worst']:.1f}", f"{t['best']:.1f}",
             f"{t['cells_at_80']}/{t['cells']}", str(sum(map(sum, t["diverged"])))]
            for m, t in table.items()]
    parts.append(_table("", head, body))
    for m, t in table.items():
        head = [f"{m}: init × \\ lr ×", *(f"{f:g}" for f in lr_factors)]
        body = [[f"{s:g}", *(f"{v:5.1f}" + ("*" if d else " ") for v, d in zip(row, drow))]
                for s, row, drow in zip(init_scales, t["grid"], t["diverged"])]
        parts.append(_table("", head, body))
    parts.append("final test accuracy %, mean over seeds; lr × f = f times the method's default "
                 "step size; init × s = every initial parameter times s; * = a run diverged")
    return "\n".join(parts)
