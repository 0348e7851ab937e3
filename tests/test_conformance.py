"""The torch.optim contract, checked for every scheme and every named method.

What torch promises for each of its optimizers, written from torch's documentation and from the
observed behaviour of torch.optim.SGD/Adam (torch 2.13), where the tests compare against them:
state_dict round trips (also across dtype, with named parameters, and loaded twice), every hook
kind, zero_grad, deepcopy and pickle, complex parameters as real views, strided and channels_last
parameters, tensor learning rates, LR schedulers, parameters without gradients, the
maximize/foreach/fused/differentiable keywords, and duplicate parameters. Where a behaviour is
physical rather than torch's (zero gradient and zero temperature is a no-op), it says so.

Marks ``xfail(strict=True, reason="contract: ...")`` sit on behaviours the package does not meet
yet; strict, so a behaviour that starts working fails the run until its mark is removed.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import re

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import helpers as H
from helpers import F32, F64, MOMENTUMLESS, kinds
from thermo_ext import TemperatureScheduler, Thermo

ALL = kinds()


def trained(kind, steps=2, seed=3, dtype=F32, **kw):
    """A model, its optimizer after ``steps`` steps, and the data."""
    m = H.mlp(dtype=dtype)
    x, y = H.data(dtype=dtype)
    opt = H.make(kind, m, seed=seed, **kw)
    H.train(m, opt, steps, x, y)
    return m, opt, (x, y)


def via_torch_save(sd):
    """The state dict after torch.save / torch.load(weights_only=True), as a checkpoint is."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL)
def test_state_dict_round_trip_continues_bitwise(kind):
    m, opt, (x, y) = trained(kind)
    sd = H.clone_state_dict(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = H.make(kind, m2, seed=99)  # the loaded seed must win over this one
    opt2.load_state_dict(via_torch_save(sd))
    H.assert_same(opt2.state_dict(), sd, "reloaded state_dict")
    continue_alike((m, opt), (m2, opt2), 3, x, y)


def continue_alike(run, twin, steps, x, y):
    """Both (model, optimizer) pairs take ``steps`` more steps and end bitwise alike."""
    for m, opt in (run, twin):
        H.train(m, opt, steps, x, y)
    H.assert_same(H.snapshot(twin[1]), H.snapshot(run[1]))


@pytest.mark.parametrize("kind", kinds())
def test_second_load_state_dict_restores_again(kind):
    m, opt, (x, y) = trained(kind)
    sd = H.clone_state_dict(opt.state_dict())
    start = copy.deepcopy(m.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = H.make(kind, m2, seed=99)
    opt2.load_state_dict(sd)
    H.train(m2, opt2, 2, x, y)
    # Back to the checkpoint, as a training loop that retries from it does.
    m2.load_state_dict(start)
    opt2.load_state_dict(sd)
    H.assert_same(opt2.state_dict(), sd, "state_dict after the second load")
    continue_alike((m, opt), (m2, opt2), 3, x, y)


@pytest.mark.parametrize("kind", ALL)
def test_float32_state_loads_into_a_float64_optimizer_cast_as_torch_casts(kind):
    """torch casts floating state to the parameter's dtype on load: float32 momenta loaded into
    a float64 model become its float64 momenta (exact, float32 -> float64 is lossless)."""
    m32, opt32, (x, y) = trained(kind)
    sd = H.clone_state_dict(opt32.state_dict())
    m64 = copy.deepcopy(m32).to(F64)
    opt64 = H.make(kind, m64, seed=99)
    opt64.load_state_dict(sd)
    for p64, p32 in zip(m64.parameters(), m32.parameters()):
        saved = opt32.state.get(p32, {}).get("momentum_buffer")
        loaded = opt64.state.get(p64, {}).get("momentum_buffer")
        assert (saved is None) == (loaded is None)
        if saved is not None:
            assert loaded.dtype == F64 and H.same_bits(loaded, saved.to(F64))
    # The next steps equal those of a float64 optimizer given the float64 state by hand.
    cast = H.clone_state_dict(sd)
    for entry in cast["state"].values():
        if "momentum_buffer" in entry:
            entry["momentum_buffer"] = entry["momentum_buffer"].to(F64)
    m64b = copy.deepcopy(m32).to(F64)
    opt64b = H.make(kind, m64b, seed=98)
    opt64b.load_state_dict(cast)
    x64, y64 = x.to(F64), y.to(F64)
    H.train(m64, opt64, 2, x64, y64)
    H.train(m64b, opt64b, 2, x64, y64)
    H.assert_same(H.snapshot(opt64), H.snapshot(opt64b))
    # And they continue the float32 run up to float32 rounding (same noise: it is float32).
    H.train(m32, opt32, 2, x, y)
    for p64, p32 in zip(m64.parameters(), m32.parameters()):
        torch.testing.assert_close(p64.detach(), p32.detach().to(F64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", kinds(only=H.FLAT))
def test_named_parameters_round_trip(kind):
    """``model.named_parameters()`` as input: the names are in the state dict's groups (as
    torch's ``param_names``) and survive a round trip into a fresh named optimizer."""
    m = H.mlp()
    x, y = H.data()
    opt = H.make(kind, m.named_parameters(), seed=3)
    H.train(m, opt, 2, x, y)
    names = [n for n, _ in m.named_parameters()]
    sd = H.clone_state_dict(opt.state_dict())
    assert [g.get("param_names") for g in sd["param_groups"]] == [names]
    m2 = copy.deepcopy(m)
    opt2 = H.make(kind, m2.named_parameters(), seed=99)
    opt2.load_state_dict(via_torch_save(sd))
    assert opt2.param_groups[0]["param_names"] == names
    continue_alike((m, opt), (m2, opt2), 3, x, y)


# ---------------------------------------------------------------------------------------------
# Hooks and zero_grad
# ---------------------------------------------------------------------------------------------

def _hook_trace(opt, model, x, y):
    """The order in which the four kinds of step hooks run, and whether a step pre hook's
    returned (args, kwargs) reach the step (its closure's loss is returned)."""
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global pre", o is opt))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global post",
                                                                        o is opt))),
        opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o is opt))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o is opt))),
    ]
    try:
        H.backward(model, x, y)
        opt.step()
    finally:
        for h in handles[:2]:
            h.remove()
    handles[2].remove()
    handles[3].remove()
    H.backward(model, x, y)
    opt.step()  # removed hooks stay silent

    def closure():
        return torch.tensor(7.0)

    h = opt.register_step_pre_hook(lambda o, a, k: (a, {**k, "closure": closure}))
    loss = opt.step()
    h.remove()
    return seen, loss


