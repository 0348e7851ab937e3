"""Property tests (hypothesis) over the public optimizer API, te.Thermo.

* Valid input behaves as the reference: random "models" (param groups of random shapes: scalars,
  zero-size, 1-D to 4-D, now and then one tensor big enough for the OpenMP path; frozen
  parameters, parameters whose gradient is present on some steps only), random valid schemes
  (named or random letter strings), random hyperparameters, float32 / float64, a few steps with
  the step size changing between them. ``backend="engine"`` and ``backend="reference"`` must
  agree: parameters and momenta to 1e-5 (float32) / 1e-12 (float64) relative, xi to 1e-9, step
  counters exactly.
* Invalid input (hyperparameters, scheme strings, types) raises ValueError/TypeError naming the
  argument, at construction and when set on a live group, and a rejected step changes nothing.
* Odd tensors: channels_last (and channels_last_3d) parameters, non-dense views, sparse
  gradients, duplicated and shared parameters.

Every test runs both backends or compares against one; max_examples are bounded so that the file
takes well under two minutes on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

import helpers as H
import thermo_ext as te
from thermo_ext.schemes import is_valid

F32, F64 = torch.float32, torch.float64
TOL = {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-13)}
XI_TOL = dict(rtol=1e-9, atol=1e-12)
BIG = 40_000  # above the engine's kParallelMin (2**15): the multi-threaded path

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

shapes = st.one_of(
    st.just(()),                                                    # scalar
    st.sampled_from([(0,), (0, 3), (2, 0, 4)]),                     # zero-size
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    st.tuples(*[st.integers(1, 3)] * 4),
)

# Kinds of parameter: "grad" has a gradient every step, "frozen" never (requires_grad=False),
# "sometimes" has one on the steps the model's mask says.
kinds = st.sampled_from(["grad", "grad", "grad", "frozen", "sometimes"])

valid_letter_schemes = st.text(alphabet="ABOCDE", min_size=2, max_size=10).filter(is_valid)
schemes = st.one_of(st.sampled_from(["langevin", "adl", "overdamped", "OBABO", "ABOBA",
                                     "BACDEDCAB", "Langevin", " adl "]),
                    valid_letter_schemes)

finite_hyper = dict(
    lr=st.floats(1e-3, 0.5),
    gamma=st.one_of(st.floats(0.0, 5.0), st.just(math.inf)),
    tau=st.one_of(st.just(0.0), st.floats(1e-6, 1e-2)),
    sigma=st.floats(0.0, 0.1),
    eps=st.floats(0.0, 0.5),
    xi0=st.floats(-1.0, 1.0),
    weight_decay=st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
    thermostat=st.sampled_from(["tensor", "group"]),
    momentum_init=st.sampled_from(["zero", "thermal", "terminal"]),
)


@st.composite
def groups(draw):
    """A list of param-group specs: (hyperparameters, [(shape, kind), ...])."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        hyper = {k: draw(v) for k, v in finite_hyper.items()}
        hyper["scheme"] = draw(schemes)
        if hyper["momentum_init"] == "terminal" and te.schemes.fold(hyper["scheme"]).terminal(
                1.0, hyper["gamma"], hyper["xi0"]) is None:
            hyper["momentum_init"] = "zero"  # no friction, no terminal momentum (refused)
        params = draw(st.lists(st.tuples(shapes, kinds), min_size=1, max_size=4))
        out.append((hyper, params))
    if draw(st.integers(0, 5)) == 0:  # now and then one big tensor (OpenMP path)
        out[-1][1].append(((BIG,), "grad"))
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def build(spec, dtype, gen, *, seed, backend, check_finite=True):
    """Fresh parameters (same values for the same gen state) and an optimizer over them."""
    groups_, params = [], []
    for hyper, pspecs in spec:
        ps = []
        for shape, kind in pspecs:
            p = nn.Parameter(torch.randn(shape, generator=gen, dtype=F64).to(dtype) * 0.5,
                             requires_grad=kind != "frozen")
            ps.append((p, kind))
        params.append(ps)
        groups_.append(dict(params=[p for p, _ in ps], **hyper))
    opt = te.Thermo(groups_, seed=seed, backend=backend, check_finite=check_finite)
    return params, opt


