"""A user's model with the named methods' defaults: they train common small models about as
well as Adam(lr=1e-3), without instability warnings; the paper's setting is one argument away."""

import inspect
import warnings

import pytest
import torch
from torch import nn

import helpers as H
import thermo_ext as te
from thermo_ext.data import digits

METHODS = ("Langevin", "LaLa", "AdL", "AdLaLa", "LOL", "Overdamped")


def CNN():
    return H.example("cnn").CNN(widths=(8, 16))


def mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.fixture(scope="module")
def data():
    return digits(seed=0)


def fit(make, method, data, steps, seed=0):
    (x, y), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = make()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if method == "Adam"
           else getattr(te, method)(model, seed=seed))
    H.train_digits(model, opt, x, y, steps, seed)
    with torch.no_grad():
        return 100.0 * (model(x_test).argmax(1) == y_test).float().mean().item()


@pytest.mark.parametrize("make,steps,floor", [(mlp, 300, 90.0), (CNN, 300, 90.0)],
                         ids=["mlp", "cnn"])
def test_defaults_train_small_models_like_adam_without_warnings(make, steps, floor, data,
                                                                restore_threads):
    """Every named method with its defaults: at least ``floor`` % test accuracy on the 8x8
    digits after ``steps`` steps of batch 32, and within 5 points of Adam(1e-3) run the same
    way (docs/GUIDE.md has the longer, two-seed comparison); no InstabilityWarning."""
    torch.set_num_threads(1)
    restore_threads(1)
    adam = fit(make, "Adam", data, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", te.InstabilityWarning)
        accs = {m: fit(make, m, data, steps) for m in METHODS}
    for method, acc in accs.items():
        assert acc >= floor and acc >= adam - 5.0, (method, acc, adam, accs)


def test_paper_preset_gives_the_papers_values_and_explicit_keywords_win():
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    for method in METHODS:
        values = te.methods.preset_values(method, "paper")
        opt = getattr(te, method)(model, preset="paper")
        for g in opt.param_groups:
            assert g["lr"] == values["lr"]
        if "gamma" in values:  # LOL: the first layer's (the rest has gamma = inf)
            assert opt.param_groups[0 if method == "LOL" else -1]["gamma"] == values["gamma"]
        for key, k in (("tau", -1), ("tau1", 0), ("tau2", -1)):
            if key in values:
                assert opt.param_groups[k]["tau"] == values[key]
        assert getattr(te, method)(model, preset="paper", lr=0.01).param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="preset"):
        te.AdLaLa(model, preset="nope")


def test_defaults_differ_from_the_paper_and_are_in_the_signatures():
    """The defaults are for common models; the paper's spiral setting is preset="paper"."""
    for method in METHODS:
        sig = inspect.signature(getattr(te, method)).parameters
        assert "preset" in sig
        paper = te.methods.preset_values(method, "paper")
        assert any(sig[k].default != v for k, v in paper.items()), method
