"""The optimizer: torch.optim behaviour, parity with the reference, exact resume."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import helpers as H
import thermo_ext as te
from thermo_ext import random as te_random
from thermo_ext.calls import init_momentum
from thermo_ext.schemes import fold

METHODS = {
    "AdLaLa": lambda m, **k: te.AdLaLa(m, **k),
    "LOL": lambda m, **k: te.LOL(m, **k),
    "LaLa": lambda m, **k: te.LaLa(m, **k),
    "Langevin": lambda m, **k: te.Langevin(m, **k),
    "AdL": lambda m, **k: te.AdL(m, **k),
    "Overdamped": lambda m, **k: te.Overdamped(m, **k),
}


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def snapshot(model, opt):
    moms = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()
            if "momentum_buffer" in opt.state[p]]
    xis = [x.clone() for g in opt.thermostats() for x in g]
    return flat(model).clone(), moms, xis


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_named_method_matches_reference_over_50_steps(name, dtype):
    x, y = H.batch(dtype=dtype)
    out = []
    for backend in ("engine", "reference"):
        m = H.relu_mlp(dtype=dtype)
        opt = METHODS[name](m, seed=123, backend=backend)
        H.train(m, opt, 50, x, y)
        out.append(snapshot(m, opt))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out[0][0], out[1][0], **tol)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(out[0][2], out[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_paper_preset_is_the_papers():
    m = H.relu_mlp()
    opt = te.AdLaLa(m, preset="paper")
    g1, g2 = opt.param_groups
    assert (g1["scheme"], g2["scheme"]) == ("adl", "langevin")
    assert g1["lr"] == g2["lr"] == 0.25
    assert g1["tau"] == g2["tau"] == 1e-4
    assert g2["gamma"] == 0.1 and g1["sigma"] == 0.01 and g1["eps"] == 0.05
    assert g1["xi0"] == 0.1
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    lol = te.LOL(m, preset="paper")
    assert lol.param_groups[1]["gamma"] == math.inf
    assert [g["lr"] for g in lol.param_groups] == [0.25, 0.25]
    assert lol.param_groups[0]["gamma"] == 0.1
    lala = te.LaLa(m, gamma=[0.1, 0.2, 0.3], tau=1e-3, preset="paper")
    assert [g["lr"] for g in lala.param_groups] == [0.25] * 3
    assert [g["gamma"] for g in lala.param_groups] == [0.1, 0.2, 0.3]
    assert [g["tau"] for g in lala.param_groups] == [1e-3] * 3


def test_adlala_first_step_by_hand():
    """The paper code's first step: stepMom (B with h/2, p from 0) then stepAOA, by hand."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    x, y = H.batch(dtype=torch.float64)
    h, tau, gamma, sigma, eps, xi0, seed = 0.25, 1e-4, 0.1, 0.01, 0.05, 0.1, 99
    opt = te.AdLaLa(m, lr=h, tau1=tau, tau2=tau, gamma=gamma, sigma=sigma, eps=eps, xi0=xi0,
                    seed=seed, mass="unit", momentum_init="zero")
    nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
    theta0 = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()

    def R(gi, pos, n, draw):
        return te_random.normal(n, seed=seed, uid=(gi << 16) | pos, step=0, draw=draw).double()

    expect = []
    # Partition 1, adaptive Langevin, per tensor xi: B(h/2) then A C D E D C A.
    for pos in range(2):
        th, g = theta0[pos].flatten(), grads[pos].flatten()
        p = -h / 2 * g
        th = th + h / 2 * p
        p = math.exp(-xi0 * h / 2) * p
        p = p + sigma * math.sqrt(h / 2) * R(0, pos, p.numel(), 0)
        xi = xi0 + h * eps * (float((p * p).sum()) - p.numel() * tau)
        p = p + sigma * math.sqrt(h / 2) * R(0, pos, p.numel(), 1)
        p = math.exp(-xi * h / 2) * p
        th = th + h / 2 * p
        expect.append(th)
        assert float(opt.thermostats()[0][pos]) == pytest.approx(xi, rel=1e-12)
    # Partition 2, Langevin: B(h/2) A(h/2) O(h) A(h/2).
    a = math.exp(-gamma * h)
    b = math.sqrt(tau * (1 - math.exp(-2 * gamma * h)))
    for pos in range(2):
        th, g = theta0[2 + pos].flatten(), grads[2 + pos].flatten()
        p = -h / 2 * g
        th = th + h / 2 * p
        p = a * p + b * R(1, pos, p.numel(), 0)
        th = th + h / 2 * p
        expect.append(th)
    torch.testing.assert_close(flat(m), torch.cat(expect), rtol=1e-13, atol=1e-15)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import thermo_ext as te
    path, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = te.AdLaLa(m, seed=1)
    ck = torch.load(path)
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, generator=g)
    y = (x[:, :1] * x[:, 1:] > 0).float()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in m.parameters()], path + ".out")
