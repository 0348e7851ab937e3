"""Hyperparameters in the user's terms (SGD/Adam settings to h, gamma) and schedulers."""

import copy
import math

import pytest
import torch
from torch import nn

import thermo_ext as te


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        yield x, (x.sum(1, keepdim=True) > 0).double()


@pytest.mark.parametrize("lr,momentum", [(0.01, 0.9), (0.05, 0.5), (0.003, 0.99)])
def test_langevin_at_zero_temperature_is_sgd_with_momentum(lr, momentum):
    """BAOAB with tau = 0 and from_sgd's (h, gamma) runs torch's SGD(lr, momentum) step for
    step; its first step starts from p = 0 with B(h/2), i.e. counts the first gradient half."""
    kw = te.from_sgd(lr, momentum)
    assert te.tuning.to_sgd(kw["lr"], kw["gamma"]) == pytest.approx((lr, momentum), rel=1e-12)
    m1, m2 = mlp(), mlp()
    thermo = te.Langevin(m1, tau=0.0, seed=1, **kw)
    sgd = torch.optim.SGD(m2.parameters(), lr=lr, momentum=momentum)
    for k, (x, y) in enumerate(batches(40)):
        for m, opt in ((m1, thermo), (m2, sgd)):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
            if opt is sgd and k == 0:
                for p in m.parameters():
                    p.grad.mul_(0.5)
            opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_from_sgd_per_method():
    h = math.sqrt(2 * 0.01 / 1.9)
    g = -math.log(0.9) / h
    z = dict(mass="unit", momentum_init="zero")  # from rest, as SGD's buffer
    assert te.from_sgd(0.01, 0.9) == pytest.approx({"lr": h, "gamma": g, **z})
    assert te.from_sgd(0.01, 0.9, method="AdL") == pytest.approx({"lr": h, "xi0": g, **z})
    assert te.from_sgd(0.01, 0.9, method="AdLaLa", tau=1e-5) == pytest.approx(
        {"lr": h, "gamma": g, "xi0": g, "tau1": 1e-5, "tau2": 1e-5, **z})
    assert te.from_sgd(0.01, 0.9, method="LaLa", tau=0) == pytest.approx(
        {"lr": h, "gamma": g, "tau": 0.0, **z})
    assert te.from_sgd(0.05, 0.0, method="LOL") == {"lr": math.sqrt(0.1), "gamma": math.inf,
                                                       **z}
    assert te.from_sgd(0.05, 0.8, method="Overdamped") == pytest.approx({"lr": 0.25,
                                                                         "mass": "unit"})
    # The result is keyword arguments for the method.
    opt = te.AdLaLa(mlp(), **te.from_sgd(0.01, 0.9, method="AdLaLa", tau=1e-6))
    assert opt.param_groups[1]["gamma"] == pytest.approx(g)
    assert opt.param_groups[0]["xi0"] == pytest.approx(g)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"),
    (dict(lr=0.1, momentum=1.0), "momentum"), (dict(lr=0.1, momentum=-0.1), "momentum"),
    (dict(lr=0.1, method="Adam"), "method"), (dict(lr=0.1, tau=-1.0), "tau"),
    (dict(lr=0.1, momentum=0.0, method="AdL"), "momentum"), (dict(lr=True), "lr"),
])
def test_from_sgd_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.from_sgd(**kwargs)


