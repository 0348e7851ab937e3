"""Partitions as a user expects: frozen parameters, named and generator input, the first layer,
parameters owned by containers, names in groups and errors, empty partitions refused."""

import math

import pytest
import torch
from torch import nn

import helpers as H
import thermo_ext as te


class Net(nn.Module):
    """A head registered before the body, and a parameter of the top module itself."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.zeros(8))
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.head(self.body(x) + self.pos)


def ids(tensors):
    return [id(t) for t in tensors]


def test_module_partitions_carry_names_and_skip_frozen():
    m = H.relu_mlp()
    m[2].weight.requires_grad_(False)  # half a layer frozen
    m[4].requires_grad_(False)  # a whole layer frozen: no partition at all
    parts = te.partition.partitions(m)
    assert [p.name for p in parts] == ["0", "2"]
    assert [p.param_names for p in parts] == [["0.weight", "0.bias"], ["2.bias"]]
    assert all(p.layer for p in parts)
    lala = te.LaLa(m)
    assert [g["name"] for g in lala.param_groups] == ["0", "2"]
    assert [g["param_names"] for g in lala.param_groups] == [["0.weight", "0.bias"], ["2.bias"]]
    frozen = [m[2].weight, m[4].weight, m[4].bias]
    for opt in (te.Langevin(m), te.AdL(m), te.Overdamped(m), te.AdLaLa(m), te.LOL(m), lala):
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not held & set(ids(frozen)), type(opt)
    before = [p.detach().clone() for p in frozen]
    x, y = H.batch()
    H.train(m, te.AdLaLa(m, seed=1), 3, x, y)
    for b, p in zip(before, frozen):
        assert torch.equal(b, p)


def test_all_frozen_first_layer_is_never_a_group():
    m = H.relu_mlp()
    m[0].requires_grad_(False)  # e.g. a frozen embedding: AdLaLa's AdL group must not be it
    opt = te.AdLaLa(m)
    assert opt.param_groups[0]["name"] == "2"
    assert opt.param_groups[0]["param_names"] == ["2.weight", "2.bias"]
    assert opt.param_groups[1]["param_names"] == ["4.weight", "4.bias"]
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        te.AdLaLa(m)
    with pytest.raises(ValueError, match="no trainable parameters"):
        te.Langevin(m)


def test_named_parameters_and_module_give_the_same_groups_and_run():
    x, y = H.batch()
    flats = []
    for make in (lambda m: m, lambda m: m.named_parameters(),
                 lambda m: (layer.parameters() for layer in m if list(layer.parameters())),
                 lambda m: [list(m[0].named_parameters()), m[2], m[4].parameters()]):
        m = H.relu_mlp()
        opt = te.AdLaLa(make(m), seed=5)
        assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
        assert ids(opt.param_groups[0]["params"]) == ids(m[0].parameters())
        H.train(m, opt, 5, x, y)
        flats.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    for f in flats[1:]:
        assert torch.equal(flats[0], f)  # same partitions, uids and noise: the same bits


def test_group_names_by_input_kind():
    m = H.relu_mlp()
    assert [g["name"] for g in te.LaLa(m.named_parameters()).param_groups] == ["0", "2", "4"]
    assert te.LaLa(m.named_parameters()).param_groups[1]["param_names"] == ["2.weight",
                                                                            "2.bias"]
    opt = te.AdLaLa(m)
    assert [g["name"] for g in opt.param_groups] == ["0", "rest (all but 0)"]
    assert opt.param_groups[1]["param_names"] == ["2.weight", "2.bias", "4.weight", "4.bias"]
    unnamed = te.LaLa([m[0].parameters(), list(m[2].parameters()) + list(m[4].parameters())])
    assert [g["name"] for g in unnamed.param_groups] == ["partition 0", "partition 1"]
    assert all("param_names" not in g for g in unnamed.param_groups)
    mods = te.LaLa([m[0], m[2]])
    assert [g["name"] for g in mods.param_groups] == ["partition 0 (Linear)",
                                                      "partition 1 (Linear)"]
    assert te.Langevin(m).param_groups[0]["param_names"] == [n for n, _ in m.named_parameters()]
    assert te.Langevin(m).param_groups[0]["name"] == "all"


def test_flat_parameters_are_refused_for_layer_methods_with_the_alternatives():
    m = H.relu_mlp()
    for method in (te.LaLa, te.AdLaLa, te.LOL):
        with pytest.raises(TypeError, match="named_parameters"):
            method(m.parameters())
    te.Langevin(m.parameters())  # one-group methods take parameters as any torch optimizer


def test_empty_partitions_are_errors():
    m = H.relu_mlp()
    gen = m.parameters()
    with pytest.raises(ValueError, match=r"model\[1\].*used up"):
        te.LaLa([gen, gen])  # a generator passed twice
    with pytest.raises(ValueError, match=r"model\[1\]"):
        te.AdLaLa([m[0].parameters(), []])
    used = m.named_parameters()
    list(used)
    with pytest.raises(ValueError, match="empty"):
        te.AdLaLa(used)
    m[2].requires_grad_(False)
    with pytest.raises(ValueError, match=r"model\[1\].*frozen"):
        te.AdLaLa([m[0].parameters(), m[2].parameters()])
    with pytest.raises(ValueError, match=r"model\[1\].*already given"):
        te.AdLaLa([m[0].parameters(), m[0].parameters()])
    with pytest.raises(ValueError, match="first: it holds every"):
        te.AdLaLa(m, first="")
    with pytest.raises(ValueError, match=r"at least two layers .*got 1; for one layer use .*"
                                         r"LOL: te\.Langevin or te\.Overdamped"):
        te.LOL(nn.Linear(2, 2))
    # Frozen layers do not count, and the message says which ones it left out.
    frozen = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))
    frozen[0].requires_grad_(False)
    frozen[2].requires_grad_(False)
    with pytest.raises(ValueError, match=r"got 1 \(2 more whose parameters are all frozen, "
                                         r"requires_grad=False, do not count: '0', '2'\); for "
                                         r"one layer use .*AdLaLa: te\.AdL or te\.Langevin"):
        te.AdLaLa(frozen)


def test_first_layer_skips_containers_and_can_be_chosen():
    net = Net()
    parts = te.partition.partitions(net)
    assert [(p.name, p.layer) for p in parts] == [("(top)", False), ("head", True),
                                                  ("body.0", True), ("body.2", True)]
    # Registration order: the head was registered first, so it is the first layer ...
    assert te.AdLaLa(net).param_groups[0]["name"] == "head"
    # ... the top module's own parameter never is: it goes with the rest.
    assert "pos" in te.AdLaLa(net).param_groups[1]["param_names"]
    lala = te.LaLa(net)
    assert [g["name"] for g in lala.param_groups] == ["(top)", "head", "body.0", "body.2"]
    for first in (net.body[0], "body.0", net.body[0].parameters(),
                  [("body.0.weight", net.body[0].weight), ("body.0.bias", net.body[0].bias)]):
        opt = te.AdLaLa(net, first=first)
        g1, g2 = opt.param_groups
        assert ids(g1["params"]) == ids(net.body[0].parameters())
        assert g1["param_names"] == ["body.0.weight", "body.0.bias"]
        assert len(g2["params"]) == 5 and g2["scheme"] == "langevin"
    assert te.LOL(net, first="body.0").param_groups[0]["name"] == "body.0"
    assert te.LOL(net, first=net.body[0]).param_groups[0]["name"] == "body.0"
    assert te.LOL(net, first="pos").param_groups[0]["param_names"] == ["pos"]
    assert te.LOL(net, first="body").param_groups[0]["param_names"] == [
        "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]
    with pytest.raises(ValueError, match="no module or parameter named 'nope'"):
        te.AdLaLa(net, first="nope")
    with pytest.raises(ValueError, match="not trainable parameters of model"):
        te.AdLaLa(net, first=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="first"):
        te.AdLaLa(net, first=3)
    net.body[0].requires_grad_(False)
    with pytest.raises(ValueError, match="first: no trainable parameters"):
        te.AdLaLa(net, first="body.0")


def test_attention_owns_parameters_as_a_container():
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    parts = {p.name: p.layer for p in te.partition.partitions(enc)}
    assert parts["self_attn"] is False and parts["self_attn.out_proj"] is True
    assert te.AdLaLa(enc).param_groups[0]["name"] == "self_attn.out_proj"


def test_names_appear_in_errors():
    m = H.relu_mlp()
    x, y = H.batch()
    for opt in (te.AdLaLa(m, seed=1), te.LaLa(m.named_parameters(), seed=1),
                te.Langevin(m, seed=1)):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        m[2].weight.grad[0, 0] = math.nan
        with pytest.raises(FloatingPointError, match=r"'2\.weight'"):
            opt.step()


def test_parametrized_tensors_belong_to_their_module():
    """weight_norm keeps g and v under 0.parametrizations.weight: they are layer 0's, with its
    bias, whether the input is the module or its named_parameters()."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(),
                          nn.Linear(8, 1))
    want = [["0.bias", "0.parametrizations.weight.original0",
             "0.parametrizations.weight.original1"], ["2.weight", "2.bias"]]
    for given in (model, model.named_parameters()):
        opt = te.AdLaLa(given, seed=1)
        assert [g["param_names"] for g in opt.param_groups] == want
        assert opt.param_groups[0]["name"] == "0"
    assert [(p.name, p.layer) for p in te.partition.partitions(model)] == [("0", True),
                                                                          ("2", True)]
    model(torch.randn(5, 4)).sum().backward()
    opt.step()


