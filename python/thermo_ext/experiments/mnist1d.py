"""``thermo-ext mnist1d``: the paper's three claims on MNIST-1D, and the sampler's own answer.

MNIST-1D (Greydanus 2020; :func:`thermo_ext.data.mnist1d`, the ``mnist1d`` package's
procedural generator, 4000 training and 1000 test signals) with the two networks of the
``mnist1d`` repository's benchmark: an MLP and a 1-D CNN. Every method runs with its own
defaults (the named methods' signatures, read when a run is built), the baselines SGD with
momentum, Adam and AdamW at their usual settings (:data:`BASELINES`).

A *run* (:class:`Mnist1dRun`) trains one network with one method and seed and records:

* per epoch the training and test loss and accuracy (the test loss is the NLL);
* at the end the test accuracy, NLL and ECE of its last iterate, and of its *prediction
  average* (:class:`thermo_ext.PosteriorPredictive` over the second half of the run, a few
  samples per epoch): the posterior predictive of a sampler, the same average of a baseline's
  trajectory;
* for SWA runs (``swa_start``) the same of torch's ``AveragedModel`` of the iterates;
* optionally its test probabilities (deep-ensemble members).

From the runs the tables of the three claims follow — *faster* (epochs until the test
accuracy first reaches a fixed target), *more accurate* (final accuracy, NLL, ECE), *more
robust* (the same over step sizes ×¼ … ×4 of each method's default) — and the comparison at
equal gradient evaluations of last iterates, prediction averages, one Adam model, a deep
ensemble of Adam models and SWA (:func:`comparison_rows`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as te_data
from ..posterior import PosteriorPredictive
from ..stability import InstabilityWarning
from .methods import METHODS, optimizer_settings
from .tables import _table

__all__ = ["ARCHS", "BASELINES", "Mnist1dTask", "Mnist1dRun", "MLP", "CNN", "metrics",
           "expected_calibration_error", "plan_runs", "faster_rows", "accuracy_rows",
           "robustness_rows", "comparison_rows", "format_faster", "format_accuracy",
           "format_robustness", "format_comparison", "plot_mnist1d"]

#: The baselines at their usual settings: SGD with heavy-ball momentum 0.9 (lr 0.05), Adam and
#: AdamW at torch's defaults (lr 1e-3; AdamW's weight decay 1e-2).
BASELINES: Dict[str, Dict[str, Any]] = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
}


# ============================================================================ the networks
class MLP(nn.Module):
    """The mnist1d benchmark's MLP: 40-100-100-10 ReLU, the second layer residual
    (h ← h + relu(W₂h + b₂)); 15 210 parameters."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(40, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


