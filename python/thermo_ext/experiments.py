"""The experiments behind ``thermo-ext``: methods, tasks, training runs, tables and figures.

The paper's comparison (Leimkuhler, Matthews, Vlaar 2019, DESIGN.md §1) is a set of *runs*, one
per (method, seed[, grid cell]); a run trains one small network from scratch and records its
learning curves. Runs are independent, so :func:`run_many` spreads them over processes.

Everything random in a run is drawn from generators derived from its seed
(:func:`thermo_ext.data.derive_seed`): the data (unless fixed by ``data_seed``), the
initialisation, the batch order and the optimizer's noise. Initialisation, data and batch order do
not depend on the method, so all methods of one seed start from the same network and see the same
batches: the comparison is paired.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data as te_data
from .methods import LOL, AdL, AdLaLa, LaLa, Langevin, Overdamped

__all__ = ["METHODS", "Method", "SettingsError", "SpiralTask", "DigitsTask", "LOSS_FORMS",
           "MLPGradient", "RunSpec", "init_model", "parse_settings", "check_settings",
           "resolve_methods", "train_run", "run_many", "default_jobs", "summarize",
           "format_summary", "robustness_table", "format_robustness", "machine_info",
           "curve_rows", "plot_comparison", "plot_robustness", "write_json", "write_csv"]


class SettingsError(ValueError):
    """A user setting (method name, ``--set`` key or value) that cannot be used."""


# ============================================================================ methods
@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer of the comparison with its default hyperparameters.

    ``defaults`` are the values used unless overridden (``--set Method.key=value``); ``extra``
    names further keywords that may be set but have no value of their own here.
    """

    name: str
    defaults: Dict[str, Any]
    extra: Tuple[str, ...]
    thermodynamic: bool
    source: str
    factory: Callable[..., torch.optim.Optimizer]

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(self.defaults) + self.extra

    def build(self, model: nn.Module, hyper: Dict[str, Any], seed: int) -> torch.optim.Optimizer:
        return self.factory(model, hyper, seed)


_THERMO_EXTRA = ("weight_decay", "momentum_init", "thermostat")


def _by_model(cls):  # partitioned methods take the model: its layers are the partitions
    return lambda model, hyper, seed: cls(model, seed=seed, **hyper)


def _by_params(cls):
    return lambda model, hyper, seed: cls(model.parameters(), seed=seed, **hyper)


# torch's fused CPU kernels are its fastest Adam and SGD (about half the step time of the
# default for-loop on the spiral net): the baselines get their best implementation.
def _adam(model, hyper, seed):
    hyper = {"fused": True, **hyper}
    if "betas" in hyper:  # given as "b1,b2" on the command line
        hyper["betas"] = tuple(hyper["betas"])
    return torch.optim.Adam(model.parameters(), **hyper)


def _sgd(model, hyper, seed):
    return torch.optim.SGD(model.parameters(), **{"fused": True, **hyper})


_PAPER = "the paper's notebook (AdLaLa.ipynb) and DESIGN.md §1"
#: The methods in the order of the tables. Thermodynamic defaults are those of
#: thermo_ext.optim (the paper's h = 0.25, tau = 1e-4, gamma = 0.1, sigma = 0.01, eps = 0.05,
#: xi0 = 0.1); Adam's lr is the notebook's; SGD's is this package's choice (see docs/RESULTS.md).
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("AdLaLa", dict(lr=0.25, tau1=1e-4, tau2=1e-4, gamma=0.1, sigma=0.01, eps=0.05,
                          xi0=0.1), _THERMO_EXTRA, True, _PAPER, _by_model(AdLaLa)),
    Method("LOL", dict(lr=0.25, tau1=1e-4, tau2=1e-4, gamma=0.1), _THERMO_EXTRA, True,
           "thermo_ext.optim.LOL defaults (the paper's h, tau, gamma)", _by_model(LOL)),
    Method("LaLa", dict(lr=0.25, gamma=0.1, tau=1e-4), _THERMO_EXTRA, True,
           "thermo_ext.optim.LaLa defaults (the paper's h, tau, gamma)", _by_model(LaLa)),
    Method("Langevin", dict(lr=0.25, gamma=0.1, tau=1e-4), _THERMO_EXTRA, True,
           "thermo_ext.optim.Langevin defaults (the paper's h, tau, gamma)",
           _by_params(Langevin)),
    Method("AdL", dict(lr=0.25, sigma=0.01, eps=0.05, tau=1e-4, xi0=0.1), _THERMO_EXTRA, True,
           "thermo_ext.optim.AdL defaults (the paper's h, sigma, eps, tau, xi0)",
           _by_params(AdL)),
    Method("Overdamped", dict(lr=0.05, tau=1e-4), _THERMO_EXTRA, True,
           "thermo_ext.optim.Overdamped defaults", _by_params(Overdamped)),
    Method("SGD", dict(lr=0.1, momentum=0.0), ("weight_decay", "nesterov", "dampening", "fused"),
           False,
           "this package's choice: plain SGD at lr 0.1", _sgd),
    Method("Adam", dict(lr=0.005), ("betas", "eps", "weight_decay", "amsgrad", "fused"), False,
           "the paper's notebook (lr 0.005), torch's other defaults", _adam),
)}