@pytest.mark.parametrize("kind", ALL)
def test_step_hooks_run_as_for_torch_optimizers(kind):
    m = H.mlp()
    x, y = H.data()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    expected, sgd_loss = _hook_trace(sgd, m, x, y)
    assert expected == [("global pre", True), ("pre", True), ("post", True),
                        ("global post", True)]
    m2 = H.mlp()
    seen, loss = _hook_trace(H.make(kind, m2, seed=3), m2, x, y)
    assert seen == expected
    assert float(loss) == float(sgd_loss) == 7.0


@pytest.mark.parametrize("kind", ALL)
def test_state_dict_hooks(kind):
    """A state_dict pre hook runs before the dict is made (it sees the optimizer); a post hook
    gets the dict and what it returns is what state_dict() returns."""
    m, opt, _ = trained(kind)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))

    def post(o, sd):
        calls.append(("post", o is opt))
        sd = dict(sd)
        sd["note"] = "from the post hook"
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == [("pre", True), ("post", True)]
    assert sd["note"] == "from the post hook"
    assert len(sd["param_groups"]) == len(opt.param_groups)


@pytest.mark.parametrize("kind", kinds())
def test_load_pre_hook_can_fill_in_a_missing_key(kind):
    """A checkpoint that lacks the groups' seed (one no default could restore): a pre hook puts
    the run's seed back, and the run continues bitwise."""
    m, opt, (x, y) = trained(kind, seed=3)
    old = H.clone_state_dict(opt.state_dict())
    for g in old["param_groups"]:
        del g["seed"]
    m2 = copy.deepcopy(m)
    opt2 = H.make(kind, m2, seed=99)
    calls = []

    def upgrade(o, state_dict):
        calls.append(o is opt2)
        state_dict = H.clone_state_dict(state_dict)
        for g in state_dict["param_groups"]:
            g.setdefault("seed", 3)
        return state_dict

    opt2.register_load_state_dict_pre_hook(upgrade)
    opt2.load_state_dict(old)
    assert calls == [True]
    continue_alike((m, opt), (m2, opt2), 2, x, y)