""")


def test_resume_in_a_fresh_process_is_bitwise(tmp_path):
    x, y = H.batch()
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=7)
    H.train(m, opt, 10, x, y)
    path = str(tmp_path / "ck.pt")
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, path)
    H.train(m, opt, 15, x, y)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    subprocess.run([sys.executable, str(script), path, "15"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    resumed = torch.load(path + ".out")
    for a, b in zip(m.parameters(), resumed):
        assert torch.equal(a.detach(), b)


def test_state_dict_roundtrip_carries_momenta_xi_seed_step():
    x, y = H.batch()
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=11)
    H.train(m, opt, 3, x, y)
    sd = opt.state_dict()
    m2 = H.relu_mlp()
    m2.load_state_dict(m.state_dict())
    opt2 = te.AdLaLa(m2, seed=5)  # the loaded seed wins
    opt2.load_state_dict(sd)
    assert [g["step"] for g in opt2.param_groups] == [3, 3]
    assert [g["seed"] for g in opt2.param_groups] == [11, 11]
    H.train(m, opt, 4, x, y)
    H.train(m2, opt2, 4, x, y)
    assert torch.equal(flat(m), flat(m2))
    assert opt2.param_groups[0]["xi"] is not opt.param_groups[0]["xi"]


def test_seed_reproducibility_and_difference():
    x, y = H.batch()
    runs = []
    for s in (3, 3, 4):
        torch.manual_seed(s)
        m = H.relu_mlp()
        torch.manual_seed(s)
        opt = te.Langevin(m, tau=1e-2)
        H.train(m, opt, 5, x, y)
        runs.append(flat(m))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    torch.manual_seed(3)
    a = te.Thermo(H.relu_mlp().parameters()).param_groups[0]["seed"]
    torch.manual_seed(3)
    b = te.Thermo(H.relu_mlp().parameters()).param_groups[0]["seed"]
    assert a == b and 0 <= a < 2**64


def test_different_seed_same_init_different_noise():
    x, y = H.batch()
    out = []
    for seed in (1, 2):
        m = H.relu_mlp()
        H.train(m, te.Langevin(m, tau=1e-2, seed=seed), 3, x, y)
        out.append(flat(m))
    assert not torch.equal(out[0], out[1])


def test_lr_scheduler_changes_h():
    x, y = H.batch()
    m1, m2 = H.relu_mlp(), H.relu_mlp()
    o1 = te.Langevin(m1, lr=0.2, seed=1)
    o2 = te.Langevin(m2, lr=0.2, seed=1)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    for k in range(4):
        H.train(m1, o1, 1, x, y)
        sched.step()
        H.train(m2, o2, 1, x, y)
        o2.param_groups[0]["lr"] = 0.2 * 0.5 ** (k + 1)
    assert o1.param_groups[0]["lr"] == pytest.approx(0.2 / 16)
    assert torch.equal(flat(m1), flat(m2))
    m3 = H.relu_mlp()
    H.train(m3, te.Langevin(m3, lr=0.2, seed=1), 4, x, y)
    assert not torch.equal(flat(m1), flat(m3))


def test_temperature_scheduler_and_zero_temperature():
    m = H.relu_mlp()
    opt = te.LaLa(m, tau=[1e-2, 2e-2, 3e-2])
    sched = te.TemperatureScheduler(opt, lambda k: 0.5 ** k)
    assert sched.get_last_tau() == pytest.approx([1e-2, 2e-2, 3e-2])
    sched.step()
    sched.step()
    assert sched.get_last_tau() == pytest.approx([2.5e-3, 5e-3, 7.5e-3])
    with pytest.raises(ValueError, match="factor"):
        te.TemperatureScheduler(opt, lambda k: -1.0)
    assert sched.get_last_tau() == pytest.approx([2.5e-3, 5e-3, 7.5e-3])
    # tau = 0: deterministic dynamics, the seed does not matter.
    x, y = H.batch()
    out = []
    for seed in (1, 2):
        m = H.relu_mlp()
        opt = te.AdLaLa(m, tau1=0.0, tau2=0.0, sigma=0.0, seed=seed)
        H.train(m, opt, 5, x, y)
        out.append(flat(m))
    assert torch.equal(out[0], out[1])


def test_tau_schedule_is_used_by_the_step():
    x, y = H.batch()
    m1, m2 = H.relu_mlp(), H.relu_mlp()
    o1 = te.Langevin(m1, tau=1e-2, seed=4)
    o2 = te.Langevin(m2, tau=1e-3, seed=4)
    te.TemperatureScheduler(o1, lambda k: 0.1)
    H.train(m1, o1, 3, x, y)
    H.train(m2, o2, 3, x, y)
    torch.testing.assert_close(flat(m1), flat(m2), rtol=0, atol=1e-7)


def test_swa_averaged_model_gives_posterior_mean_predictions():
    x, y = H.batch()
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=2)
    avg = torch.optim.swa_utils.AveragedModel(m)
    snaps = []
    for _ in range(20):
        H.train(m, opt, 1, x, y)
        avg.update_parameters(m)
        snaps.append(flat(m).clone())
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in avg.module.parameters()]),
                               torch.stack(snaps).mean(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert avg(x).shape == (32, 1)


def equipartition(scheme, **kw):
    n = 100_000
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(n) * 0.01)
    opt = te.Thermo([theta], scheme=scheme, seed=5, **kw)
    temps = []
    for k in range(3000):
        theta.grad = theta.detach().clone()  # U = theta^2 / 2
        opt.step()
        if k >= 1500 and k % 10 == 0:
            temps.append(float(opt.kinetic_temperature()[0]))
    return sum(temps) / len(temps)


def test_equipartition_langevin():
    tau = 1e-3
    assert equipartition("langevin", lr=0.2, gamma=1.0, tau=tau) == pytest.approx(tau, rel=0.03)


def test_equipartition_adl():
    # eps N = 1 keeps the thermostat soft; the noise sigma puts xi's equilibrium at
    # sigma^2 / (2 tau) = 0.45, which it reaches from xi0 = 0.1 well inside the burn-in.
    tau = 0.1
    t = equipartition("adl", lr=0.2, sigma=0.3, eps=1e-5, tau=tau, xi0=0.1)
    assert t == pytest.approx(tau, rel=0.03)


def test_diagnostics():
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=1, mass="unit")  # (Σp²/m/N with the mass: test_mass.py)
    assert [float(t) for t in opt.kinetic_temperature()] == [0.0, 0.0]
    assert len(opt.thermostats()[0]) == 2 and opt.thermostats()[1] == []
    assert all(float(x) == opt.param_groups[0]["xi0"] for x in opt.thermostats()[0])
    x, y = H.batch()
    H.train(m, opt, 2, x, y)
    kt = opt.kinetic_temperature()
    moms = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
    want = sum(float(v.double().pow(2).sum()) for v in moms[:2]) / sum(v.numel() for v in moms[:2])
    assert float(kt[0]) == pytest.approx(want, rel=1e-12)
    assert te.Overdamped(m).kinetic_temperature() == [None]
    grp = te.AdL(m, thermostat="group", seed=1)
    H.train(m, grp, 1, x, y)
    assert len(grp.thermostats()[0]) == 1


def test_grad_none_is_skipped():
    x, y = H.batch()
    m = H.relu_mlp()
    last = list(m.parameters())[-1]
    last.requires_grad_(False)
    before = last.detach().clone()
    opt = te.AdLaLa(m, seed=1)
    H.train(m, opt, 3, x, y)
    assert torch.equal(last.detach(), before)
    assert "momentum_buffer" not in opt.state[last]
    first = list(m.parameters())[0]
    assert "momentum_buffer" in opt.state[first]


def test_thermal_momentum_init():
    m = H.relu_mlp()
    opt = te.Langevin(m, tau=0.04, momentum_init="thermal", seed=3)
    x, y = H.batch()
    H.train(m, opt, 1, x, y)
    p0 = list(m.parameters())[0]
    m2 = H.relu_mlp()
    opt2 = te.Langevin(m2, tau=0.04, momentum_init="thermal", seed=3)
    z = te_random.normal(p0.numel(), seed=3, uid=0, step=te_random.THERMAL_STEP, draw=0)
    torch.testing.assert_close(init_momentum(p0, 0, 0, opt2.param_groups[0], fold("langevin"))
                               .flatten(), 0.2 * z)


@pytest.mark.parametrize("scheme,maximize,wd", [("langevin", False, 0.0), ("OBABO", True, 0.1),
                                                ("adl", False, 0.1)])
def test_terminal_momentum_init(scheme, maximize, wd):
    """p0 = k F, F = ±g + λθ, k the fixed point of the cycle's letters under a constant force
    (BAOAB: −(h/2)(1 + c)/(1 − c)), so that at τ = 0 with a force that stays the same, every step
    moves θ by the same amount, the first included; at h = 0 the limit −1/γ."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    g = torch.randn(5, dtype=torch.float64)
    h, gamma, xi0 = 0.2, 2.0, 3.0
    opt = te.Thermo([p], lr=h, scheme=scheme, gamma=gamma, xi0=xi0, tau=0.0, sigma=0.0, eps=0.0,
                    weight_decay=wd, maximize=maximize, momentum_init="terminal", seed=1)
    force = (-g if maximize else g) + wd * p.detach()
    c = math.exp(-gamma * h)
    k = fold(scheme).terminal(h, gamma, xi0)
    if scheme == "langevin":
        assert k == pytest.approx(-(h / 2) * (1 + c) / (1 - c), rel=1e-15)
    if scheme == "adl":  # C(h/2) twice, at xi0 (E has eps = 0)
        assert k == pytest.approx(-(h / 2) * (1 + math.exp(-xi0 * h)) / (1 - math.exp(-xi0 * h)))
    assert fold(scheme).terminal(0.0, gamma, xi0) == -1.0 / (xi0 if scheme == "adl" else gamma)
    p.grad = g.clone()
    p0 = init_momentum(p, 0, 0, opt.param_groups[0], fold(scheme))
    torch.testing.assert_close(p0, k * force, rtol=0, atol=0)
    # Without weight decay the force stays g: every step moves theta by the same amount.
    if wd == 0:
        moves = []
        for _ in range(4):
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            moves.append(p.detach() - before)
        for mv in moves[1:]:
            torch.testing.assert_close(mv, moves[0], rtol=1e-12, atol=0)