def test_group_added_without_names_to_a_named_optimizer():
    """The named methods name a module's parameters; torch wants names on every group or none,
    so a group added later without names gets names saying where (its errors name them); one
    added with names keeps them."""
    opt = te.AdLaLa(H.relu_mlp(), seed=1)
    extra, named = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    opt.add_param_group({"params": [("head.scale", named)]})
    assert opt.param_groups[2]["param_names"] == ["param_groups.2.0"]
    assert opt.param_groups[3]["param_names"] == ["head.scale"]
    extra.grad = torch.full_like(extra, math.nan)
    with pytest.raises(FloatingPointError, match=r"param group 2: parameter 0 "
                                                 r"\('param_groups\.2\.0'\)"):
        opt.step()


def test_named_groups_survive_state_dict_round_trip():
    m = H.relu_mlp()
    x, y = H.batch()
    opt = te.AdLaLa(m, seed=3)
    H.train(m, opt, 3, x, y)
    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [
        ["0.weight", "0.bias"], ["2.weight", "2.bias", "4.weight", "4.bias"]]
    m2 = H.relu_mlp()
    m2.load_state_dict(m.state_dict())
    opt2 = te.AdLaLa(m2, seed=3)
    opt2.load_state_dict(sd)
    H.train(m, opt, 2, x, y)
    H.train(m2, opt2, 2, x, y)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_chains_keep_names_and_partitions():
    chains = te.Chains(lambda: nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), 3,
                       init_seed=0)
    opt = te.AdLaLa(chains, seed=1)
    assert [g["name"] for g in opt.param_groups] == ["0", "rest (all but 0)"]
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias"]
    assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(3, 4, 2), (3, 4)]
    assert opt.param_groups[0]["chains"] == 3
    assert te.LOL(chains, first="2").param_groups[0]["param_names"] == ["2.weight", "2.bias"]
    assert te.Langevin(chains).param_groups[0]["param_names"] == ["0.weight", "0.bias",
                                                                   "2.weight", "2.bias"]
    # The stacked tensors keep the order (hence the uids and the noise) of before.
    assert ids(te.LaLa(chains).param_groups[0]["params"]) == ids(chains.partitions()[0])
