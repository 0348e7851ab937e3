"""The figures of the comparison: learning curves, decision boundaries, robustness heat maps."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch

from .methods import METHODS

__all__ = ["plot_comparison", "plot_robustness"]


# matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, so importing
# this module never changes a user's interactive matplotlib session.
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(methods: Sequence[str]) -> Dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(METHODS) if m in methods}


def _curve_stats(runs, key):
    """(epochs, mean, std, median) over the runs of one evaluation series."""
    import numpy as np

    arr = np.array([r["curves"][key] for r in runs], dtype=float)
    arr[~np.isfinite(arr)] = np.nan
    with np.errstate(all="ignore"):
        return (np.array(runs[0]["curves"]["epoch"]), np.nanmean(arr, 0), np.nanstd(arr, 0),
                np.nanmedian(arr, 0))


def _plot_curves(ax, results, methods, key, ylabel) -> None:
    """Accuracy: mean ± std over seeds. Loss: the median over seeds, no band (one seed whose
    loss explodes would otherwise paint the whole panel)."""
    colors = _colors(methods)
    is_loss = key.endswith("loss")
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        if not runs:
            continue
        epochs, mean, std, median = _curve_stats(runs, key)
        ax.plot(epochs, median if is_loss else mean, color=colors[m],
                lw=1.6 if m in ("AdLaLa", "Adam") else 1.0, label=m)
        if len(runs) > 1 and not is_loss:
            ax.fill_between(epochs, mean - std, mean + std, color=colors[m], alpha=0.12, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if is_loss:
        # A diverging method's loss would flatten every other curve: cap the axis at 1.5 times
        # the initial loss.
        first = [r["curves"][key][0] for r in results if math.isfinite(r["curves"][key][0])]
        if first:
            ax.set_ylim(0, 1.5 * max(first))
    ax.grid(alpha=0.3)


def _plot_boundary(ax, task, run) -> None:
    """The net's decision regions over the plane with the run's test points on top."""
    import numpy as np

    model = task.model()
    model.load_state_dict({k: torch.tensor(v) for k, v in run["model_state"].items()})
    _, (x_test, y_test) = task.data(run["seed"])
    lim = float(x_test.abs().max()) * 1.08
    g = torch.linspace(-lim, lim, 300)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        prob = torch.sigmoid(model(torch.stack((gx.reshape(-1), gy.reshape(-1)), 1)))
    prob = prob.reshape(gx.shape).numpy()
    ax.contourf(gx.numpy(), gy.numpy(), prob, levels=np.linspace(0, 1, 11), cmap="RdBu",
                alpha=0.55)
    ax.contour(gx.numpy(), gy.numpy(), prob, levels=[0.5], colors="k", linewidths=0.8)
    y = y_test.reshape(-1).numpy()
    x = x_test.numpy()
    ax.scatter(x[y == 0, 0], x[y == 0, 1], s=3, color="tab:red", label="class 0")
    ax.scatter(x[y == 1, 0], x[y == 1, 1], s=3, color="tab:blue", label="class 1")
    ax.set_aspect("equal")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title(f"{run['method']}, best seed ({run['seed']}): test accuracy "
                 f"{run['final_test_acc']:.1f} %", fontsize=10)


def plot_comparison(path: str, task, results, methods, title: str,
                    boundary_runs: Sequence[Dict[str, Any]] = ()) -> None:
    """Test accuracy and test loss vs epoch per method (mean ± std over seeds), and, for the
    spiral, the decision boundaries of the given runs (the best AdLaLa and Adam nets)."""
    rows = 2 if boundary_runs else 1
    fig = _figure(12, 5.2 * rows)
    axes = fig.subplots(rows, 2, squeeze=False)
    _plot_curves(axes[0][0], results, methods, "test_acc", "test accuracy %")
    axes[0][0].set_title("test accuracy (mean ± std over seeds)", fontsize=10)
    _plot_curves(axes[0][1], results, methods, "test_loss", "test loss")
    axes[0][1].set_title("test loss (median over seeds)", fontsize=10)
    axes[0][0].legend(fontsize=8, ncol=2, loc="lower right")
    for k, run in enumerate(boundary_runs[:2]):
        _plot_boundary(axes[1][k], task, run)
    if rows == 2 and len(boundary_runs) < 2:
        axes[1][1].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def plot_robustness(path: str, table: Dict[str, Dict[str, Any]], lr_factors, init_scales,
                    title: str, chance: float = 50.0) -> None:
    """One heat-map panel per method: final test accuracy over (init scale, lr factor)."""
    import numpy as np

    n = len(table)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.3 * cols + 0.8, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (m, t) in zip([a for row in axes for a in row], table.items()):
        grid = np.array(t["grid"])
        image = ax.imshow(grid, vmin=chance, vmax=100, cmap="viridis", origin="lower",
                          aspect="auto")
        ax.set_xticks(range(len(lr_factors)), [f"{f:g}" for f in lr_factors])
        ax.set_yticks(range(len(init_scales)), [f"{s:g}" for s in init_scales])
        ax.set_xlabel(f"lr × (default {t['default_lr']:g})", fontsize=9)
        ax.set_ylabel("init scale", fontsize=9)
        ax.set_title(f"{m} (mean {t['mean']:.1f} %)", fontsize=10)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < 80 else "black")
    for ax in [a for row in axes for a in row][n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="final test accuracy %")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