@pytest.mark.parametrize("kind", kinds())
def test_load_pre_hook_result_is_what_is_loaded(kind):
    """The hook swaps in another run's state dict: the optimizer continues that run."""
    m, opt, (x, y) = trained(kind, seed=3)
    m_other, opt_other, _ = trained(kind, steps=4, seed=4)
    other = H.clone_state_dict(opt_other.state_dict())
    m2 = copy.deepcopy(m_other)
    opt2 = H.make(kind, m2, seed=99)
    opt2.register_load_state_dict_pre_hook(lambda o, sd: H.clone_state_dict(other))
    opt2.load_state_dict(H.clone_state_dict(opt.state_dict()))
    H.assert_same(opt2.state_dict(), other, "loaded state")
    continue_alike((m_other, opt_other), (m2, opt2), 2, x, y)


@pytest.mark.parametrize("kind", kinds())
def test_load_pre_hook_result_is_validated(kind):
    m, opt, (x, y) = trained(kind)
    sd = H.clone_state_dict(opt.state_dict())
    before_sd, before = H.clone_state_dict(opt.state_dict()), H.snapshot(opt)

    def mangle(o, state_dict):
        state_dict = H.clone_state_dict(state_dict)
        state_dict["param_groups"][-1]["lr"] = -1.0
        return state_dict

    opt.register_load_state_dict_pre_hook(mangle)
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(sd)
    H.assert_same(opt.state_dict(), before_sd, "state_dict after a refused load")
    H.assert_same(H.snapshot(opt), before)


@pytest.mark.parametrize("kind", kinds())
def test_load_post_hook_runs_after_the_load(kind):
    """A post hook that resets the momenta and halves lr (a resume with fresh momenta): its
    changes stand, and the run equals one where the same was done by hand after the load."""
    m, opt, (x, y) = trained(kind)
    sd = H.clone_state_dict(opt.state_dict())

    def reset(o):
        for g in o.param_groups:
            g["lr"] = g["lr"] / 2
            for p in g["params"]:
                if "momentum_buffer" in o.state.get(p, {}):
                    o.state[p]["momentum_buffer"] = torch.zeros_like(
                        o.state[p]["momentum_buffer"])

    m_hook, m_hand = copy.deepcopy(m), copy.deepcopy(m)
    opt_hook = H.make(kind, m_hook, seed=99)
    opt_hook.register_load_state_dict_post_hook(reset)
    opt_hook.load_state_dict(H.clone_state_dict(sd))
    opt_hand = H.make(kind, m_hand, seed=99)
    opt_hand.load_state_dict(H.clone_state_dict(sd))
    reset(opt_hand)
    for p in m_hook.parameters():
        mom = opt_hook.state.get(p, {}).get("momentum_buffer")
        assert mom is None or not mom.any()
    H.train(m_hook, opt_hook, 2, x, y)
    H.train(m_hand, opt_hand, 2, x, y)
    H.assert_same(H.snapshot(opt_hook), H.snapshot(opt_hand))


@pytest.mark.parametrize("kind", ALL)
def test_zero_grad(kind):
    """set_to_none=True (the default) leaves .grad None, and a step then moves nothing;
    set_to_none=False leaves zeros of the parameter's shape."""
    m, opt, (x, y) = trained(kind)
    H.backward(m, x, y)
    opt.zero_grad(set_to_none=False)
    for p in m.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert all(H.same_bits(p.detach(), b) for p, b in zip(m.parameters(), before))


# ---------------------------------------------------------------------------------------------
# deepcopy and pickle
# ---------------------------------------------------------------------------------------------