def resolve_methods(names: Sequence[str]) -> List[str]:
    """Canonical method names (case-insensitive), in the order given; SettingsError if unknown."""
    lookup = {k.lower(): k for k in METHODS}
    out = []
    for name in names:
        key = lookup.get(name.strip().lower())
        if key is None:
            raise SettingsError(f"--methods: unknown method {name.strip()!r}; choose from "
                                f"{', '.join(METHODS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise SettingsError("--methods: expected at least one method")
    return out


def _parse_value(text: str) -> Any:
    """'0.2' -> 0.2, 'inf' -> inf, '0.1,0.2' -> [0.1, 0.2], 'true' -> True, else the string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if "," in t:
        try:
            return [float(v) for v in t.split(",")]
        except ValueError:
            raise SettingsError(f"expected comma-separated numbers, got {t!r}") from None
    try:
        return float(t)
    except ValueError:
        return t


def parse_settings(items: Sequence[str], methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Each method's hyperparameters: its defaults updated by ``Method.key=value`` items.

    Only the keys a method has (its defaults and its settable extras) are accepted; a setting
    for a method that is not in ``methods`` is an error too (it would silently do nothing).
    """
    hyper = {m: dict(METHODS[m].defaults) for m in methods}
    lookup = {k.lower(): k for k in METHODS}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.strip().partition(".")
        if not sep or not dot or not key or not value.strip():
            raise SettingsError(f"--set {item!r}: expected Method.key=value, e.g. "
                                f"AdLaLa.lr=0.2")
        method = lookup.get(name.lower())
        if method is None:
            raise SettingsError(f"--set {item!r}: unknown method {name!r}; choose from "
                                f"{', '.join(METHODS)}")
        if method not in hyper:
            raise SettingsError(f"--set {item!r}: {method} is not among --methods "
                                f"({', '.join(methods)})")
        if key not in METHODS[method].keys:
            raise SettingsError(f"--set {item!r}: unknown key {key!r} for {method}; its keys "
                                f"are {', '.join(METHODS[method].keys)}")
        try:
            hyper[method][key] = _parse_value(value)
        except SettingsError as e:
            raise SettingsError(f"--set {item!r}: {e}") from None
    return hyper


def check_settings(task, hyper: Dict[str, Dict[str, Any]]) -> None:
    """Builds every method's optimizer once on the task's network so that a bad value is
    reported before any run starts (the optimizers validate their arguments)."""
    model = task.model()
    for method, hp in hyper.items():
        try:
            METHODS[method].build(model, hp, seed=0)
        except (TypeError, ValueError) as e:
            shown = ", ".join(f"{k}={v}" for k, v in hp.items())
            raise SettingsError(f"--set {method}: the optimizer rejected {shown}: {e}") from None


def optimizer_settings(opt: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """What the optimizer actually runs with, per param group (for the JSON record)."""
    groups = []
    for g in opt.param_groups:
        rec = {"tensors": len(g["params"]), "elements": sum(p.numel() for p in g["params"])}
        for k, v in g.items():
            if k in ("params", "step", "xi", "initial_tau"):
                continue
            if isinstance(v, (bool, int, float, str, type(None))):
                rec[k] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
                rec[k] = list(v)
        groups.append(rec)
    return groups


# ============================================================================ tasks
def _bce_on_sigmoid(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Exactly the notebook's Sigmoid layer + nn.BCELoss. In float32 sigmoid(z) rounds to 1 for
    # z > ~17, where BCELoss clamps the log at -100 and the gradient vanishes: a confidently
    # wrong point stops pulling on the net.
    return F.binary_cross_entropy(torch.sigmoid(out), y)


#: Loss forms of the spiral task: "logits" (default) computes the same BCE from the logit,
#: finite and with the exact gradient sigmoid(z) - y everywhere.
LOSS_FORMS = {"logits": F.binary_cross_entropy_with_logits, "sigmoid": _bce_on_sigmoid}


@dataclasses.dataclass(frozen=True)
class SpiralTask:
    """The paper's notebook problem: two spirals, a 2-hidden-1 ReLU net, BCE on its logit."""

    turns: float = 4.0
    noise: float = 0.02
    radius: float = 2.0
    train: int = 500
    test: int = 1000
    hidden: int = 100
    data_seed: Optional[int] = None  # None: each seed draws its own data set
    loss_form: str = "logits"  # or "sigmoid": the notebook's Sigmoid layer + BCELoss
    name = "spiral"
    chance = 50.0  # accuracy % of a constant guess

    def __post_init__(self):
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form: expected one of {tuple(LOSS_FORMS)}, got "
                             f"{self.loss_form!r}")

    def data(self, seed: int):
        return te_data.two_spirals(self.train, self.test, turns=self.turns, noise=self.noise,
                                   radius=self.radius,
                                   seed=seed if self.data_seed is None else self.data_seed)

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return LOSS_FORMS[self.loss_form](out, y)

    @property
    def closed_form(self) -> bool:  # the clamped BCELoss of "sigmoid" needs autograd
        return self.loss_form == "logits"

    @staticmethod
    def grad_target(y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def output_grad(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d(summed loss)/d(logit): sigmoid(z) - y."""
        return torch.sigmoid(out).sub_(target)

    @staticmethod
    def correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The notebook rounds sigmoid(out), i.e. thresholds the logit at 0. A non-finite output
        # is never right (a diverged net must not score 50 % by luck).
        return (((out > 0) == (y > 0.5)) & torch.isfinite(out)).sum()

    def describe(self) -> str:
        data = "its own data per seed" if self.data_seed is None else f"data seed {self.data_seed}"
        loss = "BCE on the logit" if self.loss_form == "logits" else "sigmoid + BCELoss"
        return (f"two spirals ({self.turns:g} turns, noise {self.noise:g}, {self.train} train / "
                f"{self.test} test points, {data}), 2-{self.hidden}-1 ReLU net, {loss}")


@dataclasses.dataclass(frozen=True)
class DigitsTask:
    """scikit-learn's 8×8 digits: a 64-hidden-10 ReLU net with cross-entropy."""

    test_fraction: float = 0.25
    hidden: int = 100
    data_seed: Optional[int] = None
    name = "digits"
    chance = 10.0

    def data(self, seed: int):
        return te_data.digits(self.test_fraction,
                              seed=seed if self.data_seed is None else self.data_seed)

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    @staticmethod
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    closed_form = True

    @staticmethod
    def grad_target(y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, 10).float()

    @staticmethod
    def output_grad(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d(summed loss)/d(logits): softmax(z) - onehot(y)."""
        return torch.softmax(out, 1).sub_(target)

    @staticmethod
    def correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out.argmax(1) == y) & torch.isfinite(out).all(1)).sum()

    def describe(self) -> str:
        split = ("its own split per seed" if self.data_seed is None
                 else f"split seed {self.data_seed}")
        return (f"scikit-learn digits (1797 images 8x8, {self.test_fraction:g} held out, "
                f"{split}, standardised), 64-{self.hidden}-10 ReLU net, cross-entropy")


Task = Any  # SpiralTask or DigitsTask: data(seed), model(), loss(), correct(), describe()


def init_model(task: Task, seed: int, scale: float = 1.0) -> nn.Module:
    """The task's network with torch's default initialisation drawn from ``seed`` (the global
    RNG is left as it was), every parameter then multiplied by ``scale``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(te_data.derive_seed(seed, "init"))
        model = task.model()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


class MLPGradient:
    """The mean loss's gradient for a Linear-ReLU-Linear net, written into each ``p.grad``.

    Why: on these tiny nets autograd's fixed cost per ``backward()`` (about 200 µs on the
    2-core machines of docs/RESULTS.md, against about 50 µs for the forward pass) is most of a
    training step. The same numbers follow from eight small tensor operations (backpropagation
    written out), so runs take about half the time. ``tests/test_cli.py`` checks them against
    autograd.
    """

    def __init__(self, model: nn.Module, task: Task):
        first, _, second = model
        self.w1, self.b1, self.w2, self.b2 = (first.weight, first.bias, second.weight,
                                              second.bias)
        self.output_grad = task.output_grad
        for p in (self.w1, self.b1, self.w2, self.b2):
            p.grad = torch.zeros_like(p)  # written in place by every call

    @classmethod
    def applies(cls, model: nn.Module, task: Task) -> bool:
        return (getattr(task, "closed_form", False) and isinstance(model, nn.Sequential)
                and len(model) == 3 and isinstance(model[0], nn.Linear)
                and isinstance(model[1], nn.ReLU) and isinstance(model[2], nn.Linear)
                and model[0].bias is not None and model[2].bias is not None)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> None:
        h = torch.addmm(self.b1, x, self.w1.t()).clamp_(min=0)
        out = torch.addmm(self.b2, h, self.w2.t())
        d_out = self.output_grad(out, target).div_(len(x))  # mean over the batch
        torch.mm(d_out.t(), h, out=self.w2.grad)
        torch.sum(d_out, 0, out=self.b2.grad)
        d_h = torch.mm(d_out, self.w2).mul_(h > 0)  # ReLU passes gradient where h > 0
        torch.mm(d_h.t(), x, out=self.w1.grad)
        torch.sum(d_h, 0, out=self.b1.grad)


# ============================================================================ one run
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
    # Timed from here: the first optimizer a process builds pays torch's lazy imports (seconds),
    # which says nothing about the method.
    t0 = time.perf_counter()
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
    if progress is not None:
        progress(spec.epochs)
    wall = time.perf_counter() - t0
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


# ============================================================================ many runs
_progress_queue = None  # set in worker processes by _worker_init


def _worker_init(threads: int, progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(threads)


def _worker_run(index: int, spec: RunSpec) -> Dict[str, Any]:
    q = _progress_queue
    if q is not None:
        q.put((index, 0))
    return train_run(spec, None if q is None else (lambda e: q.put((index, e))))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_jobs() -> int:
    """Worker processes: one per available core, at most 2 by default (the target machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def run_many(specs: Sequence[RunSpec], *, jobs: int = 1, threads: int = 1,
             quiet: bool = False) -> List[Dict[str, Any]]:
    """Runs every spec; returns their records in the order given.

    ``jobs`` > 1 runs them in that many worker processes (spawned, each with ``threads`` torch
    and OpenMP threads: the tiny matmuls are fastest single-threaded, and two single-threaded
    runs use two cores better than one run on two threads). One progress bar per run.
    """
    from tqdm.auto import tqdm

    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    bars: Dict[int, Any] = {}

    def bar(i: int):
        if i not in bars:
            bars[i] = tqdm(total=specs[i].epochs, desc=f"{specs[i].label:<22}", unit="ep",
                           leave=True, disable=quiet, dynamic_ncols=True)
        return bars[i]

    def finish(i: int, res: Dict[str, Any]) -> None:
        b = bar(i)
        b.set_postfix_str(f"test acc {res['final_test_acc']:5.1f}%"
                          + (f", diverged at epoch {res['diverged_at']}"
                             if res["diverged_at"] else ""), refresh=False)
        b.update(specs[i].epochs - b.n)
        b.close()
        results[i] = res

    if jobs <= 1 or len(specs) <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, spec in enumerate(specs):
                b = bar(i)
                finish(i, train_run(spec, lambda e, b=b: b.update(e - b.n)))
        finally:
            torch.set_num_threads(previous)
        return results  # type: ignore[return-value]

    ctx = multiprocessing.get_context("spawn")  # fork after OpenMP/torch threads is unsafe
    progress_queue = ctx.Queue()
    # The engine's OpenMP runtime reads OMP_NUM_THREADS when the worker loads it.
    with _env(OMP_NUM_THREADS=threads), futures.ProcessPoolExecutor(
            max_workers=min(jobs, len(specs)), mp_context=ctx, initializer=_worker_init,
            initargs=(threads, progress_queue)) as pool:
        pending = {pool.submit(_worker_run, i, s): i for i, s in enumerate(specs)}
        try:
            while pending:
                done, _ = futures.wait(pending, timeout=0.2,
                                       return_when=futures.FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for f in done:
                    finish(pending.pop(f), f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        finally:
            for b in bars.values():
                b.close()
    return results  # type: ignore[return-value]


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            i, epoch = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        b = bar(i)
        if epoch > b.n:
            b.update(epoch - b.n)


# ============================================================================ summaries
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
                     lr_factors: Sequence[float], init_scales: Sequence[float]
                     ) -> Dict[str, Dict[str, Any]]:
    """Per method: the grid of mean final test accuracy (rows init scale, columns lr factor),
    the number of diverged runs per cell, and summary numbers."""
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
                  "default_lr": METHODS[m].defaults["lr"]}
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


# ============================================================================ records
def machine_info() -> Dict[str, Any]:
    """CPU model, cores, versions: what a result was measured on."""
    from . import build_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "thermo_ext": build_info()}


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


# ============================================================================ figures
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
