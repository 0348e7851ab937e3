"""Backpropagation written out for the tasks' Linear-ReLU-Linear nets (no autograd)."""

from __future__ import annotations

import torch
from torch import nn

from .tasks import Task

__all__ = ["MLPGradient"]


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
