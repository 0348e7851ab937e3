"""te.PosteriorPredictive (the streaming predictive average) and the tempering helpers.

The average is checked for exactness against the predictions stored one by one, for its
burn-in and thinning counts, for a bitwise resume from a checkpoint, and over te.Chains; the
temperature helpers for their values and, by sampling a Gaussian posterior, for their meaning.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import thermo_ext as te
from helpers import same_bits

F64 = torch.float64


def classifier(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def problem(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    x_test = torch.randn(20, 4, generator=g)
    return x, y, x_test


def step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def stored_prediction(model, x_test):
    """What the average must add on a sample call: softmax of the eval-mode output, in float64."""
    was = model.training
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x_test).to(F64), dim=-1)
    model.train(was)
    return p


# ----------------------------------------------------------------------------- exactness
def test_average_equals_the_average_of_the_stored_predictions():
    x, y, x_test = problem()
    model = classifier()
    opt = te.Langevin(model, lr=0.2, gamma=1.0, tau=1e-3, seed=5)
    pp = te.PosteriorPredictive(model, x_test, burn_in=3, thin=2)
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    stored, flags = [], []
    for t in range(1, 16):
        step(model, opt, x, y)
        forwards.clear()
        expected = stored_prediction(model, x_test) if t > 3 and (t - 3) % 2 == 0 else None
        forwards.clear()
        flags.append(pp.update())
        if expected is not None:
            stored.append(expected)
            assert forwards == [len(x_test)]          # one forward pass on the inputs ...
        else:
            assert forwards == []                     # ... and none on the other calls
    assert flags == [t > 3 and (t - 3) % 2 == 0 for t in range(1, 16)]
    assert (pp.calls, pp.samples, pp.num_averaged, len(stored)) == (15, 6, 6, 6)
    reference = torch.zeros_like(stored[0])
    for p in stored:
        reference += p
    mean = pp.mean()
    assert mean.dtype == F64 and mean.shape == (20, 3)
    assert same_bits(mean, reference / 6)             # the sum in order, then one division
    torch.testing.assert_close(mean, torch.stack(stored).mean(0), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(mean.sum(-1), torch.ones(20, dtype=F64))
    # the samples really differ: the average is not one of them
    assert not torch.allclose(stored[0], stored[-1])


@pytest.mark.parametrize("burn_in", [0, 1, 5])
@pytest.mark.parametrize("thin", [1, 3])
def test_burn_in_and_thinning_are_counted_right(burn_in, thin):
    x, y, x_test = problem()
    model = classifier()
    pp = te.PosteriorPredictive(model, x_test, burn_in=burn_in, thin=thin)
    for calls in range(13):
        expected = max(0, (calls - burn_in) // thin)
        assert (pp.calls, pp.samples) == (calls, expected), (calls, burn_in, thin)
        if expected == 0:
            with pytest.raises(RuntimeError, match=f"first sample is call {burn_in + thin}"):
                pp.mean()
        else:
            # the model does not move here: the average is its one prediction, exactly
            # (expected equal terms summed and divided)
            one = stored_prediction(model, x_test)
            total = torch.zeros_like(one)
            for _ in range(expected):
                total += one
            assert same_bits(pp.mean(), total / expected)
        pp.update()
    pp.reset()
    assert (pp.calls, pp.samples) == (0, 0)
    with pytest.raises(RuntimeError, match="no sample yet"):
        pp.mean()


def test_any_function_of_the_output_and_batched_evaluation():
    x, y, x_test = problem()
    model = classifier()
    opt = te.AdLaLa(model, seed=2)
    first = te.PosteriorPredictive(model, x_test, transform=lambda out: out, dtype=torch.float32)
    second = te.PosteriorPredictive(model, x_test, transform=lambda out: out.double() ** 2)
    batched = te.PosteriorPredictive(model, x_test, batch_size=7)
    whole = te.PosteriorPredictive(model, x_test)
    outs = []
    for _ in range(4):
        step(model, opt, x, y)
        for pp in (first, second, batched, whole):
            pp.update()
        with torch.no_grad():
            outs.append(model(x_test))
    assert first.mean().dtype == torch.float32
    torch.testing.assert_close(first.mean(), torch.stack(outs).mean(0))
    torch.testing.assert_close(second.mean(), (torch.stack(outs).double() ** 2).mean(0))
    torch.testing.assert_close(batched.mean(), whole.mean(), rtol=1e-6, atol=1e-9)


def test_binary_logit_needs_a_transform_and_a_refused_call_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x_test = torch.randn(10, 4)
    pp = te.PosteriorPredictive(model, x_test)
    with pytest.raises(ValueError, match="transform=torch.sigmoid"):
        pp.update()
    assert (pp.calls, pp.samples) == (0, 0)
    ok = te.PosteriorPredictive(model, x_test, transform=torch.sigmoid)
    assert ok.update()
    with torch.no_grad():
        torch.testing.assert_close(ok.mean(), torch.sigmoid(model(x_test)).double())
    # a later sample whose shape differs (other inputs) is refused and changes nothing
    before = ok.state_dict()
    ok.inputs = (torch.randn(3, 4),)
    with pytest.raises(ValueError, match="shape"):
        ok.update()
    after = ok.state_dict()
    assert after["calls"] == before["calls"] and same_bits(after["sum"], before["sum"])


def test_evaluates_in_eval_mode_and_restores_the_mode():
    x, y, x_test = problem()
    model = classifier(dropout=0.5)
    pp = te.PosteriorPredictive(model, x_test)
    model.train()
    pp.update()
    assert model.training
    pp.update()
    # two samples of the same weights in eval mode: identical, so the mean is the prediction
    torch.testing.assert_close(pp.mean(), stored_prediction(model, x_test), rtol=0, atol=1e-15)
    model.eval()
    pp.update()
    assert not model.training


# ----------------------------------------------------------------------------- resume
def _run(steps, *, resume_at=None, burn_in=4, thin=3):
    """AdLaLa on the classifier with an average updated every step; with ``resume_at`` the
    model, optimizer and average go through torch.save/torch.load into fresh objects there."""
    x, y, x_test = problem()
    model = classifier()
    opt = te.AdLaLa(model, seed=11)
    pp = te.PosteriorPredictive(model, x_test, burn_in=burn_in, thin=thin)
    for t in range(steps):
        if t == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "pp": pp.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = classifier(seed=99)  # other weights: everything comes from the checkpoint
            model.load_state_dict(ckpt["model"])
            opt = te.AdLaLa(model, seed=0)
            opt.load_state_dict(ckpt["opt"])
            pp = te.PosteriorPredictive(model, x_test, burn_in=burn_in, thin=thin)
            pp.load_state_dict(ckpt["pp"])
        step(model, opt, x, y)
        pp.update()
    return pp


@pytest.mark.parametrize("resume_at", [2, 9])  # in the burn-in (nothing summed yet), and after
def test_a_resumed_run_continues_the_average_bitwise(resume_at):
    straight = _run(20)
    resumed = _run(20, resume_at=resume_at)
    assert (resumed.calls, resumed.samples) == (straight.calls, straight.samples) == (20, 5)
    assert same_bits(resumed.mean(), straight.mean())


def test_load_state_dict_refuses_a_mismatched_or_mangled_state_and_changes_nothing():
    x, y, x_test = problem()
    model = classifier()
    pp = te.PosteriorPredictive(model, x_test, burn_in=1, thin=2)
    for _ in range(5):
        pp.update()
    good = pp.state_dict()
    assert (good["calls"], good["samples"]) == (5, 2)
    other = te.PosteriorPredictive(model, x_test, burn_in=1, thin=3)
    with pytest.raises(ValueError, match=r"state\['thin'\]"):
        other.load_state_dict(good)
    assert (other.calls, other.samples) == (0, 0)
    target = te.PosteriorPredictive(model, x_test, burn_in=1, thin=2)
    for _ in range(3):
        target.update()
    assert target.samples == 1
    bad_cases = [
        (dict(good, samples=3), r"state\['samples'\]"),
        (dict(good, calls=-1), r"state\['calls'\]"),
        (dict(good, calls=True), r"state\['calls'\]"),
        (dict(good, sum=None), r"state\['sum'\]"),
        (dict(good, sum=good["sum"].float()), r"state\['sum'\]"),
        (dict(good, sum=good["sum"][:3]), r"state\['sum'\]"),
        (dict(good, chains=4), r"state\['chains'\]"),
        ({k: v for k, v in good.items() if k != "thin"}, "keys"),
    ]
    before = target.state_dict()
    for state, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(state)
        now = target.state_dict()
        assert (now["calls"], now["samples"]) == (before["calls"], before["samples"])
        assert same_bits(now["sum"], before["sum"])
    with pytest.raises(TypeError, match="state"):
        target.load_state_dict([good])
    target.load_state_dict(good)
    assert same_bits(target.mean(), pp.mean())
    good["sum"].add_(1.0)  # the loaded state is a copy
    assert same_bits(target.mean(), pp.mean())


# ----------------------------------------------------------------------------- Chains
def test_over_chains_the_average_is_over_chains_and_samples():
    K = 3
    x, y, x_test = problem()
    chains = te.Chains(lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), K,
                       init_seed=4)
    opt = te.AdLaLa(chains, seed=7)
    pp = te.PosteriorPredictive(chains, x_test, burn_in=2, thin=2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    stacked, per_chain = [], []
    for t in range(1, 11):
        opt.zero_grad()
        out = chains(x)                                              # [K, n, 3]
        loss_fn(out.reshape(-1, 3), y.repeat(K)).reshape(K, -1).mean(1).sum().backward()
        opt.step()
        if pp.update():
            with torch.no_grad():
                stacked.append(torch.softmax(chains(x_test).to(F64), -1))    # [K, 20, 3]
                per_chain.append([torch.softmax(chains.chain(k)(x_test).to(F64), -1)
                                  for k in range(K)])
    assert (pp.samples, pp.num_averaged, pp.chains) == (4, 4 * K, K)
    reference = torch.zeros(20, 3, dtype=F64)
    for s in stacked:
        reference += s.sum(0)
    assert same_bits(pp.mean(), reference / (4 * K))
    # the same as the average of every chain's own model over the samples
    plain = torch.stack([p for sample in per_chain for p in sample]).mean(0)
    torch.testing.assert_close(pp.mean(), plain, rtol=1e-6, atol=1e-7)
    state = pp.state_dict()
    assert state["chains"] == K
    resumed = te.PosteriorPredictive(chains, x_test, burn_in=2, thin=2)
    resumed.load_state_dict(state)
    assert same_bits(resumed.mean(), pp.mean())
    bad = te.PosteriorPredictive(chains, x_test, transform=lambda o: o.mean(0))
    with pytest.raises(ValueError, match="leading chain dim"):
        bad.update()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(burn_in=-1), ValueError, "burn_in"),
    (dict(burn_in=True), ValueError, "burn_in"),
    (dict(burn_in=1.5), ValueError, "burn_in"),
    (dict(thin=0), ValueError, "thin"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(transform="softmax"), TypeError, "transform"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    model = classifier()
    with pytest.raises(error, match=match):
        te.PosteriorPredictive(model, torch.randn(5, 4), **kwargs)


def test_bad_model_and_inputs():
    with pytest.raises(TypeError, match="model"):
        te.PosteriorPredictive(lambda x: x, torch.randn(5, 4))
    with pytest.raises(TypeError, match="inputs"):
        te.PosteriorPredictive(classifier(), [[1.0, 2.0]])
    with pytest.raises(TypeError, match="inputs"):
        te.PosteriorPredictive(classifier(), [])
    with pytest.raises(ValueError, match="rows"):
        te.PosteriorPredictive(classifier(), (torch.randn(5, 4), torch.randn(6, 4)),
                               batch_size=2)
    pp = te.PosteriorPredictive(classifier(), torch.randn(5, 4), transform=lambda o: 1.0)
    with pytest.raises(TypeError, match="transform"):
        pp.update()
    assert pp.calls == 0


# ----------------------------------------------------------------------------- tempering
def test_posterior_temperature_values():
    assert te.posterior_temperature(50_000) == pytest.approx(2e-5, rel=1e-15)
    assert te.posterior_temperature(50_000, temperature=0.1) == pytest.approx(2e-6, rel=1e-15)
    assert te.posterior_temperature(1000, reduction="sum", batch_size=100) == 0.1
    assert te.posterior_temperature(1000, reduction="dataset") == 1.0
    assert te.posterior_temperature(1000, reduction="dataset", temperature=0.5) == 0.5
    assert te.posterior_temperature(4000, temperature=0) == 0.0
    assert te.prior_weight_decay(0.5, 1000) == pytest.approx(1 / (1000 * 0.25), rel=1e-15)
    assert te.prior_weight_decay(0.5, 1000, reduction="sum", batch_size=50) == \
        pytest.approx(50 / (1000 * 0.25), rel=1e-15)
    assert te.prior_weight_decay(2.0, 1000, reduction="dataset") == 0.25


@pytest.mark.parametrize("call, match", [
    (lambda: te.posterior_temperature(0), "n_data"),
    (lambda: te.posterior_temperature(True), "n_data"),
    (lambda: te.posterior_temperature(100.0), "n_data"),
    (lambda: te.posterior_temperature(100, reduction="none"), "reduction"),
    (lambda: te.posterior_temperature(100, reduction="sum"), "batch_size"),
    (lambda: te.posterior_temperature(100, reduction="sum", batch_size=101), "batch_size"),
    (lambda: te.posterior_temperature(100, batch_size=0), "batch_size"),
    (lambda: te.posterior_temperature(100, temperature=-1.0), "temperature"),
    (lambda: te.posterior_temperature(100, temperature=float("nan")), "temperature"),
    (lambda: te.posterior_temperature(100, temperature=float("inf")), "temperature"),
    (lambda: te.prior_weight_decay(0.0, 100), "prior_std"),
    (lambda: te.prior_weight_decay(float("inf"), 100), "prior_std"),
    (lambda: te.prior_weight_decay(1.0, -3), "n_data"),
])
def test_tempering_helpers_refuse_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("reduction, h, gamma", [("mean", 0.2, 1.0), ("dataset", 0.02, 10.0)])
def test_the_helpers_give_the_bayesian_posterior_of_a_gaussian_mean(reduction, h, gamma):
    """N points y_i ~ N(mu, 1), per-point loss (y_i - theta)^2 / 2, prior N(0, s^2): the
    posterior is Gaussian with precision N + 1/s^2 and mean N ybar / (N + 1/s^2). Langevin at
    tau = posterior_temperature(N) with weight_decay = prior_weight_decay(s, N), on the loss
    formed as ``reduction`` says (full batch), samples it: 4000 independent copies of theta,
    one per element of one parameter tensor."""
    N, s = 100, 0.2
    g = torch.Generator().manual_seed(0)
    ybar = float((0.5 + torch.randn(N, generator=g, dtype=F64)).mean())
    scale = 1.0 / N if reduction == "mean" else 1.0          # loss = scale * sum_i loss_i
    tau = te.posterior_temperature(N, reduction=reduction)
    lam = te.prior_weight_decay(s, N, reduction=reduction)
    assert tau == scale and lam == pytest.approx(scale / s**2)
    theta = nn.Parameter(torch.zeros(4000, dtype=F64))
    opt = te.Langevin([theta], lr=h, gamma=gamma, tau=tau, weight_decay=lam, seed=3,
                      check_stability=False)
    samples = []
    for t in range(3000):
        theta.grad = scale * N * (theta.detach() - ybar)    # d/dtheta of scale * sum_i loss_i
        opt.step()
        if t >= 1000 and t % 10 == 0:
            samples.append(theta.detach().clone())
    draws = torch.stack(samples)
    precision = N + 1 / s**2
    assert float(draws.mean()) == pytest.approx(N * ybar / precision, abs=3e-3)
    assert float(draws.var()) == pytest.approx(1 / precision, rel=0.03)
    assert math.isfinite(float(draws.var()))