def set_grads(params, gen, mask):
    """Gradients for this step (None for frozen parameters and masked-out "sometimes" ones)."""
    k = 0
    for ps in params:
        for p, kind in ps:
            g = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
            if kind == "frozen" or (kind == "sometimes" and not mask[k % len(mask)]):
                p.grad = None
            else:
                p.grad = g
            k += 1


def state_of(params, opt):
    """(params, momenta or None, xi per group, step per group), all cloned."""
    flat = [p for ps in params for p, _ in ps]
    ths = [p.detach().clone() for p in flat]
    moms = [opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state.get(p, {})
            else None for p in flat]
    xis = [None if g["xi"] is None else g["xi"].clone() for g in opt.param_groups]
    steps = [int(g["step"]) for g in opt.param_groups]
    return ths, moms, xis, steps


def bitwise_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_unchanged(before, after, xi0=0.1):
    """Bitwise: nothing that existed moved. State the optimizer creates lazily at a first step
    (zero momenta, xi = xi0) may appear: it is what any first step starts from."""
    for what, xs, ys in zip(("param", "momentum", "xi"), before[:3], after[:3]):
        assert len(xs) == len(ys)
        for i, (x, y) in enumerate(zip(xs, ys)):
            if x is None and y is not None and what != "param":
                init = 0.0 if what == "momentum" else xi0
                assert bool((y == init).all()), f"{what} {i} created with a non-initial value"
                continue
            assert bitwise_equal(x, y), f"{what} {i} changed"
    assert before[3] == after[3], "step counters changed"


def run_both(spec, dtype, n_steps, seed, data_seed, lrs, masks, **kw):
    out = []
    for backend in ("engine", "reference"):
        gen = torch.Generator().manual_seed(data_seed)
        params, opt = build(spec, dtype, gen, seed=seed, backend=backend, **kw)
        for k in range(n_steps):
            for g, scale in zip(opt.param_groups, lrs[k]):
                g["lr"] = g["lr"] * scale
            set_grads(params, gen, masks[k])
            opt.step()
        out.append((params, opt, state_of(params, opt)))
    return out


# ---------------------------------------------------------------------------------------------
# Valid input behaves as the reference
# ---------------------------------------------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(spec=groups(), dtype=st.sampled_from([F32, F64]), n_steps=st.integers(1, 4),
       seed=st.integers(0, 2**64 - 1), data_seed=st.integers(0, 2**31),
       lr_scales=st.lists(st.lists(st.floats(0.5, 1.5), min_size=3, max_size=3), min_size=4,
                          max_size=4),
       masks=st.lists(st.lists(st.booleans(), min_size=1, max_size=5), min_size=4, max_size=4))
def test_random_models_engine_matches_reference(spec, dtype, n_steps, seed, data_seed, lr_scales,
                                                masks):
    (p_e, opt_e, s_e), (p_r, opt_r, s_r) = run_both(spec, dtype, n_steps, seed, data_seed,
                                                    lr_scales, masks)
    tol = TOL[dtype]
    ths_e, moms_e, xis_e, steps_e = s_e
    ths_r, moms_r, xis_r, steps_r = s_r
    assert steps_e == steps_r == [n_steps] * len(spec)
    flat_kinds = [kind for _, ps in spec for _, kind in ps]
    for i, (a, b, kind) in enumerate(zip(ths_e, ths_r, flat_kinds)):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"param {i}: {m}")
        assert bool(a.isfinite().all())
    for i, (a, b) in enumerate(zip(moms_e, moms_r)):
        assert (a is None) == (b is None), f"momentum {i} exists in one backend only"
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"momentum {i}: {m}")
    for gi, (a, b) in enumerate(zip(xis_e, xis_r)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **XI_TOL, msg=lambda m: f"xi of group {gi}: {m}")
    # Frozen parameters never move and never get a momentum.
    k = 0
    gen = torch.Generator().manual_seed(data_seed)
    for hyper, ps in spec:
        for shape, kind in ps:
            start = (torch.randn(shape, generator=gen, dtype=F64).to(dtype) * 0.5)
            if kind == "frozen":
                assert torch.equal(ths_e[k], start) and moms_e[k] is None
            k += 1


