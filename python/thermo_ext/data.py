"""Data sets of the experiments, generated in-package and deterministic for a seed.

* :func:`two_spirals`: the paper's planar two-spiral problem (its notebook ``AdLaLa.ipynb``).
* :func:`digits`: scikit-learn's 8×8 handwritten digits (shipped with scikit-learn, no download).
* :func:`mnist1d`: MNIST-1D (Greydanus 2020), built by the ``mnist1d`` package's procedural
  generator on this machine (never downloaded).

Every random draw comes from a ``torch.Generator`` seeded here, never from a global RNG, so the
same seed gives the same data in any process, whatever else has drawn random numbers before.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["spiral_points", "two_spirals", "digits", "mnist1d", "generator"]

Split = Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run (data, init, shuffle, noise, ...).

    Streams of one seed are unrelated to each other and to the streams of other seeds, so
    e.g. the model initialisation of seed 1 does not depend on how much data seed 0 drew.
    """
    h = _splitmix64(seed & _MASK64)
    for ch in stream.encode():
        h = _splitmix64(h ^ ch)
    return h >> 1  # torch.Generator.manual_seed takes values below 2**63 without complaint


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for ``stream`` of ``seed`` (see :func:`derive_seed`)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream))


def spiral_points(n: int, *, turns: float = 4.0, noise: float = 0.02, radius: float = 2.0,
                  power: float = 0.5, generator: torch.Generator) -> Tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """``n`` points of two interleaved spirals: (x of shape (n, 2), labels of shape (n,)).

    As the paper's notebook: t ~ U[0, 1), r = radius · t^power, the first arm at
    (r cos 2π·turns·t^power, r sin 2π·turns·t^power) with label 0, the second arm its point
    reflection through the origin with label 1, and N(0, noise²) added to every coordinate.
    ``power`` = 0.5 spaces the points evenly along the arm's area. The arms get ⌊n/2⌋ and
    ⌈n/2⌉ points; labels come in two blocks (shuffle before batching).
    """
    if n < 2:
        raise ValueError(f"n: expected at least 2 points, got {n}")
    n0 = n // 2
    n1 = n - n0
    t = torch.rand(max(n0, n1), generator=generator, dtype=torch.float64)
    s = t.pow(power)
    angle = 2 * math.pi * turns * s
    arm = torch.stack((radius * s * torch.cos(angle), radius * s * torch.sin(angle)), dim=1)
    x = torch.cat((arm[:n0], -arm[:n1]))
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    y = torch.cat((torch.zeros(n0), torch.ones(n1)))
    return x.float(), y.float()


def two_spirals(train: int = 500, test: int = 1000, *, turns: float = 4.0, noise: float = 0.02,
                radius: float = 2.0, seed: int = 0) -> Split:
    """The paper's spiral problem: ``((x, y), (x_test, y_test))``.

    Defaults as the notebook: 4 turns, noise 0.02, 500 training and 1000 test points (balanced),
    inputs in about [-2, 2]². ``y`` has shape (n, 1) and dtype float32, ready for
    ``BCEWithLogitsLoss(model(x), y)``. Training and test points are independent draws of the
    same distribution, from separate generators of ``seed``.
    """
    train_xy = spiral_points(train, turns=turns, noise=noise, radius=radius,
                             generator=generator(seed, "spiral-train"))
    test_xy = spiral_points(test, turns=turns, noise=noise, radius=radius,
                            generator=generator(seed, "spiral-test"))
    return tuple((x, y.unsqueeze(1)) for x, y in (train_xy, test_xy))  # type: ignore[return-value]


def digits(test_fraction: float = 0.25, *, seed: int = 0) -> Split:
    """scikit-learn's handwritten digits (1797 images of 8×8 pixels, 10 classes).

    A stratified split by ``seed`` (``test_fraction`` of each class held out), inputs
    standardised with the training set's per-pixel mean and standard deviation (pixels constant
    on the training set are only centred). Returns ``((x, y), (x_test, y_test))``, x float32 of
    shape (n, 64), y int64 class indices.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    g = generator(seed, "digits-split")
    train_idx, test_idx = [], []
    for c in range(10):  # stratified: the same fraction of every class in the test set
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(test_fraction * len(idx)))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train_idx = torch.cat(train_idx).sort().values
    test_idx = torch.cat(test_idx).sort().values
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = ((x - mean) / std).float()
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def mnist1d(samples: int = 5000, *, seed: int = 42, train_split: float = 0.8) -> Split:
    """MNIST-1D: 1-D signals of length 40 in 10 classes, from the ``mnist1d`` package's
    procedural generator (``mnist1d.data.make_dataset``), built here, offline.

    The defaults are the package's own (``get_dataset_args()``: 5000 samples, 80 % for
    training, seed 42), which give the standard 4000 training and 1000 test signals of the
    published data set; only ``num_samples``, ``seed`` and ``train_split`` are changed when
    asked. The generator draws from NumPy's and Python's global random states: both are saved
    and restored, so building the data leaves every other random stream as it was. Returns
    ``((x, y), (x_test, y_test))``, x float32 of shape (n, 40) (the generator's normalisation:
    mean 0, standard deviation 1 over the whole set), y int64 class indices.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 20:
        raise ValueError(f"samples: expected an int >= 20 (at least one per class in each "
                         f"split), got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split: expected a number in (0, 1), got {train_split!r}")
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset  # the generator, not the download

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = samples, seed, train_split
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    to_x = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    return (to_x(d["x"]), to_y(d["y"])), (to_x(d["x_test"]), to_y(d["y_test"]))