def _copied(how, obj):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("steps", [0, 2], ids=["fresh", "stepped"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", kinds())
def test_copy_keeps_every_attribute_and_steps_like_the_original(kind, how, steps):
    """(model, optimizer) copied together: the copy's optimizer holds the copy's parameters,
    keeps every attribute (non-default ones included), and steps them with the original's
    bits without touching the original's."""
    m, opt, (x, y) = trained(kind, steps=steps, check_finite=False, stochastic_rounding=False)
    m2, opt2 = _copied(how, (m, opt))
    missing = sorted(set(vars(opt)) - set(vars(opt2)))
    assert not missing, f"the copy lacks {missing}"
    public = [k for k in vars(opt) if not k.startswith("_")
              and k not in ("state", "param_groups", "defaults")]
    assert {k: getattr(opt2, k) for k in public} == {k: getattr(opt, k) for k in public}
    assert opt2.defaults == opt.defaults
    copied_params = [p for g in opt2.param_groups for p in g["params"]]
    assert [id(p) for p in copied_params] == [id(p) for p in m2.parameters()]
    H.assert_same(H.snapshot(opt2), H.snapshot(opt))
    before = H.snapshot(opt)
    H.train(m2, opt2, 3, x, y)
    H.assert_same(H.snapshot(opt), before)  # the original is untouched
    H.train(m, opt, 3, x, y)
    H.assert_same(H.snapshot(opt2), H.snapshot(opt))


# ---------------------------------------------------------------------------------------------
# Parameter kinds: complex, strided with gaps, channels_last
# ---------------------------------------------------------------------------------------------

def _loss(ws):
    """A non-linear loss of real tensors, so each step's gradient depends on the parameters."""
    a, b, c = ws
    return (torch.tanh(a) * 0.7).sum() + (b ** 2).sum() * 0.3 + (c ** 3).sum() * 0.1


def _run_pair(kind, parts_a, parts_b, view_a, view_b, steps=3, **kw):
    """Steps two optimizers over two parameter sets whose ``view`` gives the same real tensors
    for the loss; returns both optimizers."""
    opts = []
    for parts, view in ((parts_a, view_a), (parts_b, view_b)):
        # Thermo's default tau is small; a larger one makes every bit of the noise count.
        hot = dict(tau=1e-2) if kind in H.SCHEMES else {}
        opt = H.make(kind, parts, seed=5, **hot, **kw)
        flat = [p for part in parts for p in part]
        for _ in range(steps):
            for p in flat:
                p.grad = None
            _loss(view(flat)).backward()
            opt.step()
        opts.append(opt)
    return opts


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kind", kinds())
def test_complex_parameters_step_as_their_real_views(kind, dtype):
    """torch's optimizers step a complex parameter as torch.view_as_real of it; the noise is
    per real component, so the run equals, bitwise, the run on the real views as parameters."""
    g = torch.Generator().manual_seed(0)
    w1 = nn.Parameter(torch.randn(3, 2, dtype=dtype, generator=g))
    b1 = nn.Parameter(torch.randn(3, dtype=dtype.to_real(), generator=g))
    w2 = nn.Parameter(torch.randn(4, dtype=dtype, generator=g))
    complex_parts = [[w1, b1], [w2]]
    real_parts = [[nn.Parameter(torch.view_as_real(w1.detach()).clone()),
                   nn.Parameter(b1.detach().clone())],
                  [nn.Parameter(torch.view_as_real(w2.detach()).clone())]]
    opt_c, opt_r = _run_pair(kind, complex_parts, real_parts,
                             lambda f: [torch.view_as_real(f[0]), f[1], torch.view_as_real(f[2])],
                             lambda f: f)
    assert w1.dtype == dtype and w2.dtype == dtype
    H.assert_same(H.snapshot(opt_c), H.snapshot(opt_r))


@pytest.mark.parametrize("kind", kinds())
def test_strided_parameters_with_gaps_step_like_their_contiguous_copy(kind):
    """Leaves that view a bigger tensor with gaps (every other column; every third row): they
    step as contiguous copies would, stay views with their strides, and the elements between
    them are not written."""
    g = torch.Generator().manual_seed(0)
    big1 = torch.randn(4, 6, generator=g)
    big2 = torch.randn(9, 2, generator=g)
    w1, w2 = nn.Parameter(big1[:, ::2]), nn.Parameter(big2[1::3])
    b = nn.Parameter(torch.randn(5, generator=g))
    assert w1.is_leaf and w1.stride() == (6, 2) and w2.stride() == (6, 1)
    gaps1, gaps2 = big1[:, 1::2].clone(), big2[[0, 2, 3, 5, 6, 8]].clone()
    dense = [[nn.Parameter(w1.detach().clone())], [nn.Parameter(w2.detach().clone()),
                                                   nn.Parameter(b.detach().clone())]]
    opt_s, opt_d = _run_pair(kind, [[w1], [w2, b]], dense, lambda f: f, lambda f: f)
    H.assert_same(H.snapshot(opt_s), H.snapshot(opt_d))
    assert w1.stride() == (6, 2) and w1.data_ptr() == big1.data_ptr()
    assert H.same_bits(big1[:, ::2], w1.detach()) and H.same_bits(big2[1::3], w2.detach())
    assert H.same_bits(big1[:, 1::2], gaps1) and H.same_bits(big2[[0, 2, 3, 5, 6, 8]], gaps2)


@pytest.mark.parametrize("kind", ALL)
def test_channels_last_parameters_step_like_their_contiguous_copy(kind):
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 2, 2, generator=g).to(
        memory_format=torch.channels_last))
    b = nn.Parameter(torch.randn(4, generator=g))
    w2 = nn.Parameter(torch.randn(2, 3, 2, 2, generator=g).to(
        memory_format=torch.channels_last))
    assert not w.is_contiguous()
    dense = [[nn.Parameter(w.detach().contiguous())],
             [nn.Parameter(b.detach().clone()), nn.Parameter(w2.detach().contiguous())]]
    opt_cl, opt_d = _run_pair(kind, [[w], [b, w2]], dense, lambda f: f, lambda f: f)
    H.assert_same(H.snapshot(opt_cl), H.snapshot(opt_d))
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert w2.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("scheme", ["langevin", "adl"])
def test_gradients_in_any_layout_step_like_contiguous_ones_through_a_kept_copy(scheme):
    """A gradient that is not contiguous (a channels_last weight's; one given transposed or as a
    view with gaps) is read through a contiguous copy that the step keeps for the next steps
    (no allocation per step); the run equals, bitwise, the same run with contiguous
    gradients, whatever layout each step's gradient comes in."""
    g = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.randn(6, 5, 3, 3, generator=g).to(memory_format=torch.channels_last))
    v = nn.Parameter(torch.randn(7, 4, generator=g))
    dense = [nn.Parameter(w.detach().contiguous()), nn.Parameter(v.detach().clone())]
    opts = [Thermo([w, v], scheme=scheme, seed=9, tau=1e-2),
            Thermo(dense, scheme=scheme, seed=9, tau=1e-2)]
    layouts = [lambda t: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t.t()
               .contiguous().t(),
               lambda t: t.clone(),
               lambda t: torch.stack([t, t], dim=-1)[..., 0]]  # a view with gaps
    kept = []
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in dense]
        as_given = [layouts[step % 3](t) for t in grads]
        for p, t in zip((w, v), as_given):
            p.grad = t
        for p, t in zip(dense, grads):
            p.grad = t
        for o in opts:
            o.step()
        H.assert_same(H.snapshot(opts[0]), H.snapshot(opts[1]))
        assert w.is_contiguous(memory_format=torch.channels_last)
        calls = opts[0]._cache.records[0].calls
        kept.append({k: t.data_ptr() for c in calls for k, t in c.grad_copies.items()})
    assert kept[3] == kept[0] and kept[5] == kept[2] and kept[0]  # the same buffers again


