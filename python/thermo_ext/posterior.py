"""Using a sampler's trajectory as a Bayesian posterior.

* :class:`PosteriorPredictive`: the posterior predictive (Bayesian model average) on fixed
  inputs, streamed along the trajectory: a running average of ``transform(model(inputs))``
  over the iterates, with burn-in and thinning, storing no weights.
* :func:`posterior_temperature` and :func:`prior_weight_decay`: the τ (and the weight decay)
  that make the dynamics sample the Bayesian posterior of a data set of N points, whatever the
  loss's reduction (docs/GUIDE.md, "Tempering: the posterior of your data set").
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .chains import Chains

__all__ = ["PosteriorPredictive", "posterior_temperature", "prior_weight_decay", "REDUCTIONS"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


class PosteriorPredictive:
    """The running average of ``transform(model(inputs))`` over a trajectory's samples.

    A sampler's iterates θ₁, θ₂, ... are (correlated) draws from its stationary distribution;
    the posterior predictive on the inputs x is p(y | x) ≈ (1/S) Σₛ p(y | x, θₛ). Call
    :meth:`update` once per optimizer step (or per epoch: the unit of ``burn_in`` and ``thin``
    is the call); every ``thin``-th call after the first ``burn_in`` evaluates the model on
    ``inputs`` and adds ``transform(output)`` to a running sum, the other calls do nothing (no
    forward pass). Only the sum, in ``dtype``, and two counters are kept: never a weight.

    Call t (1-based) is a sample iff ``t > burn_in`` and ``(t - burn_in) % thin == 0``, so after
    T calls there are ``max(0, (T - burn_in) // thin)`` samples.

    Args:
        model: an ``nn.Module``, or a :class:`te.Chains` of K chains: then every sample adds
            the K chains' transformed outputs (the average is over chains and time).
        inputs: the inputs to predict on, a tensor or a sequence of tensors (``model(*inputs)``);
            held by reference, not copied.
        transform: applied to the model's output (for Chains: the stacked output, leading dim K,
            which it must keep). Default: the class probabilities ``softmax(output, dim=-1)``,
            computed in ``dtype``; for a model with one logit per point (binary) pass
            ``torch.sigmoid``. Any function of the output works (e.g. the output itself for a
            regression's predictive mean, or its square for the second moment).
        burn_in: calls to skip before the first sample (default 0).
        thin: keep every ``thin``-th call after the burn-in (default 1: every call).
        batch_size: evaluate ``inputs`` in slices of this many rows (default: all at once); the
            transform must then act on each row separately (softmax and sigmoid do).
        dtype: the floating dtype of the running sum and of :meth:`mean` (default float64, so
            that thousands of samples add up without float32 rounding).

    The model is evaluated under ``torch.no_grad()`` in eval mode (dropout off, batch norm
    using its running statistics) and put back in the mode it was in. ``state_dict()`` /
    ``load_state_dict()`` carry the sum and the counters, so a run resumed from a checkpoint
    (with the optimizer's state, which continues bitwise) continues the average bitwise.
    """

    def __init__(self, model: nn.Module, inputs: Inputs, *,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 burn_in: int = 0, thin: int = 1, batch_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float64):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module or a te.Chains, got "
                            f"{type(model).__name__}")
        if isinstance(inputs, torch.Tensor):
            inputs_tuple: Tuple[torch.Tensor, ...] = (inputs,)
        elif isinstance(inputs, (list, tuple)) and inputs and all(
                isinstance(t, torch.Tensor) for t in inputs):
            inputs_tuple = tuple(inputs)
        else:
            raise TypeError(f"inputs: expected a tensor or a non-empty sequence of tensors, got "
                            f"{type(inputs).__name__}")
        rows = {t.shape[0] if t.dim() else None for t in inputs_tuple}
        if batch_size is not None and (None in rows or len(rows) != 1):
            raise ValueError("inputs: with batch_size every input must have the same number of "
                             "rows (dim 0) to slice")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable, got {type(transform).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.model = model
        self.inputs = inputs_tuple
        self.transform = transform
        self.burn_in = _count("burn_in", burn_in, 0)
        self.thin = _count("thin", thin, 1)
        self.batch_size = None if batch_size is None else _count("batch_size", batch_size, 1)
        self.dtype = dtype
        self.chains = model.num_chains if isinstance(model, Chains) else None
        self.calls = 0      # update() calls so far
        self.samples = 0    # iterates averaged (per chain)
        self._sum: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ sampling
    def is_sample(self, call: int) -> bool:
        """Whether call number ``call`` (1-based) is a sample."""
        return call > self.burn_in and (call - self.burn_in) % self.thin == 0

    @property
    def num_averaged(self) -> int:
        """Predictions in the average: samples × chains."""
        return self.samples * (self.chains or 1)

    def _transform(self, out: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            y = self.transform(out)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"transform: expected it to return a tensor, got "
                                f"{type(y).__name__}")
            return y.to(self.dtype)
        if out.dim() == 0 or out.shape[-1] == 1:
            raise ValueError(f"transform: the model's output has shape {tuple(out.shape)}, one "
                             f"value per point, and the default softmax over its last dim would "
                             f"be 1 everywhere; pass transform=torch.sigmoid for a binary logit "
                             f"(or another function of the output)")
        return torch.softmax(out.to(self.dtype), dim=-1)

    @torch.no_grad()
    def _evaluate(self) -> torch.Tensor:
        """transform(model(inputs)), summed over chains for a Chains model."""
        if self.batch_size is None:
            pieces = [self._transform(self.model(*self.inputs))]
        else:
            n = self.inputs[0].shape[0]
            pieces = [self._transform(self.model(*(t[i:i + self.batch_size]
                                                   for t in self.inputs)))
                      for i in range(0, n, self.batch_size)]
        dim = 1 if self.chains is not None else 0
        if self.chains is not None:
            for y in pieces:
                if y.dim() == 0 or y.shape[0] != self.chains:
                    raise ValueError(f"transform: with a Chains model its result must keep the "
                                     f"leading chain dim of size {self.chains}, got shape "
                                     f"{tuple(y.shape)}")
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
        return y.sum(0) if self.chains is not None else y

    def update(self) -> bool:
        """Counts one call; on a sample call evaluates the model and adds its transformed output
        to the average. Returns whether this call was a sample. A call that raises (a bad
        transform, an output whose shape changed) changes nothing."""
        call = self.calls + 1
        if not self.is_sample(call):
            self.calls = call
            return False
        was_training = self.model.training
        self.model.eval()
        try:
            y = self._evaluate()
        finally:
            self.model.train(was_training)
        if self._sum is None:
            total = y.clone()
        else:
            if y.shape != self._sum.shape:
                raise ValueError(f"the transformed output has shape {tuple(y.shape)}, the "
                                 f"average so far {tuple(self._sum.shape)}: inputs or model "
                                 f"changed")
            total = self._sum.to(y.device).add_(y)
        self._sum = total
        self.samples += 1
        self.calls = call
        return True

    def mean(self) -> torch.Tensor:
        """The average of the transformed outputs over every sample (and chain) so far: the
        posterior predictive on ``inputs`` (a new tensor, in ``dtype``)."""
        if self._sum is None:
            raise RuntimeError(f"PosteriorPredictive: no sample yet ({self.calls} call(s) of "
                               f"update(), burn_in={self.burn_in}, thin={self.thin}: the first "
                               f"sample is call {self.burn_in + self.thin})")
        return self._sum / self.num_averaged

    def reset(self) -> None:
        """Forgets every sample and call (e.g. to start a new burn-in after a change of τ)."""
        self.calls, self.samples, self._sum = 0, 0, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"calls": self.calls, "samples": self.samples, "burn_in": self.burn_in,
                "thin": self.thin, "chains": self.chains,
                "sum": None if self._sum is None else self._sum.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`. It must come from an average with the same
        ``burn_in``, ``thin``, number of chains and ``dtype``; anything else raises ValueError
        and nothing changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from state_dict(), got "
                            f"{type(state).__name__}")
        keys = {"calls", "samples", "burn_in", "thin", "chains", "sum"}
        if set(state) != keys:
            raise ValueError(f"state: expected the keys {sorted(keys)}, got {sorted(state)}")
        calls = _count("state['calls']", state["calls"], 0)
        samples = _count("state['samples']", state["samples"], 0)
        for key in ("burn_in", "thin", "chains"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state['{key}']: the saved average has {key}={state[key]!r}, "
                                 f"this one {getattr(self, key)!r}; construct it with the "
                                 f"same value to continue it")
        expected = max(0, (calls - self.burn_in) // self.thin)
        if samples != expected:
            raise ValueError(f"state['samples']: {samples} samples after {calls} calls is "
                             f"inconsistent with burn_in={self.burn_in}, thin={self.thin} "
                             f"(expected {expected})")
        total = state["sum"]
        if (total is None) != (samples == 0):
            raise ValueError(f"state['sum']: expected {'None' if samples == 0 else 'a tensor'} "
                             f"with {samples} samples, got {type(total).__name__}")
        if total is not None:
            if not isinstance(total, torch.Tensor) or total.dtype != self.dtype:
                raise ValueError(f"state['sum']: expected a {self.dtype} tensor, got "
                                 f"{getattr(total, 'dtype', type(total).__name__)}")
            if self._sum is not None and total.shape != self._sum.shape:
                raise ValueError(f"state['sum']: shape {tuple(total.shape)} differs from this "
                                 f"average's {tuple(self._sum.shape)}")
            total = total.clone()
        self.calls, self.samples, self._sum = calls, samples, total

    def __repr__(self) -> str:
        chains = f", chains={self.chains}" if self.chains else ""
        return (f"PosteriorPredictive(calls={self.calls}, samples={self.samples}, "
                f"burn_in={self.burn_in}, thin={self.thin}{chains})")


# ====================================================================== tempering
#: How the loss that is backpropagated is formed from the per-point losses ℓᵢ = −log p(yᵢ|xᵢ,θ).
REDUCTIONS = {
    "mean": "the mean over the minibatch, (1/n) Σ_batch ℓᵢ (torch's default reduction)",
    "sum": "the sum over the minibatch, Σ_batch ℓᵢ (reduction='sum')",
    "dataset": "the minibatch sum scaled to the whole data set, (N/n) Σ_batch ℓᵢ (the usual "
               "SG-MCMC convention)",
}


def _scale(n_data: int, reduction: str, batch_size: Optional[int]) -> float:
    """c such that the loss the optimizer sees estimates c · Σ_{i=1..N} ℓᵢ (in expectation over
    the minibatch)."""
    n_data = _count("n_data", n_data, 1)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got "
                         f"{reduction!r}")
    if reduction == "sum":
        if batch_size is None:
            raise ValueError("batch_size: required with reduction='sum' (the loss of a minibatch "
                             "of n points estimates n/N of the data set's summed loss)")
        batch_size = _count("batch_size", batch_size, 1)
        if batch_size > n_data:
            raise ValueError(f"batch_size: expected at most n_data={n_data}, got {batch_size}")
        return batch_size / n_data
    if batch_size is not None:
        _count("batch_size", batch_size, 1)  # accepted (and checked), not needed
    return 1.0 / n_data if reduction == "mean" else 1.0


def posterior_temperature(n_data: int, *, reduction: str = "mean",
                          batch_size: Optional[int] = None, temperature: float = 1.0) -> float:
    """The τ at which the dynamics sample the (tempered) Bayesian posterior of N data points.

    The optimizers sample exp(−L(θ)/τ), where L is the loss you backpropagate (plus weight
    decay, below). The Bayesian posterior of N points is p(θ | D) ∝ exp(−Σᵢ ℓᵢ(θ)) p(θ), with
    ℓᵢ = −log p(yᵢ | xᵢ, θ), the per-point loss (cross-entropy is one); a *tempered* posterior
    raises it to the power 1/T: exp(−Σᵢ ℓᵢ/T), T < 1 "cold", T = 1 the posterior itself. If the
    loss estimates c · Σᵢ ℓᵢ, then exp(−L/τ) = exp(−Σᵢ ℓᵢ/T) when τ = c·T:

    ==============  ==========================================  ============  ============
    ``reduction``   the loss L of a minibatch of n points        c             τ (T = 1)
    ==============  ==========================================  ============  ============
    ``"mean"``      (1/n) Σ_batch ℓᵢ (torch's default)           1/N           1/N
    ``"sum"``       Σ_batch ℓᵢ (``reduction="sum"``)             n/N           n/N
    ``"dataset"``   (N/n) Σ_batch ℓᵢ (SG-MCMC papers)            1             1
    ==============  ==========================================  ============  ============

    So with the usual mean loss, τ = T/N: ``posterior_temperature(50_000)`` is 2e-5 for the
    posterior of 50 000 points, and anything below is a cold posterior
    (``temperature=0.1`` gives 2e-6). The minibatch gradient only estimates the full one; the
    thermostats of AdL (and AdLaLa's first layer) absorb its extra noise, the other schemes
    run hotter than τ by an amount that grows with the step h and the gradient's noise.

    Pass the same τ to every partition (``tau1`` and ``tau2`` of AdLaLa and LOL, every layer of
    LaLa): partitions at different temperatures do not sample one tempered posterior. A prior
    is :func:`prior_weight_decay`. Note the scale: near a mode the d parameters carry about
    d·τ/2 of loss (docs/GUIDE.md §2.2), i.e. d/(2N) per data point at T = 1, so an
    over-parameterised net at T = 1 sits well above its training loss's minimum; that is the
    posterior's width, and why cold posteriors (T < 1) are common in practice.

    Args:
        n_data: N, the number of training points the posterior is conditioned on.
        reduction: how the loss is formed from the per-point losses (table above).
        batch_size: n, the minibatch size; needed only for ``reduction="sum"``.
        temperature: T > 0 (or 0, the deterministic limit): 1 for the posterior, < 1 cold.

    Returns:
        τ as a float, for the ``tau`` (``tau1``, ``tau2``) argument of the methods.
    """
    c = _scale(n_data, reduction, batch_size)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (1 for the posterior, "
                         f"< 1 for a cold one), got {temperature!r}")
    return c * float(temperature)


def prior_weight_decay(prior_std: float, n_data: int, *, reduction: str = "mean",
                       batch_size: Optional[int] = None) -> float:
    """The ``weight_decay`` λ that puts a Gaussian prior N(0, prior_std²) on every parameter.

    With weight decay the optimizers sample exp(−(L + λ|θ|²/2)/τ). The tempered posterior with
    prior N(0, s²) is exp(−(Σᵢ ℓᵢ + |θ|²/(2s²))/T) (the prior tempered too, the usual
    definition of a cold posterior). With L ≈ c·Σᵢ ℓᵢ and τ = c·T
    (:func:`posterior_temperature`) the two agree when λ = c/s², whatever T:
    1/(N s²) for the mean loss, n/(N s²) for the minibatch sum, 1/s² for the data-set scaled
    loss.

    Args:
        prior_std: s > 0, the prior's standard deviation per parameter.
        n_data, reduction, batch_size: as for :func:`posterior_temperature`.
    """
    if (isinstance(prior_std, bool) or not isinstance(prior_std, numbers.Real)
            or not math.isfinite(prior_std) or prior_std <= 0):
        raise ValueError(f"prior_std: expected a finite number > 0, got {prior_std!r}")
    return _scale(n_data, reduction, batch_size) / float(prior_std) ** 2