@pytest.mark.parametrize("method", ["Langevin", "LaLa", "Overdamped"])
def test_from_adam_runs_adams_step_once_its_bias_correction_has_faded(method):
    """The same gradients fed to torch's Adam and to the method built from from_adam (τ = 0):
    Adam's step divides its first moment by 1 − β1^t and counts the first gradient whole, BAOAB
    counts it half; after 120 steps those differences are below 1e-4 of a step, so the two
    steps agree to 1e-3 (Overdamped: RMSprop's step, Adam with β1 = 0). (AdL's thermostat
    moves its friction away from ξ0 = γ as it runs: it starts as Adam, then differs.)"""
    lr, betas, eps = 3e-3, (0.0 if method == "Overdamped" else 0.9, 0.99), 1e-6
    kw = te.from_adam(lr, betas, eps, method=method)
    assert kw["mass"] == "adaptive" and kw["mass_beta"] == 0.99 and kw["mass_eps"] == eps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    twin.load_state_dict(model.state_dict())
    ours = getattr(te, method)(model, seed=0, **kw)
    adam = torch.optim.Adam(twin.parameters(), lr=lr, betas=betas, eps=eps)
    g = torch.Generator().manual_seed(1)
    for t in range(121):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
        before = [(p.detach().clone(), q.detach().clone())
                  for p, q in zip(model.parameters(), twin.parameters())]
        for p, q, gr in zip(model.parameters(), twin.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        adam.step()
    for (p0, q0), p, q in zip(before, model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach() - p0, q.detach() - q0, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("method", ["Langevin", "LaLa"])
def test_from_adam_first_steps_are_adams(method):
    """momentum_init="terminal" (from_adam's): p starts at the momentum the first gradient would
    hold, so the first step is Adam's bias-corrected one, lr times the gradient's sign, where
    p = 0 gives (1 − β1)/2 = 0.05 of it (B(h/2), then half of A's two moves). After it, step t
    is −lr m̃/(√v̂ + eps) with Adam's v̂ and m̃ = β1^(t−1) g1 + Σ_{s≥2} β1^(t−s) (1 − β1) g_s: the
    first gradient weighed by β1^(t−1) where Adam's m̂ weighs it by β1^(t−1)(1 − β1)/(1 − β1^t)
    (docs/DESIGN.md, Initial momentum). Checked to rounding over 10 fresh gradients. (AdL's
    thermostat moves ξ within the first step already: it starts near Adam, not at it.)"""
    lr, (b1, b2), eps = 1e-3, (0.9, 0.999), 1e-8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    kw = te.from_adam(lr, (b1, b2), eps, method=method)
    assert kw["momentum_init"] == "terminal"
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
             for _ in range(10)]
    flat = [torch.cat([x.flatten() for x in gs]) for gs in grads]

    def steps(make):
        m = copy.deepcopy(model)
        opt = make(m)
        moves = []
        for gs in grads:
            before = [p.detach().clone() for p in m.parameters()]
            for p, gr in zip(m.parameters(), gs):
                p.grad = gr.clone()
            opt.step()
            moves.append(torch.cat([(p.detach() - b).flatten()
                                    for p, b in zip(m.parameters(), before)]))
        return moves

    ours = steps(lambda m: getattr(te, method)(m, seed=0, **kw))
    adam = steps(lambda m: torch.optim.Adam(m.parameters(), lr=lr, betas=(b1, b2), eps=eps))
    zero = steps(lambda m: getattr(te, method)(m, seed=0, **dict(kw, momentum_init="zero")))
    torch.testing.assert_close(ours[0], adam[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(ours[0], -lr * flat[0].sign(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zero[0], 0.05 * adam[0], rtol=1e-9, atol=0)
    m_t, v = flat[0].clone(), torch.zeros_like(flat[0])
    for t, gt in enumerate(flat, start=1):
        if t > 1:
            m_t = b1 * m_t + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt * gt
        expected = -lr * m_t / ((v / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(ours[t - 1], expected, rtol=1e-9, atol=1e-15)


def test_from_adam_values_and_refusals():
    kw = te.from_adam(1e-3)
    h = math.sqrt(2 * 1e-3 * 0.1 / 1.9)
    assert kw == pytest.approx(dict(lr=h, gamma=-math.log(0.9) / h, tau=0.0, mass="adaptive",
                                    mass_beta=0.999, mass_eps=1e-8, momentum_init="terminal"))
    assert te.tuning.to_sgd(kw["lr"], kw["gamma"]) == pytest.approx((1e-4, 0.9))  # lr (1 - β1)
    kw = te.from_adam(1e-3, weight_decay=0.01, method="AdLaLa", tau=1e-7)
    assert kw["xi0"] == kw["gamma"] and kw["tau1"] == kw["tau2"] == 1e-7
    assert kw["sigma"] == pytest.approx(math.sqrt(2 * 1e-7 * kw["gamma"]))  # ξ* = σ²/(2τ) = γ
    assert te.from_adam(1e-3, method="AdL")["sigma"] == 0.0  # τ = 0: no thermostat noise
    assert kw["weight_decay"] == 0.01
    assert te.from_adam(2e-3, method="Overdamped")["lr"] == 2e-3
    assert "momentum_init" not in te.from_adam(2e-3, method="Overdamped")  # no momentum
    for bad, match in [(dict(lr=0.0), "lr"), (dict(betas=(0.9,)), "betas"),
                       (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(eps=0), "eps"),
                       (dict(betas=(0.0, 0.9), method="AdL"), "betas"),
                       (dict(tau=-1.0), "tau")]:
        with pytest.raises(ValueError, match=match):
            te.from_adam(**bad)


def test_temperature_scheduler_needs_a_thermo_optimizer():
    m = mlp()
    with pytest.raises(TypeError, match="thermo_ext optimizer.*Adam"):
        te.TemperatureScheduler(torch.optim.Adam(m.parameters()), lambda s: 1.0)
    with pytest.raises(TypeError, match="thermo_ext optimizer"):
        te.TemperatureScheduler("opt", lambda s: 1.0)
    opt = te.LaLa(m, tau=1e-4)
    sched = te.TemperatureScheduler(opt, lambda s: 1.0 - s / 10)
    for _ in range(5):
        sched.step()
    assert sched.get_last_tau() == pytest.approx([0.5e-4, 0.5e-4])


@pytest.mark.parametrize("make", [
    lambda opt, **k: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=20, **k),
    lambda opt, **k: torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.2, step_size_up=5, **k),
])
def test_cyclic_schedulers(make):
    """They drive h like any lr; their default momentum cycling needs a 'momentum' the thermo
    optimizers do not have, and torch's error names the option to turn off."""
    m = mlp()
    with pytest.raises(ValueError, match="cycle_momentum"):
        make(te.AdLaLa(m))
    opt = te.AdLaLa(m, seed=1)
    sched = make(opt, cycle_momentum=False)
    ref = torch.optim.SGD(mlp().parameters(), lr=0.1)
    ref_sched = make(ref, cycle_momentum=False)
    for x, y in batches(12):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        opt.step()
        sched.step()
        ref.step()
        ref_sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [ref.param_groups[0]["lr"]] * 2)
    assert all(torch.isfinite(p).all() for p in m.parameters())