def test_terminal_momentum_init_needs_friction():
    p = nn.Parameter(torch.randn(3))
    for kw in (dict(scheme="BAB"), dict(gamma=0.0), dict(scheme="adl", xi0=0.0)):
        with pytest.raises(ValueError, match="momentum_init='terminal' needs a friction"):
            te.Thermo([p], momentum_init="terminal", **kw)
    te.Thermo([p], scheme="overdamped", momentum_init="terminal")  # no momentum: nothing to do
    # A friction made zero after construction: the first step refuses and changes nothing.
    opt = te.Thermo([p], momentum_init="terminal", gamma=1.0)
    opt.param_groups[0]["gamma"] = 0.0
    before = p.detach().clone()
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="momentum_init='terminal'"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]
    opt.param_groups[0]["gamma"] = 1.0
    opt.step()
    assert opt.state[p]["momentum_buffer"].abs().sum() > 0


@pytest.mark.parametrize("key,value", [("lr", -0.1), ("gamma", -1.0), ("tau", -1e-4),
                                       ("sigma", -0.01), ("eps", -0.05),
                                       ("weight_decay", -1.0), ("lr", float("nan")),
                                       ("tau", float("inf")), ("scheme", "BAXAB"),
                                       ("scheme", "BABA"), ("thermostat", "layer"),
                                       ("momentum_init", "random"), ("xi0", float("nan")),
                                       ("seed", -1), ("seed", 2**64)])
