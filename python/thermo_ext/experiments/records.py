"""Result files: JSON records (strict: no NaN or infinity), CSV tables, long-format curves."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["write_json", "write_csv", "curve_rows"]


def _jsonable(obj):
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"name": getattr(obj, "name", type(obj).__name__),
                **_jsonable(dataclasses.asdict(obj))}
    return obj


def write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1, allow_nan=False)
        f.write("\n")


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def curve_rows(results: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[Any]]]:
    """Long-format curves: one row per (run, evaluation)."""
    header = ["method", "seed", "lr_factor", "init_scale", "epoch", "train_loss", "train_acc",
              "test_loss", "test_acc"]
    rows = []
    for r in results:
        c = r["curves"]
        for k in range(len(c["epoch"])):
            rows.append([r["method"], r["seed"], r["lr_factor"], r["init_scale"],
                         c["epoch"][k], f"{c['train_loss'][k]:.6g}", f"{c['train_acc'][k]:.2f}",
                         f"{c['test_loss'][k]:.6g}", f"{c['test_acc'][k]:.2f}"])
    return header, rows