@settings(max_examples=15, **SETTINGS)
@given(dtypes=st.lists(st.sampled_from([F32, F64]), min_size=2, max_size=5),
       scheme=st.sampled_from(["langevin", "adl", "OBABO", "overdamped"]),
       seed=st.integers(0, 2**64 - 1))
def test_mixed_dtypes_in_one_group_match_reference(dtypes, scheme, seed):
    """A group mixing float32 and float64 tensors (one engine call per dtype, per-tensor
    thermostats) steps as the reference does."""
    out = []
    for backend in ("engine", "reference"):
        gen = torch.Generator().manual_seed(7)
        ps = [nn.Parameter(torch.randn(5, generator=gen, dtype=F64).to(d)) for d in dtypes]
        opt = te.Thermo(ps, scheme=scheme, seed=seed, tau=1e-3, eps=0.1, backend=backend)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
            opt.step()
        out.append(([p.detach().clone() for p in ps],
                    [x.clone() for x in opt.thermostats()[0]]))
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, **TOL[a.dtype])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, **XI_TOL)


def test_group_thermostat_with_mixed_dtypes_is_rejected_cleanly():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3, dtype=F64))
    c = nn.Parameter(torch.randn(4))
    opt = te.Thermo([{"params": [c]}, {"params": [a, b], "thermostat": "group", "scheme": "adl"}],
                    seed=1)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    params = [[(c, "grad")], [(a, "grad"), (b, "grad")]]
    before = state_of(params, opt)
    with pytest.raises(ValueError, match="param group 1: .*one dtype per group"):
        opt.step()
    assert_unchanged(before, state_of(params, opt))


# ---------------------------------------------------------------------------------------------
# Invalid input raises a clear error and changes nothing
# ---------------------------------------------------------------------------------------------

NOT_A_NUMBER = st.sampled_from(["0.1", None, [0.1], complex(1, 1), True, {"x": 1}])

invalid = st.one_of(
    *[st.tuples(st.just(k), v) for k, v in {
        "lr": st.one_of(st.floats(max_value=-1e-300), st.just(math.nan), st.just(math.inf),
                        NOT_A_NUMBER),
        "gamma": st.one_of(st.floats(max_value=-1e-300), st.just(math.nan),
                           st.just(-math.inf), NOT_A_NUMBER),
        "tau": st.one_of(st.floats(max_value=-1e-300), st.just(math.nan), st.just(math.inf),
                         NOT_A_NUMBER),
        "sigma": st.one_of(st.floats(max_value=-1e-300), st.just(math.nan), NOT_A_NUMBER),
        "eps": st.one_of(st.floats(max_value=-1e-300), st.just(math.inf), NOT_A_NUMBER),
        "weight_decay": st.one_of(st.floats(max_value=-1e-300), st.just(math.nan),
                                  NOT_A_NUMBER),
        "xi0": st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                         st.sampled_from(["0.1", None, True])),
        "thermostat": st.one_of(st.text(max_size=8).filter(
            lambda s: s not in ("tensor", "group", "chain")), st.just(None)),
        "momentum_init": st.one_of(st.text(max_size=8).filter(
            lambda s: s not in ("zero", "thermal", "terminal")), st.just(None)),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64),
                          st.sampled_from([1.5, "7", True])),  # None: the default, drawn
        "scheme": st.one_of(
            st.text(alphabet="ABOCDEXYZ abo", max_size=40).filter(lambda s: not is_valid(s)),
            st.sampled_from(["BABA", "AOA", "BOB", "", "BAOAB" * 7, None, 3, ["BAOAB"]])),
        "chains": st.one_of(st.integers(max_value=-1), st.sampled_from([1.5, True, "2"])),
        "capturable": st.sampled_from([1, "yes", None]),
    }.items()])


def _tiny():
    gen = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(4, 3, generator=gen))
    b = nn.Parameter(torch.randn(3, generator=gen))
    c = nn.Parameter(torch.randn(2, generator=gen))
    return [[(a, "grad"), (b, "grad")], [(c, "grad")]]


def _grads(params):
    for ps in params:
        for p, _ in ps:
            p.grad = torch.full_like(p, 0.1)


