"""One training run: :class:`RunSpec` says what to train, :func:`train_run` trains it.

Everything random in a run is drawn from generators derived from its seed
(:func:`thermo_ext.data.derive_seed`): the data (unless fixed by ``data_seed``), the
initialisation, the batch order and the optimizer's noise. Initialisation, data and batch order do
not depend on the method, so all methods of one seed start from the same network and see the same
batches: the comparison is paired.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import data as te_data
from .gradient import MLPGradient
from .methods import METHODS, optimizer_settings
from .tasks import Task, init_model

__all__ = ["RunSpec", "train_run"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run (picklable: runs go to worker processes)."""

    task: Task
    method: str
    hyper: Dict[str, Any]
    seed: int
    epochs: int
    eval_every: int
    batch: int
    lr_factor: float = 1.0
    init_scale: float = 1.0
    keep_model: bool = False
    closed_form: bool = True  # use MLPGradient where it applies (False: always autograd)

    @property
    def label(self) -> str:
        cell = ""
        if self.lr_factor != 1.0 or self.init_scale != 1.0:
            cell = f" lr×{self.lr_factor:g} init×{self.init_scale:g}"
        return f"{self.method} seed {self.seed}{cell}"


@torch.no_grad()
def _evaluate(model, task, x, y) -> Tuple[float, float]:
    out = model(x)
    return float(task.loss(out, y)), 100.0 * float(task.correct(out, y)) / len(y)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_run(spec: RunSpec, progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Trains one network; returns its record (curves, final accuracy, settings, timing).

    The loop is lean on purpose: the net is tiny, so Python overhead per step dominates. Data
    are preloaded tensors, each epoch is one permutation then contiguous slices (no
    DataLoader), and the full training and test sets are evaluated every ``eval_every`` epochs
    (and at epoch 0 and the last) under ``no_grad``.

    A run that diverges (the optimizer's finiteness check raises, or the parameters are no
    longer finite at an evaluation) stops there; its remaining evaluation points repeat its
    last evaluation, so a diverged run counts with the accuracy of the net it left behind.
    """
    task = spec.task
    (x, y), (x_test, y_test) = task.data(spec.seed)
    model = init_model(task, spec.seed, spec.init_scale)
    hyper = dict(spec.hyper)
    hyper["lr"] = hyper["lr"] * spec.lr_factor
    opt = METHODS[spec.method].build(model, hyper, seed=te_data.derive_seed(spec.seed, "noise"))
    shuffle = te_data.generator(spec.seed, "shuffle")
    params = list(model.parameters())
    n, batch = len(x), spec.batch
    loss_fn = task.loss
    gradient = MLPGradient(model, task) if (spec.closed_form and
                                            MLPGradient.applies(model, task)) else None
    targets = task.grad_target(y) if gradient is not None else y
    curves: Dict[str, List[float]] = {k: [] for k in
                                      ("epoch", "train_loss", "train_acc", "test_loss",
                                       "test_acc")}

    def record(epoch: int) -> None:
        tr_loss, tr_acc = _evaluate(model, task, x, y)
        te_loss, te_acc = _evaluate(model, task, x_test, y_test)
        for k, v in zip(curves, (epoch, tr_loss, tr_acc, te_loss, te_acc)):
            curves[k].append(v)

    # Timed from the start of the training loop (its first evaluation included). The data, the
    # net and the optimizer are built before: in a fresh worker process building the first
    # optimizer pays torch's lazy imports (seconds), which says nothing about the method.
    t0 = time.perf_counter()
    record(0)
    diverged_at = None
    for epoch in range(1, spec.epochs + 1):
        perm = torch.randperm(n, generator=shuffle)
        xs, ts = x[perm], targets[perm]
        try:
            for i in range(0, n, batch):
                if gradient is not None:
                    gradient(xs[i:i + batch], ts[i:i + batch])
                else:
                    for p in params:
                        p.grad = None
                    loss_fn(model(xs[i:i + batch]), ts[i:i + batch]).backward()
                opt.step()
        except FloatingPointError:  # thermo_ext's check: nothing was updated by that step
            diverged_at = epoch
        last = epoch == spec.epochs
        if diverged_at is None and (epoch % spec.eval_every == 0 or last):
            if not _finite(model):
                diverged_at = epoch
        if diverged_at is not None:
            record(epoch)
            _fill_after_divergence(curves, spec)
            break
        if epoch % spec.eval_every == 0 or last:
            record(epoch)
            if progress is not None:
                progress(epoch)
    wall = time.perf_counter() - t0
    if progress is not None:
        progress(spec.epochs)
    result = {
        "method": spec.method, "seed": spec.seed, "lr_factor": spec.lr_factor,
        "init_scale": spec.init_scale, "epochs": spec.epochs, "batch": batch,
        "hyper": hyper, "optimizer": optimizer_settings(opt),
        "final_test_acc": curves["test_acc"][-1], "final_test_loss": curves["test_loss"][-1],
        "final_train_acc": curves["train_acc"][-1],
        "final_train_loss": curves["train_loss"][-1],
        "diverged_at": diverged_at, "wall_s": wall,
        "gradient": "closed-form" if gradient is not None else "autograd", "curves": curves,
    }
    if spec.keep_model:
        result["model_state"] = {k: v.tolist() for k, v in model.state_dict().items()}
    return result


def _fill_after_divergence(curves: Dict[str, List[float]], spec: RunSpec) -> None:
    """Repeats the last evaluation at the remaining scheduled evaluation epochs."""
    last = {k: v[-1] for k, v in curves.items()}
    scheduled = list(range(spec.eval_every, spec.epochs + 1, spec.eval_every))
    if not scheduled or scheduled[-1] != spec.epochs:
        scheduled.append(spec.epochs)
    for epoch in scheduled:
        if epoch > last["epoch"]:
            curves["epoch"].append(epoch)
            for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
                curves[k].append(last[k])
