"""Sampling physics: the engine's stationary covariance on a harmonic potential equals the exact
stationary covariance of the linear map the folded scheme defines.

U(θ) = k θ²/2 on 10^5 independent elements, so the gradient is k θ. One later step of a folded
scheme is an affine map x' = M x + noise with x = (θ, p) (the stored parameter and momentum);
its stationary covariance solves the discrete Lyapunov equation Σ = M Σ Mᵀ + Q. The maps are
written here letter by letter from docs/DESIGN.md, Letters, in the order the engine runs them (the folded string),
and checked against the package's folded programs. Step sizes are near the stability limits
(h = 1.5 with k = 1, limit 2), where the discretisation bias is large and scheme-specific, so a
wrong letter order, delta or noise amplitude shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import solve_discrete_lyapunov

from thermo_ext import kernels
from thermo_ext.schemes import fold

N = 100_000
K = 1.0
H = 1.5


def letter_map(letter, delta, *, k, gamma, tau):
    """(M, s) of one letter on (θ, p): x' = M x + s R, R a fresh standard normal."""
    if letter == "A":
        return np.array([[1.0, delta], [0.0, 1.0]]), np.zeros(2)
    if letter == "B":
        return np.array([[1.0, 0.0], [-delta * k, 1.0]]), np.zeros(2)
    if letter == "O":
        if math.isinf(gamma):
            a, b = 0.0, math.sqrt(tau)
        else:
            a, b = math.exp(-gamma * delta), math.sqrt(tau * (1 - math.exp(-2 * gamma * delta)))
        return np.array([[1.0, 0.0], [0.0, a]]), np.array([0.0, b])
    if letter == "V":  # overdamped Euler–Maruyama: θ' = θ − δ k θ + √(2 δ τ) R
        return np.array([[1.0 - delta * k, 0.0], [0.0, 0.0]]), np.array([math.sqrt(2 * delta * tau),
                                                                        0.0])
    raise ValueError(letter)


def step_map(program, *, k, gamma, tau):
    """Composes letters (first applied first) into x' = M x + noise with covariance Q."""
    m = np.eye(2)
    q = np.zeros((2, 2))
    for letter, delta in program:
        lm, s = letter_map(letter, delta, k=k, gamma=gamma, tau=tau)
        m = lm @ m
        q = lm @ q @ lm.T + np.outer(s, s)
    return m, q


# The later-step programs the engine runs (the folded strings of docs/DESIGN.md, Folding, with the tail's B merged).
LATER = {
    "langevin": [("B", H), ("A", H / 2), ("O", H), ("A", H / 2)],            # B·BAOA
    "OBABO": [("B", H / 2), ("O", H / 2), ("O", H / 2), ("B", H / 2), ("A", H)],  # BO·OBA
    "ABOBA": [("B", H / 2), ("O", H), ("B", H / 2), ("A", H)],               # BOBAA
    "overdamped": [("V", H)],
}


def test_hand_written_programs_are_the_folded_ones():
    for scheme, prog in LATER.items():
        got = [(x.letter, x.factor * H) for x in fold(scheme).program(False)]
        assert [a for a, _ in got] == [a for a, _ in prog], scheme
        assert [b for _, b in got] == pytest.approx([b for _, b in prog]), scheme


def test_lyapunov_maps_have_the_known_marginals():
    # sanity of the maps themselves: BAOAB samples θ exactly (Var θ = τ/k for any h, γ);
    # velocity Verlet (OBABO) gives τ / (k (1 − h² k / 4)); Euler–Maruyama 2τ / (k (2 − h k)).
    tau = 0.7
    for gamma in (1.0, math.inf):
        m, q = step_map(LATER["langevin"], k=K, gamma=gamma, tau=tau)
        assert solve_discrete_lyapunov(m, q)[0, 0] == pytest.approx(tau / K, rel=1e-12)
    m, q = step_map(LATER["OBABO"], k=K, gamma=1.0, tau=tau)
    assert solve_discrete_lyapunov(m, q)[0, 0] == pytest.approx(tau / (K * (1 - H * H * K / 4)))
    m, q = step_map(LATER["overdamped"], k=K, gamma=1.0, tau=tau)
    assert solve_discrete_lyapunov(m, q)[0, 0] == pytest.approx(2 * tau / (K * (2 - H * K)))


CASES = [
    # scheme, gamma, tau
    ("langevin", 1.0, 1.0),
    ("langevin", 1.0, 0.1),
    ("langevin", math.inf, 0.1),  # LOL's overdamped partition
    ("OBABO", 1.0, 1.0),
    ("ABOBA", 1.0, 0.1),
    ("overdamped", 1.0, 1.0),
    ("overdamped", 1.0, 0.1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scheme,gamma,tau", CASES)
def test_stationary_covariance_matches_lyapunov(scheme, gamma, tau, dtype):
    m, q = step_map(LATER[scheme], k=K, gamma=gamma, tau=tau)
    rho = max(abs(np.linalg.eigvals(m)))
    assert rho < 0.95, f"{scheme}: h = {H} is not safely stable (spectral radius {rho})"
    sigma = solve_discrete_lyapunov(m, q)
    folded = fold(scheme)
    momentum = folded.uses_momentum

    theta = torch.zeros(N, dtype=dtype)
    p = torch.zeros(N, dtype=kernels.momentum_dtype(dtype)) if momentum else None
    kw = dict(scheme=folded, lr=H, gamma=gamma, tau=tau, sigma=0.0, eps=0.0, weight_decay=0.0,
              xi=None, segments=[0], seed=2024, uids=[(1 << 16) | 2], offsets=[0])

    # burn-in from (0, 0) until the transient is below 1e-6 of the stationary covariance
    burn = int(math.ceil(math.log(1e-6) / math.log(rho))) + 5
    every, snapshots = 4, 12
    acc = np.zeros((2, 2))
    step = 0
    for _ in range(burn + every * snapshots):
        grad = K * theta
        assert kernels.thermo_step([theta], [p], [grad], step=step, first=step == 0, **kw) is None
        step += 1
        if step > burn and (step - burn) % every == 0:
            x = np.stack([theta.double().numpy(),
                          p.double().numpy() if momentum else np.zeros(N)])
            acc += x @ x.T / N  # the mean is zero
    emp = acc / snapshots

    assert emp[0, 0] == pytest.approx(sigma[0, 0], rel=0.03), (emp, sigma)
    if momentum:
        assert emp[1, 1] == pytest.approx(sigma[1, 1], rel=0.03), (emp, sigma)
        scale = math.sqrt(sigma[0, 0] * sigma[1, 1])
        assert abs(emp[0, 1] - sigma[0, 1]) < 0.03 * scale, (emp, sigma)
    # the sampled means are zero too (five standard errors of one snapshot)
    assert abs(float(theta.double().mean())) < 5 * math.sqrt(sigma[0, 0] / N)


def test_covariance_check_can_fail():
    # the same comparison against the map of a wrong letter order (BAOAB run unfolded, i.e.
    # the stored p after the closing B) gives a clearly different answer at this step size
    m, q = step_map(LATER["langevin"], k=K, gamma=1.0, tau=1.0)
    right = solve_discrete_lyapunov(m, q)
    wrong_prog = [("B", H / 2), ("A", H / 2), ("O", H), ("A", H / 2), ("B", H / 2)]
    m2, q2 = step_map(wrong_prog, k=K, gamma=1.0, tau=1.0)
    wrong = solve_discrete_lyapunov(m2, q2)
    assert abs(wrong[1, 1] - right[1, 1]) > 0.1 * right[1, 1]