@settings(max_examples=120, **SETTINGS)
@given(bad=invalid)
def test_invalid_hyperparameter_at_construction_names_it(bad):
    key, value = bad
    params = _tiny()
    flat = [p for ps in params for p, _ in ps]
    with pytest.raises((ValueError, TypeError), match=key):
        te.Thermo(flat, **{key: value})
    with pytest.raises((ValueError, TypeError), match=rf"param group 1: .*{key}"):
        te.Thermo([{"params": [p for p, _ in params[0]]},
                   {"params": [p for p, _ in params[1]], key: value}])


@settings(max_examples=120, **SETTINGS)
@given(bad=invalid, backend=st.sampled_from(["engine", "reference"]),
       scheme=st.sampled_from(["langevin", "adl"]), group=st.sampled_from([0, 1]))
def test_invalid_hyperparameter_set_later_changes_nothing(bad, backend, scheme, group):
    """Set on a live group (as a user or a scheduler would), the bad value is caught by the next
    step before anything moves, in every group."""
    key, value = bad
    params = _tiny()
    # A value equal to the valid one (True == 1.0 for gamma) is not a change the step can see.
    assume(not (type(value) in (bool, int, float) and value == {"gamma": 1.0, "seed": 5}.get(key)))
    opt = te.Thermo([{"params": [p for p, _ in ps]} for ps in params], scheme=scheme, seed=5,
                    backend=backend)
    _grads(params)
    opt.step()
    _grads(params)
    before = state_of(params, opt)
    opt.param_groups[group][key] = value
    with pytest.raises((ValueError, TypeError), match=rf"param group {group}: .*{key}"):
        opt.step()
    assert_unchanged(before, state_of(params, opt))


@settings(max_examples=30, **SETTINGS)
@given(check=st.sampled_from(["backend", "check_finite"]),
       value=st.sampled_from(["fast", None, 1, "Engine", "true"]))
def test_invalid_optimizer_options_are_rejected(check, value):
    from hypothesis import assume

    assume(not (check == "backend" and value is None))  # None: the default (engine, fallback)
    params = [p for ps in _tiny() for p, _ in ps]
    with pytest.raises((ValueError, TypeError), match=check):
        te.Thermo(params, **{check: value})


# ---------------------------------------------------------------------------------------------
# Odd tensors
# ---------------------------------------------------------------------------------------------

def _layout_pair(shape, fmt, gen, dtype):
    """The same values twice: contiguous, and in memory format fmt."""
    v = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    a = nn.Parameter(v.clone())
    b = nn.Parameter(v.clone().to(memory_format=fmt))
    return a, b


@settings(max_examples=12, **SETTINGS)
@given(shape=st.tuples(st.integers(2, 5), st.integers(2, 4), st.integers(1, 3),
                       st.integers(2, 3)),
       scheme=st.sampled_from(["langevin", "adl", "overdamped", "OBABO"]),
       dtype=st.sampled_from([F32, F64]), backend=st.sampled_from(["engine", "reference"]))
def test_channels_last_parameters_step_like_contiguous_ones(shape, scheme, dtype, backend):
    """A channels_last 4-D parameter (a conv weight after model.to(memory_format=
    torch.channels_last)) is a dense tensor, just not contiguous in the default sense. It must
    step exactly like the same values in the default layout (noise by logical index, docs/DESIGN.md, Noise), and
    keep its memory format. Today the optimizer raises ValueError ("expected a contiguous
    tensor") for it: see the report."""
    gen = torch.Generator().manual_seed(11)
    a, b = _layout_pair(shape, torch.channels_last, gen, dtype)
    assume(not b.is_contiguous())  # e.g. C == 1 makes both layouts coincide
    opts = [te.Thermo([p], scheme=scheme, seed=3, tau=1e-3, backend=backend) for p in (a, b)]
    for _ in range(3):
        g = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
        a.grad = g.clone()
        b.grad = g.clone().to(memory_format=torch.channels_last)
        for o in opts:
            o.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert b.is_contiguous(memory_format=torch.channels_last)
    if scheme != "overdamped":
        torch.testing.assert_close(opts[1].state[b]["momentum_buffer"],
                                   opts[0].state[a]["momentum_buffer"], rtol=0, atol=0)