# ---------------------------------------------------------------------------------------------
# Learning rates and schedulers
# ---------------------------------------------------------------------------------------------

def _scheduled(kind, lr, make_scheduler, steps=3):
    """A run under a scheduler, and the lr of every group before each step."""
    m = H.mlp()
    x, y = H.data()
    opt = H.make(kind, m, seed=3, lr=lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        loss = H.backward(m, x, y)
        opt.step()
        sched.step(loss.item()) if isinstance(sched, lr_scheduler.ReduceLROnPlateau) else \
            sched.step()
    return opt, lrs


def _by_hand(kind, lr, lrs):
    """The same run with each step's lr set by hand."""
    m = H.mlp()
    x, y = H.data()
    opt = H.make(kind, m, seed=3, lr=lr)
    for step_lrs in lrs:
        for g, v in zip(opt.param_groups, step_lrs):
            g["lr"] = v
        H.train(m, opt, 1, x, y)
    return opt


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=8,
                                                    cycle_momentum=False),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
    # mode="max" on a loss that falls: no improvement every step, so lr is cut every step.
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="max", patience=0,
                                                                  factor=0.5),
}


@functools.lru_cache(maxsize=None)
def _constant_lr_params(kind, lr, steps):
    """Parameters after ``steps`` steps at the constant lr (shared by the scheduler tests)."""
    return _params(_by_hand(kind, lr, [[lr] * 3] * steps))


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("kind", ALL)
def test_schedulers_set_the_step_size(kind, sched):
    """A scheduler's lr is the step size each step uses: the run equals the run with the same
    lrs set by hand, and differs from the run at the constant initial lr."""
    opt, lrs = _scheduled(kind, 0.2, SCHEDULERS[sched])
    assert len({tuple(v) for v in lrs}) > 1, f"{sched} did not change lr: {lrs}"
    H.assert_same(H.snapshot(opt), H.snapshot(_by_hand(kind, 0.2, lrs)))
    assert any(not H.same_bits(a, b)
               for a, b in zip(_params(opt), _constant_lr_params(kind, 0.2, len(lrs))))