class CNN(nn.Module):
    """The mnist1d benchmark's 1-D CNN: three Conv1d (25 channels, stride 2) with ReLU and a
    linear classifier on the flattened 25 × 5 features; 5 210 parameters."""

    def __init__(self, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


ARCHS: Dict[str, Callable[[], nn.Module]] = {"MLP": MLP, "CNN": CNN}

_DATA: Dict[Tuple[int, int], Any] = {}  # (samples, seed) -> data, built once per process


@dataclasses.dataclass(frozen=True)
class Mnist1dTask:
    """MNIST-1D from the package's generator (``samples`` signals, 80 % for training;
    ``data_seed`` 42 is the standard data set), the same data for every run."""

    samples: int = 5000
    data_seed: int = 42
    name = "mnist1d"
    chance = 10.0

    def data(self):
        key = (self.samples, self.data_seed)
        if key not in _DATA:
            _DATA[key] = te_data.mnist1d(self.samples, seed=self.data_seed)
        return _DATA[key]

    @staticmethod
    def model(arch: str = "MLP") -> nn.Module:
        return ARCHS[arch]()

    @property
    def sizes(self) -> Tuple[int, int]:
        """(training, test) signals, as the generator splits them: samples // 10 per class,
        the first 80 % for training."""
        total = self.samples // 10 * 10
        return int(total * 0.8), total - int(total * 0.8)

    def describe(self) -> str:
        n_train, n_test = self.sizes
        data = "the standard data set" if self.data_seed == 42 else f"data seed {self.data_seed}"
        return (f"MNIST-1D ({n_train} train / {n_test} test signals of length 40, the mnist1d "
                f"generator, {data}), cross-entropy")


# ============================================================================ metrics
def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = 15) -> float:
    """ECE (Guo et al. 2017; torchmetrics' default binning): the confidences max_c p_c in
    ``bins`` equal-width bins of (0, 1]; Σ_b (n_b / n) |accuracy_b − mean confidence_b|, as a
    percentage."""
    conf, pred = probs.max(1)
    correct = (pred == labels).to(probs.dtype)
    index = (conf * bins).ceil().long().clamp_(1, bins) - 1
    gap = torch.zeros(bins, dtype=probs.dtype).index_add_(0, index, correct - conf)
    return 100.0 * float(gap.abs().sum()) / len(labels)


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Test accuracy %, NLL (mean −log p(y), nats per point) and ECE % of class probabilities
    (float64 rows summing to 1). Rows that are not finite (a diverged net) count as wrong and
    make the NLL and ECE not finite."""
    finite = torch.isfinite(probs).all(1)
    acc = 100.0 * float(((probs.argmax(1) == labels) & finite).sum()) / len(labels)
    if not bool(finite.all()):
        return {"acc": acc, "nll": math.nan, "ece": math.nan}
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    nll = float(-torch.log(p_true).mean())
    return {"acc": acc, "nll": nll, "ece": expected_calibration_error(probs, labels)}


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.softmax(model(x).double(), dim=-1)
    finally:
        model.train(was)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ============================================================================ one run
@dataclasses.dataclass(frozen=True)
class Mnist1dRun:
    """One training run (picklable: runs go to worker processes).

    ``member`` > 0 draws the initialisation, batch order and noise from other streams of the
    same seed (deep-ensemble members; member 0 is the plain run of the seed). ``pp_burn_in``
    (epochs) turns on the prediction average, ``pp_per_epoch`` samples per epoch after it.
    ``swa_start`` (epochs) makes it an SWA run: torch's ``AveragedModel`` of the iterates at the
    end of every later epoch, the learning rate held at ``swa_lr`` by ``SWALR``.
    """

    task: Mnist1dTask
    arch: str
    method: str
    hyper: Dict[str, Any]
    seed: int
    epochs: int
    batch: int = 32
    lr_factor: float = 1.0
    member: int = 0
    pp_burn_in: Optional[int] = None
    pp_per_epoch: int = 4
    swa_start: Optional[int] = None
    swa_lr: Optional[float] = None
    keep_probs: bool = False
    role: str = "main"  # main, grid, member, swa: which table the run is for
    ensemble: Optional[str] = None  # members: "equal" (budget) or "long" (ensemble × budget)

    @property
    def label(self) -> str:
        extra = ""
        if self.lr_factor != 1.0:
            extra += f" lr×{self.lr_factor:g}"
        if self.role == "member":
            extra += f" member {self.member} ({self.epochs} ep)"
        if self.role == "swa":
            extra += " SWA"
        return f"{self.arch} {self.method} seed {self.seed}{extra}"

    def _stream(self, name: str) -> str:
        return name if self.member == 0 else f"{name}#{self.member}"

    def execute(self, progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
        return train_mnist1d(self, progress)


def _init(run: Mnist1dRun) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(te_data.derive_seed(run.seed, run._stream("init")))
        return run.task.model(run.arch)


def train_mnist1d(run: Mnist1dRun, progress: Optional[Callable[[int], None]] = None
                  ) -> Dict[str, Any]:
    """Trains one network; returns its record. As :func:`~.training.train_run`: preloaded
    tensors, one permutation per epoch, evaluation under ``no_grad`` at epoch 0 and after every
    epoch, a diverged run (the optimizer's finiteness check raised, or the parameters are not
    finite) stops and counts with the net it left. Instability warnings are counted, not
    printed."""
    (x, y), (x_test, y_test) = run.task.data()
    model = _init(run)
    hyper = dict(run.hyper)
    hyper["lr"] = hyper["lr"] * run.lr_factor
    opt = METHODS[run.method].build(model, hyper,
                                    seed=te_data.derive_seed(run.seed, run._stream("noise")))
    shuffle = te_data.generator(run.seed, run._stream("shuffle"))
    n, batch = len(x), run.batch
    steps_per_epoch = math.ceil(n / batch)
    pp = None
    if run.pp_burn_in is not None and run.pp_burn_in < run.epochs:
        pp = PosteriorPredictive(model, x_test, burn_in=run.pp_burn_in * steps_per_epoch,
                                 thin=max(1, steps_per_epoch // run.pp_per_epoch))
    swa_model = swa_sched = None
    if run.swa_start is not None:
        swa_model = torch.optim.swa_utils.AveragedModel(model)
        swa_sched = torch.optim.swa_utils.SWALR(opt, swa_lr=run.swa_lr or hyper["lr"],
                                                anneal_epochs=1)
    curves: Dict[str, List[float]] = {k: [] for k in ("epoch", "train_loss", "train_acc",
                                                      "test_loss", "test_acc")}

    def record(epoch: int) -> None:
        with torch.no_grad():
            model.eval()
            out, out_test = model(x), model(x_test)
            model.train()
        for k, v in (("epoch", epoch), ("train_loss", float(F.cross_entropy(out, y))),
                     ("train_acc", _acc(out, y)),
                     ("test_loss", float(F.cross_entropy(out_test, y_test))),
                     ("test_acc", _acc(out_test, y_test))):
            curves[k].append(v)

    t0 = time.perf_counter()
    diverged_at = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InstabilityWarning)
        record(0)
        for epoch in range(1, run.epochs + 1):
            perm = torch.randperm(n, generator=shuffle)
            xs, ys = x[perm], y[perm]
            try:
                for i in range(0, n, batch):
                    opt.zero_grad()
                    F.cross_entropy(model(xs[i:i + batch]), ys[i:i + batch]).backward()
                    opt.step()
                    if pp is not None:
                        pp.update()
            except FloatingPointError:  # thermo_ext's check: nothing was updated by that step
                diverged_at = epoch
            if diverged_at is None and not _finite(model):
                diverged_at = epoch
            if swa_model is not None and diverged_at is None and epoch > run.swa_start:
                swa_model.update_parameters(model)
                swa_sched.step()
            record(epoch)
            if progress is not None:
                progress(epoch)
            if diverged_at is not None:
                break
    wall = time.perf_counter() - t0
    instability = [str(w.message) for w in caught if issubclass(w.category, InstabilityWarning)]
    last_probs = _probs(model, x_test)
    result: Dict[str, Any] = {
        "arch": run.arch, "method": run.method, "seed": run.seed, "member": run.member,
        "role": run.role, "ensemble": run.ensemble, "lr_factor": run.lr_factor, "epochs": run.epochs, "batch": batch,
        "steps": steps_per_epoch * run.epochs, "hyper": hyper,
        "optimizer": optimizer_settings(opt), "diverged_at": diverged_at, "wall_s": wall,
        "instability_warnings": len(instability),
        "first_instability_warning": instability[0] if instability else None,
        "swa_start": run.swa_start, "curves": curves, "last": metrics(last_probs, y_test),
        "final_test_acc": None, "pp": None, "pp_samples": 0, "swa": None,
    }
    result["final_test_acc"] = result["last"]["acc"]
    if pp is not None and pp.samples:
        result["pp"] = metrics(pp.mean(), y_test)
        result["pp_samples"] = pp.samples
    if swa_model is not None and swa_model.n_averaged.item() > 0:
        result["swa"] = metrics(_probs(swa_model, x_test), y_test)
        result["swa_averaged"] = int(swa_model.n_averaged.item())
    if run.keep_probs:
        result["probs"] = last_probs
    if progress is not None:
        progress(run.epochs)
    return result


def _acc(out: torch.Tensor, labels: torch.Tensor) -> float:
    right = (out.argmax(1) == labels) & torch.isfinite(out).all(1)
    return 100.0 * float(right.sum()) / len(labels)


# ============================================================================ the plan
def plan_runs(task: Mnist1dTask, archs: Sequence[str], methods: Sequence[str],
              hyper: Dict[str, Dict[str, Any]], seeds: Sequence[int], *, epochs: int,
              batch: int, lr_factors: Sequence[float], grid_seeds: int, pp_burn_in: int,
              pp_per_epoch: int, comparison: bool, ensemble: int, swa_start: int
              ) -> List[Mnist1dRun]:
    """Every run of one ``thermo-ext mnist1d`` command.

    * main: every arch × method × seed at the default step size, with the prediction average
      (these also give the ×1 column of the robustness grid);
    * grid: every arch × method × other step-size factor × the first ``grid_seeds`` seeds;
    * comparison: per arch and seed, a deep ensemble of ``ensemble`` Adam models of
      ``epochs // ensemble`` epochs each (the main runs' gradient evaluations), the same of
      ``epochs`` each (``ensemble`` times as many: the Adam main run is member 0), and SWA of
      the SGD baseline (averaging every epoch after ``swa_start``).
    """
    common = dict(task=task, batch=batch)
    runs = [Mnist1dRun(arch=a, method=m, hyper=hyper[m], seed=s, epochs=epochs,
                       pp_burn_in=pp_burn_in, pp_per_epoch=pp_per_epoch,
                       keep_probs=comparison and m == "Adam", **common)
            for a in archs for m in methods for s in seeds]
    runs += [Mnist1dRun(arch=a, method=m, hyper=hyper[m], seed=s, epochs=epochs, lr_factor=f,
                        role="grid", **common)
             for a in archs for m in methods for f in lr_factors if f != 1.0
             for s in seeds[:grid_seeds]]
    if comparison:
        adam = hyper.get("Adam", BASELINES["Adam"])
        sgd = hyper.get("SGD", BASELINES["SGD"])
        short = max(1, epochs // ensemble)
        for a in archs:
            for s in seeds:
                runs += [Mnist1dRun(arch=a, method="Adam", hyper=adam, seed=s, epochs=short,
                                    member=k, keep_probs=True, role="member",
                                    ensemble="equal", **common)
                         for k in range(ensemble)]
                runs += [Mnist1dRun(arch=a, method="Adam", hyper=adam, seed=s, epochs=epochs,
                                    member=k, keep_probs=True, role="member", ensemble="long",
                                    **common)
                         for k in range(1, ensemble)]
                runs.append(Mnist1dRun(arch=a, method="SGD", hyper=sgd, seed=s, epochs=epochs,
                                       swa_start=swa_start, role="swa", **common))
    return runs


# ============================================================================ summaries
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = list(values)
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _epochs_to(curves: Dict[str, List[float]], target: float) -> Optional[int]:
    for epoch, acc in zip(curves["epoch"], curves["test_acc"]):
        if epoch > 0 and acc >= target:
            return int(epoch)
    return None


def _main(results, arch, method):
    return [r for r in results if r["role"] == "main" and r["arch"] == arch
            and r["method"] == method]


def faster_rows(results, archs, methods, targets: Dict[str, float]) -> List[Dict[str, Any]]:
    """Per arch and method: the epoch at which the test accuracy first reached the arch's
    target, median over seeds (a seed that never did counts as never; None when more than half
    never did), and how many seeds got there."""
    rows = []
    for a in archs:
        for m in methods:
            runs = _main(results, a, m)
            if not runs:
                continue
            reached = [_epochs_to(r["curves"], targets[a]) for r in runs]
            med = statistics.median(sorted(math.inf if e is None else e for e in reached))
            rows.append({"arch": a, "method": m, "target": targets[a],
                         "epochs_median": None if math.isinf(med) else med,
                         "reached": sum(e is not None for e in reached), "seeds": len(runs),
                         "per_seed": reached})
    return rows


def accuracy_rows(results, archs, methods) -> List[Dict[str, Any]]:
    """Per arch and method: final test accuracy, NLL and ECE of the last iterate, mean and
    sample standard deviation over seeds; diverged runs and instability warnings counted."""
    rows = []
    for a in archs:
        for m in methods:
            runs = _main(results, a, m)
            if not runs:
                continue
            row = {"arch": a, "method": m, "seeds": len(runs),
                   "diverged": sum(r["diverged_at"] is not None for r in runs),
                   "warned": sum(r["instability_warnings"] > 0 for r in runs),
                   "wall_s": statistics.fmean(r["wall_s"] for r in runs)}
            for k in ("acc", "nll", "ece"):
                row[k], row[k + "_std"] = _mean_std(r["last"][k] for r in runs)
            rows.append(row)
    return rows


def robustness_rows(results, archs, methods, lr_factors, grid_seeds: int,
                    within: float = 2.0) -> List[Dict[str, Any]]:
    """Per arch and method: the final test accuracy at each step-size factor (mean over the
    first ``grid_seeds`` seeds), its best, and the fraction of factors within ``within``
    points of that best."""
    rows = []
    for a in archs:
        for m in methods:
            cells, diverged, lr = [], [], None
            for f in lr_factors:
                runs = [r for r in results if r["arch"] == a and r["method"] == m
                        and r["lr_factor"] == f and r["role"] in ("main", "grid")]
                runs = sorted(runs, key=lambda r: r["seed"])[:grid_seeds]
                if not runs:
                    break
                cells.append(statistics.fmean(r["last"]["acc"] for r in runs))
                diverged.append(sum(r["diverged_at"] is not None for r in runs))
                if f == 1.0:
                    lr = runs[0]["hyper"]["lr"]
            else:
                best = max(cells)
                close = sum(c >= best - within for c in cells)
                rows.append({"arch": a, "method": m, "lr": lr, "factors": list(lr_factors),
                             "acc": cells, "diverged": diverged, "best": best,
                             "worst": min(cells), "within": close, "fraction": close / len(cells),
                             "seeds": grid_seeds})
    return rows


def comparison_rows(results, archs, methods, ensemble: int,
                    labels: torch.Tensor) -> List[Dict[str, Any]]:
    """Per arch, the predictors of the comparison with their gradient evaluations (in epochs
    of one network) and test accuracy, NLL and ECE on the test ``labels``, mean ± std over
    seeds:

    every method's last iterate and its prediction average (the same runs), one Adam model
    (Adam's last iterate), deep ensembles of ``ensemble`` Adam models at the same gradient
    evaluations (each trained ``1/ensemble`` as long) and at ``ensemble`` times as many, and
    SWA of SGD (torch.optim.swa_utils)."""
    rows = []
    for a in archs:
        def add(name, kind, epochs, values):
            values = list(values)
            if not values:
                return
            row = {"arch": a, "predictor": name, "kind": kind, "epochs": epochs,
                   "seeds": len(values)}
            for k in ("acc", "nll", "ece"):
                row[k], row[k + "_std"] = _mean_std(v[k] for v in values)
            rows.append(row)

        for m in methods:
            runs = _main(results, a, m)
            if not runs:
                continue
            add(f"{m}, last iterate", "last", runs[0]["epochs"], (r["last"] for r in runs))
            pp = [r["pp"] for r in runs if r["pp"] is not None]
            if len(pp) == len(runs):
                add(f"{m}, prediction average", "pp", runs[0]["epochs"], pp)
        for which, kind in (("equal", "ensemble"), ("long", "ensemble_long")):
            # the long ensemble's member 0 is the Adam main run of the seed
            by_seed: Dict[int, List[Dict[str, Any]]] = {}
            for r in results:
                if r["arch"] == a and r["method"] == "Adam" and "probs" in r and (
                        r.get("ensemble") == which or
                        (which == "long" and r["role"] == "main")):
                    by_seed.setdefault(r["seed"], []).append(r)
            groups = [g for g in by_seed.values() if len(g) == ensemble]
            if not groups:
                continue
            values = [metrics(torch.stack([r["probs"] for r in g]).mean(0), labels)
                      for g in groups]
            epochs = sum(r["epochs"] for r in groups[0])
            add(f"deep ensemble, {ensemble} Adam × {groups[0][0]['epochs']} epochs", kind,
                epochs, values)
        swa = [r for r in results if r["arch"] == a and r["role"] == "swa"
               and r["swa"] is not None]
        if swa:
            add(f"SWA of SGD (averaged after epoch {swa[0]['swa_start']})", "swa",
                swa[0]["epochs"], (r["swa"] for r in swa))
    return rows


# ============================================================================ text tables
def _pm(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_faster(rows, archs, methods) -> str:
    head = ["method"] + [f"{a}: epochs to {_target(rows, a):g}%" for a in archs]
    body = []
    for m in methods:
        cells = [m]
        for a in archs:
            r = next((r for r in rows if r["arch"] == a and r["method"] == m), None)
            if r is None:
                cells.append("")
                continue
            med = "never" if r["epochs_median"] is None else f"{r['epochs_median']:g}"
            cells.append(f"{med} ({r['reached']}/{r['seeds']})")
        body.append(cells)
    return _table("(i) faster: epochs until the test accuracy first reaches the target", head,
                  body, note="median over seeds of the first epoch at or above the target (a "
                             "seed that never got there counts as never); in brackets: the "
                             "seeds that got there")


def _target(rows, arch) -> float:
    return next(r["target"] for r in rows if r["arch"] == arch)


def format_accuracy(rows, archs) -> str:
    parts = []
    for a in archs:
        body = []
        for r in (r for r in rows if r["arch"] == a):
            name = r["method"]
            if r["diverged"]:
                name += f" [{r['diverged']} diverged]"
            if r["warned"]:
                name += f" [{r['warned']} warned]"
            body.append([name, _pm(r["acc"], r["acc_std"], 1), _pm(r["nll"], r["nll_std"], 3),
                         _pm(r["ece"], r["ece_std"], 1), f"{r['wall_s']:.1f} s"])
        parts.append(_table(f"(ii) more accurate, {a}: the last iterate after the last epoch",
                            ["method", "test acc %", "test NLL", "ECE %", "time/run"], body))
    parts.append("mean ± std over seeds; NLL = mean -log p(true class) in nats; ECE over 15 "
                 "equal-width confidence bins; [k warned]: k runs raised an InstabilityWarning")
    return "\n\n".join(parts)


def format_robustness(rows, archs) -> str:
    parts = []
    for a in archs:
        rs = [r for r in rows if r["arch"] == a]
        if not rs:
            continue
        factors = rs[0]["factors"]
        head = ["method", "default lr", *(f"×{f:g}" for f in factors), "best",
                "within 2 of best"]
        body = [[r["method"], f"{r['lr']:g}",
                 *(f"{c:5.1f}" + ("*" if d else " ") for c, d in zip(r["acc"], r["diverged"])),
                 f"{r['best']:.1f}", f"{r['within']}/{len(factors)} = {r['fraction']:.2f}"]
                for r in rs]
        parts.append(_table(f"(iii) more robust, {a}: final test accuracy % over step sizes "
                            f"(mean over {rs[0]['seeds']} seed(s))", head, body))
    parts.append("×f = f times the method's default lr (the baselines' lr likewise); within 2 "
                 "of best = the fraction of step sizes whose accuracy is within 2 points of the "
                 "method's best; * = a run diverged (counted with the net it left)")
    return "\n\n".join(parts)


def format_comparison(rows, archs) -> str:
    parts = []
    for a in archs:
        body = [[r["predictor"], f"{r['epochs']:g}", _pm(r["acc"], r["acc_std"], 1),
                 _pm(r["nll"], r["nll_std"], 3), _pm(r["ece"], r["ece_std"], 1)]
                for r in rows if r["arch"] == a]
        if body:
            parts.append(_table(f"(iv) the sampler's answer, {a}: test metrics at equal "
                                f"gradient evaluations", ["predictor", "grad. evals (epochs)",
                                                          "test acc %", "test NLL", "ECE %"],
                                body))
    parts.append("mean ± std over seeds; grad. evals = gradient evaluations in epochs of one "
                 "network; last iterate and prediction average come from the same run (the "
                 "average: PosteriorPredictive over the run's second half)")
    return "\n\n".join(parts)


# ============================================================================ the figure
def _fraction(f: float) -> str:
    """0.25 -> '1/4', 2 -> '2'."""
    if f < 1 and abs(1 / f - round(1 / f)) < 1e-9:
        return f"1/{round(1 / f)}"
    return f"{f:g}"


def plot_mnist1d(path: str, results, robustness, archs, methods, title: str,
                 comparison: Sequence[Dict[str, Any]] = ()) -> None:
    """Top: test accuracy per epoch (mean ± std over seeds) per arch. Middle: final test
    accuracy against the step-size factor per arch (the robustness claim). Bottom (with
    ``comparison``): test NLL against test accuracy of every predictor of the comparison, an
    arrow from each method's last iterate to its prediction average."""
    from .figures import _colors, _figure

    colors = _colors(methods)
    rows = 3 if comparison else 2
    fig = _figure(12, 4.75 * rows)
    axes = fig.subplots(rows, len(archs), squeeze=False)
    for j, a in enumerate(archs):
        ax = axes[0][j]
        for m in methods:
            runs = _main(results, a, m)
            if not runs:
                continue
            curves = torch.tensor([r["curves"]["test_acc"] for r in runs], dtype=torch.float64)
            epochs = runs[0]["curves"]["epoch"]
            mean = curves.mean(0)
            ax.plot(epochs, mean, color=colors[m], lw=1.6 if m in ("AdLaLa", "Adam") else 1.0,
                    label=m)
            if len(runs) > 1:
                std = curves.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=colors[m], alpha=0.12,
                                lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{a}: test accuracy (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        for r in (r for r in robustness if r["arch"] == a):
            ax.plot(r["factors"], r["acc"], marker="o", ms=3, color=colors[r["method"]],
                    lw=1.6 if r["method"] in ("AdLaLa", "Adam") else 1.0,
                    label=f"{r['method']} ({r['within']}/{len(r['factors'])})")
        ax.set_xscale("log", base=2)
        if robustness:
            factors = robustness[0]["factors"]
            ax.set_xticks(factors, [_fraction(f) for f in factors])
            ax.minorticks_off()
        ax.set_xlabel("step size × the method's default")
        ax.set_ylabel("final test accuracy %")
        ax.set_title(f"{a}: robustness (in brackets: step sizes within 2 points of the best)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower left")
        if comparison:
            _plot_comparison(axes[2][j], [r for r in comparison if r["arch"] == a], colors)
    axes[0][0].legend(fontsize=8, ncol=2, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def _plot_comparison(ax, rows, colors) -> None:
    marks = {"ensemble": ("s", "black"), "ensemble_long": ("D", "dimgray"), "swa": ("^", "black")}
    for r in rows:
        method = r["predictor"].split(",")[0]
        if r["kind"] == "last":
            pp = next((q for q in rows if q["kind"] == "pp"
                       and q["predictor"].split(",")[0] == method), None)
            ax.plot(r["acc"], r["nll"], "o", mfc="none", color=colors.get(method, "gray"), ms=6)
            if pp is not None and math.isfinite(pp["nll"]) and math.isfinite(r["nll"]):
                ax.annotate("", xy=(pp["acc"], pp["nll"]), xytext=(r["acc"], r["nll"]),
                            arrowprops=dict(arrowstyle="->", color=colors.get(method, "gray"),
                                            lw=1.0))
                ax.plot(pp["acc"], pp["nll"], "o", color=colors.get(method, "gray"), ms=6,
                        label=method)
        elif r["kind"] in marks:
            marker, color = marks[r["kind"]]
            label = r["predictor"] + (f" ({r['epochs']:g} epochs)" if r["kind"] ==
                                      "ensemble_long" else "")
            ax.plot(r["acc"], r["nll"], marker, color=color, ms=7, label=label)
    ax.set_xlabel("test accuracy %")
    ax.set_ylabel("test NLL (nats)")
    ax.set_title("last iterate (open) → prediction average (filled); ensembles, SWA",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