def test_bad_hyperparameters_name_group_and_key(key, value):
    m = H.relu_mlp()
    with pytest.raises((ValueError, TypeError), match=key if key != "scheme" else "scheme"):
        te.Thermo(m.parameters(), **{key: value})
    with pytest.raises((ValueError, TypeError), match=r"param group 1: .*" + key):
        te.Thermo([{"params": list(m.parameters())[:2]},
                   {"params": list(m.parameters())[2:], key: value}])


def test_bad_hyperparameter_set_later_is_rejected_without_changes():
    x, y = H.batch()
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=1)
    H.train(m, opt, 1, x, y)
    before = snapshot(m, opt)
    opt.param_groups[1]["tau"] = -1.0
    with pytest.raises(ValueError, match=r"param group 1 \('rest \(all but 0\)'\): tau"):
        opt.step()
    after = snapshot(m, opt)
    assert torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1] + before[2], after[1] + after[2]))


@pytest.mark.parametrize("where", ["grad0", "grad_last", "param"])
def test_nonfinite_raises_and_changes_nothing(where):
    x, y = H.batch()
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=1)
    H.train(m, opt, 2, x, y)
    opt.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
    params = list(m.parameters())
    if where == "grad0":
        params[0].grad[0, 0] = float("nan")
    elif where == "grad_last":
        params[-1].grad[0] = float("inf")  # second group: the first must stay untouched too
    else:
        with torch.no_grad():
            params[2].view(-1)[3] = float("inf")
    before = snapshot(m, opt)
    steps = [g["step"] for g in opt.param_groups]
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    after = snapshot(m, opt)
    assert torch.equal(before[0].nan_to_num(), after[0].nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(before[1] + before[2], after[1] + after[2]))
    assert [g["step"] for g in opt.param_groups] == steps