def _params(opt):
    return [s[-1] for s in H.snapshot(opt) if s[0] == "param"]


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
@pytest.mark.parametrize("kind", kinds())
def test_tensor_lr_follows_a_scheduler(kind, shape):
    """torch accepts a 1-element tensor lr; its schedulers then update it in place (fill_).
    The run equals the run with the same float lrs (exactly representable here)."""
    lr = torch.full(shape, 0.25)
    opt_t, lrs_t = _scheduled(kind, lr, SCHEDULERS["StepLR"])
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt_t.param_groups)
    opt_f, lrs_f = _scheduled(kind, 0.25, SCHEDULERS["StepLR"])
    assert lrs_t == lrs_f == [[0.25 * 0.5 ** k] * len(opt_f.param_groups) for k in range(3)]
    params_t = [s for s in H.snapshot(opt_t) if s[0] in ("param", "momentum", "xi")]
    params_f = [s for s in H.snapshot(opt_f) if s[0] in ("param", "momentum", "xi")]
    H.assert_same(params_t, params_f)


@pytest.mark.parametrize("kind", kinds())
def test_constant_tensor_lr_equals_float_lr(kind):
    """0.125 is exact in float32, so the tensor and the float are the same h."""
    _, opt_t, _ = trained(kind, steps=3, lr=torch.tensor(0.125))
    _, opt_f, _ = trained(kind, steps=3, lr=0.125)
    H.assert_same([s for s in H.snapshot(opt_t) if s[0] != "step"],
                  [s for s in H.snapshot(opt_f) if s[0] != "step"])


def _torch_tensor_lr_error():
    """torch's error for a tensor lr of more than one element (the same for SGD and Adam)."""
    errors = []
    for cls in (torch.optim.SGD, torch.optim.Adam):
        with pytest.raises(Exception) as e:
            cls([nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1, 0.2]))
        errors.append((e.type, str(e.value)))
    assert errors[0] == errors[1]
    return errors[0]


@pytest.mark.parametrize("kind", kinds())
def test_tensor_lr_of_two_elements_raises_like_torch(kind):
    err_type, message = _torch_tensor_lr_error()
    assert err_type is ValueError
    with pytest.raises(ValueError, match=re.escape(message)):
        H.make(kind, H.mlp(), lr=torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------
# Parameters without gradients, state entries, zero gradient at zero temperature
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL)
def test_parameters_without_grads_are_not_moved_and_get_no_state(kind):
    """Frozen parameters (the first layer's bias and the whole last layer, a partition of its
    own for LaLa) keep their bits and get no state entry, in opt.state or the state dict."""
    m = H.mlp()
    frozen = [m[0].bias, m[4].weight, m[4].bias]
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    x, y = H.data()
    opt = H.make(kind, m, seed=3)
    H.train(m, opt, 3, x, y)
    assert all(H.same_bits(p, b) for p, b in zip(frozen, before))
    assert all(p not in opt.state for p in frozen)
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    # (The layer methods leave frozen parameters out of their groups altogether.)
    assert not {index[id(p)] for p in frozen if id(p) in index} & set(sd["state"])
    moved = m[0].weight
    assert not H.same_bits(moved.detach(), H.mlp()[0].weight.detach())


@pytest.mark.parametrize("kind", kinds())
def test_no_empty_state_entries(kind):
    m, opt, _ = trained(kind)
    assert all(entry for entry in opt.state.values()), dict(opt.state)
    assert all(entry for entry in opt.state_dict()["state"].values())
    if kind in MOMENTUMLESS and all(g["mass"] == "unit" for g in opt.param_groups):
        assert len(opt.state) == 0
    else:  # momenta, or the adaptive mass's second moments
        assert set(opt.state) == set(m.parameters())