def test_channels_last_conv_net_trains():
    """The user's view of the case above: a conv net converted to channels_last, trained with a
    named method. Today: ValueError at the first step (see the report)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                        nn.LazyLinear(1))
    x = torch.randn(4, 3, 10, 10)
    net(x)
    net = net.to(memory_format=torch.channels_last)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 1))
    ref.load_state_dict(net.state_dict())
    opts = [te.AdLaLa(net, seed=2), te.AdLaLa(ref, seed=2)]
    xc = x.to(memory_format=torch.channels_last)
    for _ in range(3):
        for m, o, inp in ((net, opts[0], xc), (ref, opts[1], x)):
            o.zero_grad()
            m(inp).pow(2).mean().backward()
            o.step()
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_channels_last_3d_parameter_steps_like_contiguous(backend):
    gen = torch.Generator().manual_seed(5)
    a, b = _layout_pair((3, 2, 2, 2, 2), torch.channels_last_3d, gen, F32)
    assert not b.is_contiguous()
    opts = [te.Thermo([p], seed=3, tau=1e-3, backend=backend) for p in (a, b)]
    for _ in range(2):
        g = torch.randn(a.shape, generator=gen)
        a.grad, b.grad = g.clone(), g.clone().to(memory_format=torch.channels_last_3d)
        for o in opts:
            o.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_transposed_parameter_works_or_is_rejected_cleanly(backend):
    """A dense but transposed parameter: either it steps like its contiguous copy, or the step
    raises ValueError naming it and changes nothing. Never a wrong result."""
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(4, 6, generator=gen)
    a = nn.Parameter(v.clone())
    b = nn.Parameter(v.t().contiguous().t())  # same values, column-major
    assert not b.is_contiguous()
    other = nn.Parameter(torch.randn(3, generator=gen))
    other_a = nn.Parameter(other.detach().clone())
    # Both in group 1 (position 0): the same uid, so the same noise.
    opt_a = te.Thermo([{"params": [other_a]}, {"params": [a]}], seed=3, tau=1e-3,
                      backend=backend)
    opt_b = te.Thermo([{"params": [other]}, {"params": [b]}], seed=3, tau=1e-3, backend=backend)
    g = torch.randn(4, 6, generator=gen)
    a.grad, b.grad, other.grad = g.clone(), g.t().contiguous().t(), torch.ones(3)
    other_a.grad = torch.ones(3)
    before = state_of([[(other, "grad")], [(b, "grad")]], opt_b)
    opt_a.step()
    try:
        opt_b.step()
    except ValueError as e:
        assert "param group 1: parameter 0" in str(e)
        assert_unchanged(before, state_of([[(other, "grad")], [(b, "grad")]], opt_b))
        return
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert b.stride() == (1, 4)  # the layout is kept


@settings(max_examples=20, **SETTINGS)
@given(step=st.integers(2, 3), later_group=st.booleans(),
       backend=st.sampled_from(["engine", "reference"]),
       scheme=st.sampled_from(["langevin", "adl", "overdamped"]))
def test_strided_parameter_with_gaps_steps_like_its_contiguous_copy(step, later_group, backend,
                                                                    scheme):
    """A strided view with gaps (which a flat kernel cannot update in place) is stepped through a
    contiguous copy, as torch's optimizers step it: bitwise the run of a contiguous twin, and
    the elements between its strides are untouched."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 3 * step, generator=gen)
    before_base = base.clone()
    strided = nn.Parameter(base[:, ::step])  # nn.Parameter keeps the view's strides
    assert not strided.is_contiguous()
    twin = nn.Parameter(base[:, ::step].contiguous())
    g0 = torch.randn(5, generator=gen)
    good = [nn.Parameter(g0.clone()) for _ in range(2)]
    runs = []
    for p, g in ((strided, good[0]), (twin, good[1])):
        order = [g, p] if later_group else [p, g]
        opt = te.Thermo([{"params": [q]} for q in order], scheme=scheme, seed=1, backend=backend)
        for k in range(3):
            for q in order:
                q.grad = torch.full_like(q, 0.1 * (k + 1))
            opt.step()
        runs.append(opt)
    assert torch.equal(strided.detach(), twin.detach())
    assert torch.equal(good[0].detach(), good[1].detach())
    gaps = torch.ones_like(base, dtype=torch.bool)
    gaps[:, ::step] = False
    assert torch.equal(base[gaps], before_base[gaps])


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_sparse_gradient_is_rejected_and_nothing_changes(backend):
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 1)
    opt = te.Thermo([{"params": list(lin.parameters())}, {"params": [emb.weight]}], seed=1,
                    backend=backend)
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    params = [[(p, "grad") for p in lin.parameters()], [(emb.weight, "grad")]]
    before = state_of(params, opt)
    with pytest.raises(ValueError, match="param group 1: parameter 0: sparse"):
        opt.step()
    assert_unchanged(before, state_of(params, opt))


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_parameters_shared_between_modules_step_once(backend):
    """A layer used twice (tied weights): model.parameters() and the layer partition list it
    once, and it moves exactly as the same parameter in an untied model does."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(nn.Linear(2, 4), shared, nn.Tanh(), shared, nn.Linear(4, 1))
    assert len(list(tied.parameters())) == 6
    x = torch.randn(8, 2)
    opts = {name: make(tied) for name, make in {
        "Langevin": lambda m: te.Langevin(m, seed=3, backend=backend, tau=1e-3),
        "AdLaLa": lambda m: te.AdLaLa(m, seed=3, backend=backend),
        "LaLa": lambda m: te.LaLa(m, seed=3, backend=backend)}.items()}
    for name, opt in opts.items():
        n = sum(len(g["params"]) for g in opt.param_groups)
        assert n == 6, f"{name}: {n} parameters in the groups"
    # One step: the shared weight's update equals the single-occurrence update from its
    # accumulated gradient, i.e. the same as stepping a plain list of the 6 tensors.
    opt = te.Langevin(tied, seed=3, backend=backend, tau=1e-3)
    params = list(tied.parameters())
    plain = [nn.Parameter(p.detach().clone()) for p in params]
    opt_plain = te.Langevin(plain, seed=3, backend=backend, tau=1e-3)
    tied(x).pow(2).mean().backward()
    for p, q in zip(params, plain):
        q.grad = p.grad.clone()
    opt.step()
    opt_plain.step()
    for p, q in zip(params, plain):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_duplicate_parameter_in_one_group_is_rejected_and_changes_nothing(backend):
    """The same tensor twice in one group (e.g. list(encoder.parameters()) +
    list(decoder.parameters()) with tied embeddings). torch.optim only warns; a sampler that
    stepped it twice would move it by two steps of drift and noise (wrong temperature), and the
    engine would race on it across OpenMP threads. So it is a ValueError, at construction and
    from add_param_group, and the refused group leaves the optimizer as it was."""
    p, q = nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than once"):
        te.Thermo([p, p], seed=9, backend=backend)
    opt = te.Thermo([q], seed=9, tau=1e-3, backend=backend)
    before = H.clone_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="param group 1: a parameter appears more than once"):
        opt.add_param_group({"params": [p, p]})
    H.assert_same(opt.state_dict(), before)
    q.grad = torch.ones_like(q)
    opt.step()  # the optimizer still steps its one group
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["step"] == 1


@pytest.mark.parametrize("named", [False, True])
def test_param_group_given_as_a_generator_keeps_its_parameters(named):
    """BUG (today: the groups end up empty and nothing trains, silently). torch.optim accepts
    any iterable as a group's "params", e.g. {"params": model.encoder.parameters()}; Thermo's
    add_param_group counts the tensors with len(list(params)), which exhausts a generator
    before torch's add_param_group reads it."""
    a, b = nn.Linear(2, 3), nn.Linear(3, 1)
    if named:
        groups = [{"params": a.named_parameters(), "scheme": "adl"},
                  {"params": b.named_parameters()}]
    else:
        groups = [{"params": a.parameters(), "scheme": "adl"}, {"params": b.parameters()}]
    opt = te.Thermo(groups, seed=1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    b(a(torch.randn(4, 2))).sum().backward()
    opt.step()
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(not torch.equal(x, y) for x, y in zip(before, after))


def test_duplicate_parameter_across_groups_is_rejected():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        te.Thermo([{"params": [p]}, {"params": [p]}])