def test_nonfinite_message_names_the_parameter():
    m = H.relu_mlp()
    named = [{"params": [p], "param_names": [n]} for n, p in m.named_parameters()]
    opt = te.Thermo(named, seed=1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    list(m.parameters())[1].grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"param group 1: parameter 0 \('0.bias'\)"):
        opt.step()


def test_check_finite_off_lets_nan_through():
    m = H.relu_mlp()
    opt = te.Langevin(m, check_finite=False, seed=1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    list(m.parameters())[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(list(m.parameters())[0]).any()


def test_partition_helpers():
    m = H.relu_mlp()
    parts = te.partition.layers(m)
    assert [len(p) for p in parts] == [2, 2, 2]
    first, rest = te.partition.first_and_rest(m)
    assert len(first) == 2 and len(rest) == 4
    shared = nn.Linear(3, 3)
    seq = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(3, 1))
    assert [len(p) for p in te.partition.layers(seq)] == [2, 2]
    explicit = te.partition.layers([[parts[0][0]], parts[1] + parts[2]])
    assert [len(p) for p in explicit] == [1, 4]
    opt = te.AdLaLa([[parts[0][0], parts[0][1]], parts[1] + parts[2]])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    with pytest.raises(ValueError, match="at least two"):
        te.partition.first_and_rest(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        te.partition.layers(3)
    with pytest.raises(ValueError, match="gamma"):
        te.LaLa(m, gamma=[0.1, 0.2])


def test_group_scheme_strings_and_weight_decay():
    x, y = H.batch()
    out = []
    for backend in ("engine", "reference"):
        m = H.relu_mlp()
        parts = te.partition.layers(m)
        opt = te.Thermo([{"params": parts[0], "scheme": "OBABO"},
                         {"params": parts[1], "scheme": "ABOBA", "weight_decay": 1e-2},
                         {"params": parts[2], "scheme": "BACDEDCAB", "thermostat": "group"}],
                        lr=0.05, tau=1e-3, seed=8, backend=backend)
        H.train(m, opt, 10, x, y)
        out.append(flat(m))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_bf16_parameters_keep_float32_momenta_across_load():
    m = H.relu_mlp().to(torch.bfloat16)
    x, y = H.batch(dtype=torch.bfloat16)
    opt = te.Langevin(m, seed=1)
    H.train(m, opt, 2, x, y)
    p0 = list(m.parameters())[0]
    assert opt.state[p0]["momentum_buffer"].dtype == torch.float32
    opt2 = te.Langevin(m, seed=1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p0]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt2.state[p0]["momentum_buffer"], opt.state[p0]["momentum_buffer"])


def test_step_hooks_and_profiler_label():
    m = H.relu_mlp()
    opt = te.Langevin(m, seed=1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    h = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("g"))
    try:
        x, y = H.batch()
        H.train(m, opt, 1, x, y)
    finally:
        h.remove()
    assert seen == ["g", "pre", "post"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        H.train(m, opt, 1, x, y)
    assert any(e.name == "Optimizer.step#Thermo.step" for e in prof.events())


def test_closure_is_called_with_grad_enabled():
    m = H.relu_mlp()
    opt = te.AdLaLa(m, seed=1)
    x, y = H.batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and [g["step"] for g in opt.param_groups] == [1, 1]


@pytest.mark.parametrize("kw,match", [
    (dict(), "capturable=True"),                       # counter on the host
    (dict(backend="reference"), "backend='reference'"),
])
def test_graph_capture_without_capturable_is_refused(monkeypatch, kw, match):
    # Under CUDA graph capture only device work is recorded, so a step whose counter or whose
    # tensors live on the host must refuse to be captured, before it changes anything.
    model = H.relu_mlp()
    opt = te.Langevin(model, seed=3, **kw)
    x, y = H.batch()
    H.train(model, opt, 1, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["step"] == 1


def test_graph_capture_of_the_first_step_is_refused(monkeypatch):
    # The first step runs a different program: capturing it would replay that program forever.
    model = H.relu_mlp()
    opt = te.Langevin(model, seed=3, capturable=True)
    nn.functional.mse_loss(model(H.batch()[0]), H.batch()[1]).backward()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="first step"):
        opt.step()
    assert opt.param_groups[0]["step"] == 0 and not opt.state


def test_skipped_steps_is_zero_where_steps_raise():
    # On the CPU (and on CUDA without capturable) a non-finite step raises instead of skipping.
    model = H.relu_mlp()
    opt = te.AdLaLa(model, seed=3)
    x, y = H.batch()
    H.train(model, opt, 2, x, y)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    skipped = opt.skipped_steps()
    assert skipped.dtype == torch.int64 and skipped.dim() == 0 and int(skipped) == 0


@pytest.mark.parametrize("name", ["AdLaLa", "Langevin", "LOL"])
def test_kept_records_match_records_built_afresh(name, monkeypatch):
    """An unchanged optimizer's step reuses its groups' records (engine calls and plans,
    recognised by identity). Run side by side with an optimizer whose records are rebuilt at
    every step, through every change a kept record must notice (hyperparameters, a missing or
    column-major gradient, a parameter swapped through .data, a tensor lr, a new group, a
    loaded state, a refused step): the same bits at every step, and the records are kept again
    once nothing changes."""
    from thermo_ext import stepping

    x, y = H.batch()
    models = [H.relu_mlp(seed=4), H.relu_mlp(seed=4)]
    opts = [METHODS[name](m, seed=9) for m in models]
    built = []
    build_calls = stepping.build_calls

    def counting(gi, group, *args):
        built.append(group is not None and any(group is g for g in opts[0].param_groups))
        return build_calls(gi, group, *args)

    monkeypatch.setattr(stepping, "build_calls", counting)
    never = opts[1]

    def step_both(change=None):
        for m, opt in zip(models, opts):
            H.backward(m, x, y)
            if change is not None:
                change(m, opt)
            if opt is never:
                opt._cache.records.clear()  # built afresh, every step
            opt.step()
        H.assert_same(H.snapshot(opts[0]), H.snapshot(opts[1]))

    def lr(m, opt):
        opt.param_groups[-1]["lr"] = opt.param_groups[-1]["lr"] * 0.5

    def no_grad(m, opt):
        m[0].bias.grad = None

    def transposed(m, opt):
        w = m[0].weight
        w.grad = w.grad.t().contiguous().t()  # the same values, column-major

    def swapped(m, opt):
        w = m[2].weight
        w.data = w.data.clone()

    def tensor_lr(m, opt):  # read on the host at every step: never the shortcut
        opt.param_groups[0]["lr"] = torch.tensor(float(opt.param_groups[0]["lr"]))

    def float_lr(m, opt):
        opt.param_groups[0]["lr"] = float(opt.param_groups[0]["lr"])

    def new_group(m, opt):
        extra = nn.Parameter(torch.linspace(-1.0, 1.0, 5))
        extra.grad = torch.full_like(extra, 0.25)  # kept: the model's zero_grad never sees it
        opt.add_param_group({"params": [extra], "scheme": "BAOAB"})

    for change in [None, None, lr, None, no_grad, None, transposed, None, swapped, None,
                   tensor_lr, None, float_lr, None, new_group, None, None]:
        step_both(change)
    assert built.count(False) > built.count(True)  # the kept records were reused

    # A loaded state, then a refused step (nothing changes), then training goes on.
    for opt in opts:
        opt.load_state_dict(opt.state_dict())
    step_both()
    step_both()
    for m, opt in zip(models, opts):
        H.backward(m, x, y)
        m[0].weight.grad[0, 0] = float("nan")
        before = H.snapshot(opt)
        with pytest.raises(FloatingPointError):
            opt.step()
        H.assert_same(before, H.snapshot(opt))
    step_both()
    step_both()
    kept_builds = built.count(True)
    step_both()
    assert built.count(True) == kept_builds  # kept again once nothing changes


@pytest.mark.parametrize("name", ["Langevin", "AdLaLa"])
def test_momentum_buffer_replaced_by_assignment_is_the_one_stepped(name):
    """A momentum buffer assigned anew (or a state reset to empty) is what the next step reads
    and writes, on the shortcut and the general path alike: the same bits as an optimizer whose
    buffer was never replaced."""
    x, y = H.batch()
    models = [H.relu_mlp(seed=2), H.relu_mlp(seed=2)]
    opts = [METHODS[name](m, seed=5) for m in models]
    for m, opt in zip(models, opts):
        H.train(m, opt, 3, x, y)
    p = models[0][0].weight
    copy = opts[0].state[p]["momentum_buffer"].clone()
    opts[0].state[p]["momentum_buffer"] = copy  # the same values in a new tensor
    for m, opt in zip(models, opts):
        H.train(m, opt, 2, x, y)
    H.assert_same(H.snapshot(opts[0]), H.snapshot(opts[1]))
    assert opts[0].state[p]["momentum_buffer"] is copy

    import collections
    opts[0].state = collections.defaultdict(dict)  # torch users' "reset the optimizer"
    H.train(models[0], opts[0], 1, x, y)
    assert all(opts[0].state[q]["momentum_buffer"].abs().sum() > 0
               for q in models[0].parameters())