@pytest.mark.parametrize("kind", ALL)
def test_zero_gradient_at_zero_temperature_is_a_no_op(kind):
    """Physics, not torch: with tau = sigma = 0 there is no noise, and from momenta at rest a
    zero gradient (no weight decay) leaves every parameter's bits and the momenta at zero."""
    m = H.mlp()
    opt = H.make(kind, m, seed=3, **H.COLD[kind])
    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(H.same_bits(p.detach(), b) for p, b in zip(m.parameters(), before))
    for p in m.parameters():
        mom = opt.state.get(p, {}).get("momentum_buffer")
        assert mom is None or not mom.any()


# ---------------------------------------------------------------------------------------------
# maximize, foreach, fused, differentiable
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", kinds())
def test_maximize_equals_the_run_on_negated_gradients(kind):
    """As torch's maximize: the gradient is negated before weight decay is added, so the run
    equals, bitwise, the run fed -grad; the noise is the same."""
    x, y = H.data()
    m_max, m_neg = H.mlp(), H.mlp()
    opt_max = H.make(kind, m_max, seed=3, weight_decay=1e-2, maximize=True)
    opt_neg = H.make(kind, m_neg, seed=3, weight_decay=1e-2)
    for _ in range(3):
        H.backward(m_max, x, y)
        opt_max.step()
        H.backward(m_neg, x, y)
        for p in m_neg.parameters():
            p.grad.neg_()
        opt_neg.step()
    H.assert_same(H.snapshot(opt_max), H.snapshot(opt_neg))
    # A maximizing optimizer's checkpoint resumes as one.
    m2 = copy.deepcopy(m_max)
    opt2 = H.make(kind, m2, seed=99, weight_decay=1e-2, maximize=True)
    opt2.load_state_dict(H.clone_state_dict(opt_max.state_dict()))
    continue_alike((m_max, opt_max), (m2, opt2), 2, x, y)


@pytest.mark.parametrize("kw", [dict(fused=True, foreach=None, differentiable=False,
                                     maximize=False),
                                dict(fused=None)],
                         ids=["fused=True,foreach=None,differentiable=False,maximize=False",
                              "fused=None"])
@pytest.mark.parametrize("kind", kinds())
def test_torch_keywords_we_honour_are_accepted(kind, kw):
    """fused is what the engine is; foreach=None and fused=None leave the choice to us;
    differentiable=False and maximize=False are the default behaviour: the run is unchanged."""
    _, opt_kw, _ = trained(kind, steps=3, **kw)
    _, opt, _ = trained(kind, steps=3)
    H.assert_same(H.snapshot(opt_kw), H.snapshot(opt))


@pytest.mark.parametrize("keyword", ["foreach", "differentiable"])
@pytest.mark.parametrize("kind", kinds())
def test_torch_keywords_we_cannot_honour_raise(kind, keyword):
    with pytest.raises(ValueError, match=keyword):
        H.make(kind, H.mlp(), **{keyword: True})


# ---------------------------------------------------------------------------------------------
# Duplicate parameters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["one partition", "two partitions"])
@pytest.mark.parametrize("kind", ALL)
def test_duplicate_parameters_raise(kind, where):
    """torch raises ValueError for a parameter in two groups and announces the same for one
    group; a step would move such a parameter twice."""
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    parts = [[a, a], [b]] if where == "one partition" else [[a], [a, b]]
    with pytest.raises(ValueError, match="more than once|more than one"):
        H.make(kind, parts)


@pytest.mark.parametrize("kind", kinds(only=("adl", "AdLaLa", "Langevin")))
def test_temperature_scheduler_changes_a_tensor_tau_in_place(kind):
    """A tensor τ keeps its identity (a captured CUDA graph reads it at every replay) and the
    run equals the one with float τ scheduled alike."""
    runs = []
    for as_tensor in (False, True):
        m = H.mlp()
        opt = H.make(kind, m, seed=3)
        if as_tensor:
            for g in opt.param_groups:
                g["tau"] = torch.tensor(float(g["tau"]), dtype=torch.float64)
        taus = [g["tau"] for g in opt.param_groups]
        sched = TemperatureScheduler(opt, lambda k: 1.0 / (1 + k))
        x, y = H.data()
        for _ in range(4):
            H.train(m, opt, 1, x, y)
            sched.step()
        if as_tensor:
            assert all(g["tau"] is t for g, t in zip(opt.param_groups, taus))
            assert [float(g["tau"]) for g in opt.param_groups] == pytest.approx(
                [float(t0) / 5 for t0 in [g["initial_tau"] for g in opt.param_groups]])
        runs.append(H.snapshot(opt))
    H.assert_same(runs[0], runs[1])
