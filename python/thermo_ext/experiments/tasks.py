"""The problems of the comparison: the paper's two spirals and scikit-learn's digits.

A task says what data a seed draws, which network is trained, its loss, and how a prediction is
scored; :func:`init_model` draws the network's initial parameters from the run's seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as te_data

__all__ = ["LOSS_FORMS", "SpiralTask", "DigitsTask", "Task", "init_model"]


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

