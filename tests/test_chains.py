"""Stacked chains: chain k of a K-chain run is a single-chain run with its seed."""

import pytest
import torch
from torch import nn

import thermo_ext as te


def make():
    return nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 1))


def fake_grads(params):
    # A gradient that is an elementwise function of the parameters: the same bits whether the
    # parameters are stacked or not.
    for p in params:
        p.grad = torch.sin(3.0 * p.detach()) + 0.1


@pytest.mark.parametrize("method,kw", [("AdLaLa", {}), ("LOL", {}), ("Langevin", {}),
                                       ("AdL", {"thermostat": "group"}), ("Overdamped", {}),
                                       ("LaLa", {"momentum_init": "thermal"})])
def test_chain_k_equals_single_chain_run(method, kw):
    K, seed = 4, 1234
    chains = te.Chains(make, K, init_seed=7)
    singles = [chains.chain(k) for k in range(K)]
    factory = getattr(te, method)
    flat = method in ("Langevin", "AdL", "Overdamped")  # these take parameters, not a model
    extra = {"tau": 1e-2} if flat else {}
    opt = factory(chains.parameters() if flat else chains, seed=seed, chains=K,
                  **{"thermostat": "chain", **extra, **kw})
    single_opts = [factory(m.parameters() if flat else m, seed=te.random.chain_seed(seed, k),
                           **extra, **kw) for k, m in enumerate(singles)]
    for _ in range(6):
        fake_grads(chains.parameters())
        opt.step()
        for m, o in zip(singles, single_opts):
            fake_grads(m.parameters())
            o.step()
    stacked = chains.stacked_parameters()
    for k, m in enumerate(singles):
        for name, p in m.named_parameters():
            assert torch.equal(stacked[name][k], p.detach()), (method, k, name)
    if opt.thermostats()[0]:
        for k, o in enumerate(single_opts):
            for a, b in zip(opt.thermostats()[0], o.thermostats()[0]):
                assert float(a[k]) == float(b)
    kt = opt.kinetic_temperature()[0]
    if kt is not None:
        assert kt.shape == (K,)
        for k, o in enumerate(single_opts):
            assert float(kt[k]) == pytest.approx(float(o.kinetic_temperature()[0]), rel=1e-12)


def test_chains_train_with_vmap_and_ensemble_prediction():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = (x[:, :1] * x[:, 1:] > 0).float()
    chains = te.Chains(make, 8, init_seed=0)
    opt = te.AdLaLa(chains, seed=3)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    for _ in range(30):
        opt.zero_grad()
        out = chains(x)                                        # [K, 64, 1]
        loss = loss_fn(out, y.expand_as(out)).mean(dim=(1, 2)).sum()  # chains independent
        loss.backward()
        opt.step()
    mean = chains.mean_prediction(x, torch.sigmoid)
    assert mean.shape == (64, 1)
    assert torch.all((mean >= 0) & (mean <= 1))
    # different chains, different weights
    w = chains.stacked_parameters()["0.weight"]
    assert not torch.equal(w[0], w[1])


def test_chains_errors():
    with pytest.raises(ValueError, match="num_chains"):
        te.Chains(make, 0)
    with pytest.raises(ValueError, match="chains"):
        te.Thermo(make().parameters(), thermostat="chain")
    p = nn.Parameter(torch.zeros(3, 2))
    opt = te.Thermo([p], chains=4)
    p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="stacked on a leading dimension of 4"):
        opt.step()
