"""The compiled CPU engine (thermo_ext.kernels.thermo_step) against the pure-PyTorch oracle
(thermo_ext.reference.thermo_step), and the engine's own promises: bitwise determinism across
thread counts and ISAs, sharding by global offsets, validation that changes nothing, non-finite
checks, low-precision parameters.

Tolerances: float64 1e-12 relative, float32 1e-6 relative, xi 1e-9 relative (the two usually
agree bitwise; the thermostat sums differ in summation order).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import helpers as H
import thermo_ext
from thermo_ext import backends, kernels, reference
from thermo_ext.random import normal
from thermo_ext.refusal import Refusal
from thermo_ext.schemes import fold

F32, F64 = torch.float32, torch.float64
RTOL = {F32: 1e-6, F64: 1e-12}
XI_RTOL = 1e-9
BIG = 278011
SIZES = [1, 3, 4097, BIG]
SEED = 2**40 + 12345

HYPER = dict(lr=0.1, gamma=1.0, tau=0.5, sigma=0.3, eps=0.0, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class State(H.CallState):
    """Parameters, momenta and xi of one call (param group 1's uids), stepped by an
    implementation: the engine or the reference."""

    def clone(self):
        return self.copy()

    def tensors(self):  # xi too: the engine is handed it whatever the scheme
        return [*self.params, *(m for m in self.momenta if m is not None), self.xi]

    def step(self, impl, grads, *, step, first, **hyper):
        kw = dict(HYPER)
        kw.update(hyper)
        return impl(self.params, self.momenta, grads, scheme=self.scheme, xi=self.xi,
                    segments=self.segments, seed=kw.pop("seed", SEED), step=step,
                    uids=self.uids, offsets=self.offsets, first=first, **kw)


def make_grads(state, gen, n_steps):
    return [[torch.randn(s, generator=gen, dtype=F64).to(state.dtype) for s in state.shapes]
            for _ in range(n_steps)]


def eps_for(state):
    """A thermostat coupling that moves xi visibly but stays stable."""
    return 1.0 / sum(math.prod(s) for s in state.shapes)


def run_pair(state, grads_seq, *, step0=0, first=True, **hyper):
    """Runs the engine and the reference on clones of state; returns both final states."""
    eng, ref = state.clone(), state.clone()
    for k, grads in enumerate(grads_seq):
        a = eng.step(kernels.thermo_step, grads, step=step0 + k, first=first and k == 0, **hyper)
        b = ref.step(reference.thermo_step, grads, step=step0 + k, first=first and k == 0,
                     **hyper)
        assert a is None and b is None, (a, b)
    return eng, ref


def assert_close(got, want, rtol, what=""):
    """|got - want| <= rtol (|want| + max(1, max |want|)) elementwise, same dtype and shape."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.numel() == 0:
        return
    w = want.double()
    scale = max(1.0, float(w.abs().max()))
    err = (got.double() - w).abs()
    ok = err <= rtol * (w.abs() + scale)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0]) if ok.dim() <= 1 else int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ by "
                             f"more than rtol={rtol}; first at flat index {i}: got "
                             f"{float(got.reshape(-1)[i])!r}, want {float(w.reshape(-1)[i])!r}, "
                             f"max error {float(err.max())!r}")


def assert_states_close(eng, ref, start=None):
    rtol = RTOL[kernels.momentum_dtype(eng.dtype)]
    for i, (a, b) in enumerate(zip(eng.params, ref.params)):
        assert a.dtype == b.dtype == eng.dtype and a.shape == b.shape
        assert_close(a, b, rtol, f"params[{i}]")
    for i, (a, b) in enumerate(zip(eng.momenta, ref.momenta)):
        if b is None:
            assert a is None
        else:
            assert_close(a, b, rtol, f"momenta[{i}]")
    torch.testing.assert_close(eng.xi, ref.xi, rtol=XI_RTOL, atol=1e-15)
    if start is not None:  # the step did something
        for i, (a, b) in enumerate(zip(eng.params, start.params)):
            assert not torch.equal(a, b), f"params[{i}] did not move"
        if eng.scheme.n_e:
            assert not torch.equal(eng.xi, start.xi), "xi did not move"


def bits_equal(a, b):
    """Bitwise equality that also holds for NaN."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    it = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


def assert_states_equal(a, b):
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)
    for x, y in zip(a.momenta, b.momenta):
        assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(a.xi, b.xi)


# ---------------------------------------------------------------------------------------------
# Engine vs reference
# ---------------------------------------------------------------------------------------------

# The smallest valid strings that exercise each letter (one letter alone is never valid: a scheme
# needs an A and a B).
MINIMAL = ["BA", "AB", "BAO", "OBA", "BAC", "BAD", "BAE", "BACE", "BADE", "BECA", "BAOD"]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("thermostat", ["tensor", "group"])
@pytest.mark.parametrize("scheme", MINIMAL)
def test_minimal_schemes_match_reference(scheme, thermostat, dtype, gen):
    st_ = State([1, 3, (7, 13), 4097], dtype, scheme, gen=gen, thermostat=thermostat)
    st_.offsets = [0, 5, 2, 1 << 20]
    grads = make_grads(st_, gen, 3)
    eng, ref = run_pair(st_, grads, eps=eps_for(st_))
    assert_states_close(eng, ref, start=st_)


NAMED = ["BAOAB", "OBABO", "ABOBA", "BACDEDCAB", "overdamped", "OBACDEDCABO"]


def test_named_schemes_are_their_strings():
    assert fold("langevin").letters == fold("BAOAB").letters
    assert fold("adl").letters == fold("BACDEDCAB").letters


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("thermostat", ["tensor", "group"])
@pytest.mark.parametrize("scheme", NAMED)
def test_schemes_match_reference(scheme, thermostat, dtype, gen):
    st_ = State(SIZES, dtype, scheme, gen=gen, thermostat=thermostat)
    st_.offsets = [3, 0, 7, 2**33 + 1]
    grads = make_grads(st_, gen, 3)
    eng, ref = run_pair(st_, grads, eps=eps_for(st_), weight_decay=0.01)
    assert_states_close(eng, ref, start=st_)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("scheme", ["BAOAB", "OBABO", "adl", "overdamped"])
def test_later_steps_from_a_large_step_counter(scheme, dtype, gen):
    # not the first step, a step counter past 2**32 (the counter's field wraps)
    st_ = State([5, 4099, 40000], dtype, scheme, gen=gen)
    grads = make_grads(st_, gen, 3)
    eng, ref = run_pair(st_, grads, step0=2**32 - 2, first=False, eps=eps_for(st_))
    assert_states_close(eng, ref, start=st_)


HYPER_VARIANTS = {
    "weight_decay": dict(weight_decay=0.05),
    "gamma_inf": dict(gamma=math.inf),
    "gamma_zero": dict(gamma=0.0),
    "tau_zero": dict(tau=0.0),
    "sigma_zero": dict(sigma=0.0),
    "eps_zero": dict(eps=0.0),
    "lr_zero": dict(lr=0.0),
    "big_lr": dict(lr=0.7, gamma=3.0, tau=2.0, sigma=1.0, weight_decay=0.3),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", list(HYPER_VARIANTS))
@pytest.mark.parametrize("scheme", ["BAOAB", "OBACDEDCABO", "overdamped"])
def test_hyperparameter_variants_match_reference(scheme, variant, dtype, gen):
    st_ = State([3, 4097, 40001], dtype, scheme, gen=gen, thermostat="group")
    grads = make_grads(st_, gen, 2)
    hyper = dict(eps=eps_for(st_))
    hyper.update(HYPER_VARIANTS[variant])
    eng, ref = run_pair(st_, grads, **hyper)
    assert_states_close(eng, ref)
    if variant != "lr_zero":
        assert not torch.equal(eng.params[2], st_.params[2])
    else:
        for a, b in zip(eng.params, st_.params):
            assert torch.equal(a, b)


def test_many_tensors_in_one_call(gen):
    sizes = [int(x) for x in torch.randint(1, 300, (250,), generator=gen)]
    for scheme, thermostat in [("adl", "tensor"), ("BAOAB", "group"), ("OBACDEDCABO", "group"),
                               ("overdamped", "tensor")]:
        for dtype in (F32, F64):
            st_ = State(sizes, dtype, scheme, gen=gen, thermostat=thermostat)
            st_.uids = [(i // 100) << 16 | (i % 100) for i in range(len(sizes))]
            st_.offsets = [i % 5 for i in range(len(sizes))]
            grads = make_grads(st_, gen, 2)
            eng, ref = run_pair(st_, grads, eps=eps_for(st_))
            assert_states_close(eng, ref, start=st_)


def test_empty_list_and_empty_tensor(gen):
    assert kernels.thermo_step([], [], [], scheme=fold("adl"), xi=None, segments=[], seed=1,
                               step=0, uids=[], **HYPER) is None
    st_ = State([0, 5], F32, "adl", gen=gen)
    grads = make_grads(st_, gen, 1)
    eng, ref = run_pair(st_, grads, eps=0.1)
    assert_states_close(eng, ref)


@st.composite
def valid_schemes(draw):
    """Valid strings by construction: a B-run and an A-run with other letters, rotated."""
    other = "OCDE"
    b_part = "B" + draw(st.text(alphabet="BOCDE", max_size=5))
    a_part = "A" + draw(st.text(alphabet="A" + other, max_size=5))
    s = b_part + a_part
    k = draw(st.integers(0, len(s) - 1))
    return s[k:] + s[:k]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=valid_schemes(), dtype=st.sampled_from([F32, F64]),
       thermostat=st.sampled_from(["tensor", "group"]), first=st.booleans(),
       lr=st.floats(0.01, 0.5), gamma=st.sampled_from([0.0, 0.5, 2.0, math.inf]),
       tau=st.sampled_from([0.0, 0.1, 1.0]), wd=st.sampled_from([0.0, 0.1]),
       step0=st.integers(0, 2**33))
def test_random_schemes_match_reference(scheme, dtype, thermostat, first, lr, gamma, tau, wd,
                                        step0, gen):
    st_ = State([3, 70, 517], dtype, scheme, gen=gen, thermostat=thermostat)
    st_.offsets = [1, 0, 6]
    grads = make_grads(st_, gen, 2)
    eng, ref = run_pair(st_, grads, step0=step0, first=first, lr=lr, gamma=gamma, tau=tau,
                        sigma=0.2, eps=0.01, weight_decay=wd)
    assert_states_close(eng, ref)


# ---------------------------------------------------------------------------------------------
# Hand-written steps: the engine (and so the oracle) follows docs/DESIGN.md, Letters and Noise,
# literally
# ---------------------------------------------------------------------------------------------

def R(n, *, uid, step, draw, offset=0, seed=SEED):
    return normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=offset).double()


def test_baoab_by_hand(gen):
    n, h, gam, tau, wd = 5000, 0.3, 1.5, 0.7, 0.02
    th, p, g1, g2 = (torch.randn(n, generator=gen, dtype=F64) for _ in range(4))
    uid, off = (2 << 16) | 3, 9
    T, P = th.clone(), p.clone()
    kw = dict(scheme=fold("BAOAB"), lr=h, gamma=gam, tau=tau, sigma=0.0, eps=0.0,
              weight_decay=wd, xi=None, segments=[0], seed=SEED, uids=[uid], offsets=[off])
    assert kernels.thermo_step([T], [P], [g1], step=0, first=True, **kw) is None
    assert kernels.thermo_step([T], [P], [g2], step=1, first=False, **kw) is None
    a, b = math.exp(-gam * h), math.sqrt(tau * (1 - math.exp(-2 * gam * h)))
    # first step: B(h/2) A(h/2) O(h) A(h/2)
    p = p - h / 2 * (g1 + wd * th)
    th = th + h / 2 * p
    p = a * p + b * R(n, uid=uid, step=0, draw=0, offset=off)
    th = th + h / 2 * p
    # later step: B(h) A(h/2) O(h) A(h/2)
    p = p - h * (g2 + wd * th)
    th = th + h / 2 * p
    p = a * p + b * R(n, uid=uid, step=1, draw=0, offset=off)
    th = th + h / 2 * p
    assert_close(T, th, 1e-12, "theta")
    assert_close(P, p, 1e-12, "p")


def test_obabo_first_step_uses_draw_one(gen):
    # "BO·OBA": on the first step only O(h/2) B(h/2) A(h) run, and that O is draw 1
    n, h, gam, tau = 999, 0.25, 0.8, 1.3
    th, p, g = (torch.randn(n, generator=gen, dtype=F64) for _ in range(3))
    T, P = th.clone(), p.clone()
    assert kernels.thermo_step([T], [P], [g], scheme=fold("OBABO"), lr=h, gamma=gam, tau=tau,
                               sigma=0.0, eps=0.0, weight_decay=0.0, xi=None, segments=[0],
                               seed=SEED, step=4, uids=[11], first=True) is None
    a, b = math.exp(-gam * h / 2), math.sqrt(tau * (1 - math.exp(-gam * h)))
    p = a * p + b * R(n, uid=11, step=4, draw=1)
    p = p - h / 2 * g
    th = th + h * p
    assert_close(T, th, 1e-12, "theta")
    assert_close(P, p, 1e-12, "p")


def test_adl_by_hand_group_thermostat(gen):
    # later step of "B·BACDEDCA" with one xi for two tensors
    sizes, h, tau, sig, eps = [300, 77], 0.2, 0.4, 0.3, 0.01
    ths = [torch.randn(s, generator=gen, dtype=F64) for s in sizes]
    ps = [torch.randn(s, generator=gen, dtype=F64) for s in sizes]
    gs = [torch.randn(s, generator=gen, dtype=F64) for s in sizes]
    xi0 = 0.3
    T, P, XI = [t.clone() for t in ths], [t.clone() for t in ps], torch.tensor([xi0], dtype=F64)
    uids = [5, 6]
    assert kernels.thermo_step(T, P, gs, scheme=fold("adl"), lr=h, gamma=0.0, tau=tau, sigma=sig,
                               eps=eps, weight_decay=0.0, xi=XI, segments=[0, 0], seed=SEED,
                               step=3, uids=uids, first=False) is None
    d = h / 2
    for i in range(2):
        ps[i] = ps[i] - h * gs[i]
        ths[i] = ths[i] + d * ps[i]
        ps[i] = math.exp(-xi0 * d) * ps[i]
        ps[i] = ps[i] + sig * math.sqrt(d) * R(sizes[i], uid=uids[i], step=3, draw=0)
    xi1 = xi0 + h * eps * (sum(float((q * q).sum()) for q in ps) - sum(sizes) * tau)
    for i in range(2):
        ps[i] = ps[i] + sig * math.sqrt(d) * R(sizes[i], uid=uids[i], step=3, draw=1)
        ps[i] = math.exp(-xi1 * d) * ps[i]
        ths[i] = ths[i] + d * ps[i]
        assert_close(T[i], ths[i], 1e-12, "theta")
        assert_close(P[i], ps[i], 1e-12, "p")
    assert abs(float(XI) - xi1) <= 1e-9 * abs(xi1)
    assert abs(xi1 - xi0) > 1e-3  # the test moved xi


def test_overdamped_by_hand(gen):
    n, h, tau, wd = 4099, 0.05, 0.3, 0.1
    th, g = (torch.randn(n, generator=gen, dtype=F64) for _ in range(2))
    T = th.clone()
    assert kernels.thermo_step([T], [None], [g], scheme=fold("overdamped"), lr=h, gamma=1.0,
                               tau=tau, sigma=0.0, eps=0.0, weight_decay=wd, xi=None,
                               segments=[0], seed=SEED, step=7, uids=[1], offsets=[3]) is None
    want = th - h * (g + wd * th) + math.sqrt(2 * h * tau) * R(n, uid=1, step=7, draw=0,
                                                               offset=3)
    assert_close(T, want, 1e-12, "theta")


def test_gamma_inf_resamples_momentum(gen):
    # later BAOAB step with gamma = inf: the stored p is exactly sqrt(tau) R (the O is last
    # to touch p), whatever p was before
    for dtype in (F32, F64):
        st_ = State([5000], dtype, "BAOAB", gen=gen)
        grads = make_grads(st_, gen, 1)
        st_.step(kernels.thermo_step, grads[0], step=2, first=False, gamma=math.inf, tau=0.3)
        want = math.sqrt(0.3) * R(5000, uid=st_.uids[0], step=2, draw=0)
        assert_close(st_.momenta[0].double(), want, RTOL[dtype], "p")


def test_tau_zero_has_no_noise(gen):
    st_ = State([4097, 70000], F64, "OBACDEDCABO", gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    a, b = st_.clone(), st_.clone()
    a.step(kernels.thermo_step, grads, step=0, first=True, tau=0.0, sigma=0.0, seed=1)
    b.step(kernels.thermo_step, grads, step=0, first=True, tau=0.0, sigma=0.0, seed=2)
    assert_states_equal(a, b)
    c = st_.clone()
    c.step(kernels.thermo_step, grads, step=0, first=True, tau=0.5, sigma=0.0, seed=1)
    assert not torch.equal(a.params[0], c.params[0])


# ---------------------------------------------------------------------------------------------
# Determinism: thread counts (in process and via OMP_NUM_THREADS) and ISAs
# ---------------------------------------------------------------------------------------------

DET_SIZES = [2**17 + 3, 5, 2**16, 70001]


@pytest.mark.parametrize("scheme,thermostat", [("adl", "group"), ("adl", "tensor"),
                                               ("BAOAB", "tensor"), ("overdamped", "tensor"),
                                               ("OBACDEDCABO", "group")])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_bitwise_across_thread_counts(scheme, thermostat, dtype, gen, restore_threads):
    st_ = State(DET_SIZES, dtype, scheme, gen=gen, thermostat=thermostat)
    st_.offsets = [1, 0, 2**15 + 7, 3]
    grads = make_grads(st_, gen, 3)
    results = []
    for threads in (1, 2, 1):
        restore_threads(threads)
        assert thermo_ext._C.get_num_threads() == threads
        s = st_.clone()
        for k, g in enumerate(grads):
            assert s.step(kernels.thermo_step, g, step=k, first=k == 0, eps=eps_for(s)) is None
        results.append(s)
    assert_states_equal(results[0], results[1])
    assert_states_equal(results[0], results[2])
    if scheme == "adl":
        assert not torch.equal(results[0].xi, st_.xi)


SUBPROCESS_SCRIPT = textwrap.dedent(r"""
    import sys, json, torch
    import thermo_ext
    from thermo_ext import kernels
    from thermo_ext.schemes import fold
    torch.manual_seed(0)
    res = {}
    sizes = [2**16 + 3, 5, 40001]
    cases = [("adl", "group"), ("adl", "tensor"), ("BAOAB", "tensor"),
             ("OBACDEDCABO", "group"), ("overdamped", "tensor")]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for scheme, seg in (cases if dtype != torch.bfloat16 else cases[:3]):
            f = fold(scheme)
            mdt = kernels.momentum_dtype(dtype)
            ps = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
            ms = [torch.randn(n, dtype=mdt) if f.uses_momentum else None for n in sizes]
            segs = list(range(len(sizes))) if seg == "tensor" else [0] * len(sizes)
            xi = torch.full((max(segs) + 1,), 0.1, dtype=torch.float64)
            for k in range(2):
                gs = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
                bad = kernels.thermo_step(ps, ms, gs, scheme=f, lr=0.1, gamma=1.0, tau=0.5,
                                          sigma=0.3, eps=1e-5, weight_decay=0.01, xi=xi,
                                          segments=segs, seed=2**40 + 1, step=k,
                                          uids=[7, 8, 9], offsets=[1, 0, 2**15 + 7],
                                          first=k == 0)
                assert bad is None
            res[f"{dtype}/{scheme}/{seg}"] = dict(params=ps, momenta=ms, xi=xi)
    # a plan kept over steps: from its second step it stores the read-only phase's normals
    f = fold("adl")
    ps = [torch.randn(n, dtype=torch.float64).float() for n in sizes]
    ms = [torch.randn(n) for n in sizes]
    xi = torch.full((1,), 0.1, dtype=torch.float64)
    plan = kernels.EnginePlan(ps, ms, scheme=f, xi=xi, segments=[0, 0, 0], seg_numel=None,
                              seed=2**40 + 3, uids=[7, 8, 9], offsets=[1, 0, 2**15 + 7])
    for k in range(3):
        gs = [torch.randn(n) for n in sizes]
        plan.set(gs, lr=0.1, gamma=1.0, tau=0.5, sigma=0.3, eps=1e-5, weight_decay=0.0,
                 step=k, first=k == 0)
        assert kernels.run_plans([plan], check=True) is None
    res["plan/adl"] = dict(params=ps, momenta=ms, xi=xi)
    z = thermo_ext.random.normal(2**17 + 9, seed=5, uid=1, step=2, draw=3, offset=6)
    res["normal"] = dict(params=[z], momenta=[], xi=torch.zeros(1, dtype=torch.float64))
    torch.save(res, sys.argv[1])
    print(json.dumps({"isa": thermo_ext.build_info()["isa"],
                      "threads": thermo_ext._C.get_num_threads()}))
""")


class _Runs:
    """The script run in fresh processes under given environments, each run once per module."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.cache = {}
        (tmp / "det_script.py").write_text(SUBPROCESS_SCRIPT)

    def __call__(self, threads, isa=None):
        key = (threads, isa)
        if key not in self.cache:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # isa None: as this process
            if isa is not None:
                env["THERMO_EXT_ISA"] = isa
            path = self.tmp / f"run_{threads}_{isa}.pt"
            proc = subprocess.run([sys.executable, str(self.tmp / "det_script.py"), str(path)],
                                  env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            self.cache[key] = info, torch.load(path)
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("determinism"))


def _assert_results_bitwise(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        for field in ("params", "momenta"):
            for i, (x, y) in enumerate(zip(a[key][field], b[key][field])):
                assert bits_equal(x, y), f"{what}: {key} {field}[{i}] differ"
        assert bits_equal(a[key]["xi"], b[key]["xi"]), f"{what}: {key} xi differs"


def test_bitwise_across_omp_num_threads(runs):
    info1, one = runs(1)
    info2, two = runs(2)
    assert info1["threads"] == 1 and info2["threads"] == 2
    _assert_results_bitwise(one, two, "OMP_NUM_THREADS 1 vs 2")


#: The CPU flags each instruction set of the engine needs (csrc/cpu/engine_cpu.cpp, supported).
ISA_FLAGS = {"baseline": (), "avx2": ("avx2", "fma"),
             "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma")}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
def test_bitwise_across_isas(runs, isa):
    # every instruction set the CPU has against the one the engine picks by itself
    info = thermo_ext.build_info()
    if isa not in info["isas"]:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip(f"ISA {isa}: x86 only; this build runs on {platform.machine()}")
        flags = _cpu_flags()
        missing = ([f for f in ISA_FLAGS[isa] if f not in flags] if flags is not None
                   else list(ISA_FLAGS[isa]))
        pytest.skip(f"ISA {isa}: compiled in, but this CPU does not expose "
                    f"{', '.join(missing)} (supported here: {', '.join(info['isas'])})")
    base_info, base = runs(2)
    assert base_info["isa"] == info["isa"]
    got_info, got = runs(2, isa)
    assert got_info["isa"] == isa
    _assert_results_bitwise(base, got, f"ISA {info['isa']} vs {isa}")


# ---------------------------------------------------------------------------------------------
# A plan's store of normals: from its second step on, the CPU engine keeps the normals that the
# read-only phases drew and the later phases read them back instead of drawing them again
# (csrc/cpu/cpu_engine.h, CpuStore). The bits must be those of drawing them again, which a fresh
# plan per step (thermo_step) still does.
# ---------------------------------------------------------------------------------------------

STORE_SIZES = [2**16 + 3, 5, 40001]


def _plan(st):
    return kernels.EnginePlan(st.params, st.momenta, scheme=st.scheme, xi=st.xi,
                              segments=st.segments, seg_numel=None, seed=SEED, uids=st.uids,
                              offsets=st.offsets)


def _set(plan, grads, k, **hyper):
    kw = dict(HYPER, eps=1e-5)
    kw.update(hyper)
    plan.set(grads, step=k, first=k == 0, **kw)


def _fresh_step(st, grads, k, check=True, **hyper):
    kw = dict(HYPER, eps=1e-5)
    kw.update(hyper)
    return st.step(kernels.thermo_step, grads, step=k, first=k == 0, check_finite=check, **kw)


@pytest.mark.parametrize("scheme", ["adl", "BACDEODEDCAB", "OBACDEDCABO", "BAOEOAB"])
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("check", [True, False], ids=["check", "nocheck"])
def test_plan_store_gives_the_bits_of_redrawing(scheme, dtype, check, gen):
    st_ = State(STORE_SIZES, dtype, scheme, gen=gen, thermostat="group")
    st_.offsets = [3, 0, 2**15 + 1]
    grads = make_grads(st_, gen, 4)
    kept, fresh = st_.clone(), st_.clone()
    plan = _plan(kept)
    for k, g in enumerate(grads):
        _set(plan, g, k, weight_decay=0.01 if k % 2 else 0.0)
        assert kernels.run_plans([plan], check=check) is None
        assert _fresh_step(fresh, g, k, check, weight_decay=0.01 if k % 2 else 0.0) is None
        for x, y in zip(kept.tensors(), fresh.tensors()):
            assert bits_equal(x, y), f"step {k}"
    assert not torch.equal(kept.xi, st_.xi)


def _kept_plan_follows_fresh_plans(st_, grads, run, **hyper_of_step):
    """Steps a plan kept over the steps (``run(plan)`` runs it and returns the engine's
    verdict) and fresh plans side by side, the hyperparameters of step k from
    ``hyper_of_step[key](k)``; every step must pass and both must agree bitwise."""
    kept, fresh = st_.clone(), st_.clone()
    plan = _plan(kept)
    for k, g in enumerate(grads):
        hyper = {key: f(k) for key, f in hyper_of_step.items()}
        _set(plan, g, k, **hyper)
        assert run(plan) is None
        assert _fresh_step(fresh, g, k, **hyper) is None
        assert_states_equal(kept, fresh)
    return kept, plan


def test_plan_store_with_a_zero_noise_scale(gen):
    # sigma = 0: D draws nothing, so nothing is stored; the steps still match
    st_ = State(STORE_SIZES, F32, "adl", gen=gen)
    _kept_plan_follows_fresh_plans(
        st_, make_grads(st_, gen, 3),
        lambda plan: kernels.run_plans([plan], check=True),
        sigma=lambda k: 0.0 if k == 1 else 0.3)


def _step_plans(plans):
    """A checked step over several plans, in the optimizer's order (backends.run_step: every
    plan's "pre" before any plan's "finish")."""
    return backends.run_step(backends.BACKENDS["engine"], plans, check=True, flag=None,
                             agreement=None, capturable=False)


def test_plan_stores_are_per_plan_in_a_step_of_several_plans(gen):
    # several plans in one checked step: every plan's read-only phase runs before any plan
    # writes, so each plan needs its own store
    states = [State(STORE_SIZES, F32, "adl", gen=gen) for _ in range(3)]
    for i, s in enumerate(states):
        s.uids = [(i << 16) | j for j in range(len(STORE_SIZES))]
    grads = [make_grads(s, gen, 3) for s in states]
    kept = [s.clone() for s in states]
    fresh = [s.clone() for s in states]
    plans = [_plan(s) for s in kept]
    for k in range(3):
        for pl, g in zip(plans, grads):
            _set(pl, g[k], k)
        assert _step_plans(plans) is None
        for s, g in zip(fresh, grads):
            assert _fresh_step(s, g[k], k) is None
        for a, b in zip(kept, fresh):
            assert_states_equal(a, b)


def test_plan_store_pre_then_finish(gen):
    def pre_then_finish(plan):
        assert kernels.run_plans([plan], check=True, mode="pre") is None
        return kernels.run_plans([plan], check=False, mode="finish")

    st_ = State(STORE_SIZES, F32, "BACDEODEDCAB", gen=gen)
    _kept_plan_follows_fresh_plans(st_, make_grads(st_, gen, 3), pre_then_finish)


def test_plan_store_refused_step_changes_nothing(gen):
    st_ = State(STORE_SIZES, F32, "adl", gen=gen)
    grads = make_grads(st_, gen, 4)
    kept, fresh = st_.clone(), st_.clone()
    plan = _plan(kept)
    for k in range(2):
        _set(plan, grads[k], k)
        assert kernels.run_plans([plan], check=True) is None
        assert _fresh_step(fresh, grads[k], k) is None
    before = kept.clone()
    bad = [g.clone() for g in grads[2]]
    bad[2][7] = float("nan")
    _set(plan, bad, 2)
    assert kernels.run_plans([plan], check=True) == Refusal(0, 2, "gradient")
    assert_states_equal(kept, before)
    for k in (2, 3):
        _set(plan, grads[k], k)
        assert kernels.run_plans([plan], check=True) is None
        assert _fresh_step(fresh, grads[k], k) is None
        assert_states_equal(kept, fresh)


# ---------------------------------------------------------------------------------------------
# Sharding by global offsets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 4097, 2**15 + 3])
@pytest.mark.parametrize("scheme", ["BAOAB", "OBABO", "overdamped", "OBADAOB", "adl",
                                    "OBACDEDCABO"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_two_shards_equal_the_whole(scheme, cut, dtype, gen):
    n = 2**17 + 5
    whole = State([n], dtype, scheme, gen=gen)
    whole.offsets = [0]
    grads = make_grads(whole, gen, 2)
    sharded = whole.clone()  # the shards are views into its tensors
    p, m = sharded.params[0], sharded.momenta[0]
    sp = [p[:cut], p[cut:]]
    sm = [m[:cut], m[cut:]] if m is not None else [None, None]
    uid = whole.uids[0]
    has_e = whole.scheme.n_e > 0
    for k, g in enumerate(grads):
        kw = dict(HYPER, scheme=whole.scheme, seed=SEED, step=k, first=k == 0, eps=1e-6)
        assert kernels.thermo_step(whole.params, whole.momenta, g, xi=whole.xi, segments=[0],
                                   uids=[uid], offsets=[0], **kw) is None
        # both shards in one call, the same uid, offsets 0 and cut, one thermostat segment
        assert kernels.thermo_step(sp, sm, [g[0][:cut], g[0][cut:]], xi=sharded.xi,
                                   segments=[0, 0], uids=[uid, uid], offsets=[0, cut],
                                   **kw) is None
    if has_e:
        # the segment sums are added in another order: equal up to rounding
        assert_states_close(sharded, whole)
    else:
        assert_states_equal(sharded, whole)


@pytest.mark.parametrize("scheme", ["BAOAB", "OBABO", "overdamped", "OBADAOB"])
def test_shards_in_separate_calls_equal_the_whole(scheme, gen):
    # without E nothing couples elements: each shard may be stepped on its own (as a data-
    # parallel rank would), with its global offset
    n = 2**17 + 5
    whole = State([n], F32, scheme, gen=gen)
    grads = make_grads(whole, gen, 2)
    sharded = whole.clone()
    cuts = [0, 3, 2**15 + 1, 100000, n]
    uid = whole.uids[0]
    for k, g in enumerate(grads):
        kw = dict(HYPER, scheme=whole.scheme, xi=None, seed=SEED, step=k, first=k == 0)
        kernels.thermo_step(whole.params, whole.momenta, g, segments=[0], uids=[uid],
                            offsets=[0], **kw)
        for a, b in zip(cuts[:-1], cuts[1:]):
            m = sharded.momenta[0]
            kernels.thermo_step([sharded.params[0][a:b]], [m[a:b] if m is not None else None],
                                [g[0][a:b]], segments=[0], uids=[uid], offsets=[a], **kw)
    assert_states_equal(sharded, whole)


@pytest.mark.parametrize("impl", ["engine", "reference"])
@pytest.mark.parametrize("scheme,dtype", [("BAOAB", F32), ("OBADAOB", F64),
                                          ("overdamped", F32), ("BAOAB", torch.bfloat16)])
def test_a_shard_on_another_dim_equals_its_columns_of_the_whole(scheme, dtype, impl, gen):
    """A tensor-parallel shard of columns 3..9 of a (70, 12) tensor: 70 runs of 7 elements at
    global offsets 3 + 12 k (``runs`` = (7, 12)). Stepped alone, it equals those columns of the
    whole tensor's step, bit for bit (bf16: stochastic rounding by global index too; the
    reference in float64: to its rounding), and a non-finite value in it is reported at the
    tensor, not at a run."""
    step_fn = kernels.thermo_step if impl == "engine" else reference.thermo_step
    f = fold(scheme)
    whole = torch.randn(70, 12, generator=gen, dtype=F64).to(dtype)
    mdt = kernels.momentum_dtype(dtype)
    wm = torch.randn(70, 12, generator=gen, dtype=mdt) if f.uses_momentum else None
    part = whole[:, 3:10].contiguous()
    pm = wm[:, 3:10].contiguous() if wm is not None else None
    for k in range(2):
        g = torch.randn(70, 12, generator=gen, dtype=F64).to(dtype)
        kw = dict(HYPER, scheme=f, xi=None, segments=[0], seed=SEED, step=k, first=k == 0,
                  uids=[5])
        assert kernels.thermo_step([whole], [wm], [g], offsets=[0], **kw) is None
        assert step_fn([part], [pm], [g[:, 3:10].contiguous()], offsets=[3], runs=[(7, 12)],
                       **kw) is None
    for a, b in ((part, whole[:, 3:10]), (pm, None if wm is None else wm[:, 3:10])):
        if a is None:
            continue
        if impl == "engine" or dtype != F64:
            assert H.same_bits(a, b)
        else:  # the reference's float64 rounding may differ from the engine's by an ulp
            torch.testing.assert_close(a, b, rtol=RTOL[F64], atol=1e-14)
    g = torch.zeros_like(part)
    g[40, 2] = float("nan")
    bad = step_fn([torch.zeros(3, dtype=dtype), part], [None, None] if pm is None else
                  [torch.zeros(3, dtype=mdt), pm], [torch.zeros(3, dtype=dtype), g],
                  offsets=[0, 3], runs=[None, (7, 12)], **dict(kw, segments=[0, 0],
                                                               uids=[4, 5]))
    assert bad == Refusal(None, 1, "gradient")


def test_runs_are_validated(gen):
    p, m = torch.zeros(12), torch.zeros(12)
    kw = dict(HYPER, scheme=fold("BAOAB"), xi=None, segments=[0], seed=1, step=0, uids=[1],
              offsets=[0])
    for runs in ([(5, 12)], [(4, 3)], [(0, 4)], [(4, 8), None]):
        with pytest.raises(ValueError, match="runs"):
            kernels.thermo_step([p], [m], [torch.ones(12)], runs=runs, **kw)
    assert not p.any() and not m.any()


def test_seg_numel_and_sum_hook_match_reference(gen):
    # a shard of a larger tensor: seg_numel counts the whole; sum_hook adds the other shards'
    # sums (here: a constant), as a distributed all-reduce would
    st_ = State([4097, 70001], F64, "OBACDEDCABO", gen=gen, thermostat="group")
    grads = make_grads(st_, gen, 2)
    seen = []

    def hook(sums):
        seen.append(sums.clone())
        sums += 1234.5

    extra = dict(seg_numel=[3 * 74098.0], sum_hook=hook, eps=1e-6)
    eng, ref = run_pair(st_, grads, **extra)
    assert_states_close(eng, ref, start=st_)
    assert len(seen) == 4  # one E per step, engine and reference
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-12, atol=0)
    # the hook path without a hook's effect equals the plain path
    a, b = st_.clone(), st_.clone()
    for k, g in enumerate(grads):
        a.step(kernels.thermo_step, g, step=k, first=k == 0, eps=1e-6)
        b.step(kernels.thermo_step, g, step=k, first=k == 0, eps=1e-6, sum_hook=lambda s: None)
    assert_states_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: named errors, nothing changed
# ---------------------------------------------------------------------------------------------

def _base_call(gen, scheme="adl", dtype=F32, sizes=(6, 4097)):
    st_ = State(list(sizes), dtype, scheme, gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    kw = dict(HYPER, scheme=st_.scheme, xi=st_.xi, segments=st_.segments, seed=SEED, step=0,
              uids=st_.uids, offsets=st_.offsets, first=False, eps=0.01)
    return st_, grads, kw


def _assert_rejected(st_, grads, kw, exc, name, params=None, momenta=None, call_grads=None):
    """The call with the (possibly replaced) lists raises exc with a message that starts with
    the argument's name, and every original tensor of st_ and grads is bitwise unchanged."""
    params = st_.params if params is None else params
    momenta = st_.momenta if momenta is None else momenta
    call_grads = grads if call_grads is None else call_grads
    originals = [*st_.tensors(), *grads]
    before = [t.clone() for t in originals]
    with pytest.raises(exc) as e:
        kernels.thermo_step(params, momenta, call_grads, **kw)
    msg = str(e.value)
    assert msg.startswith(name), f"message does not start with {name!r}: {msg}"
    for x, y in zip(before, originals):
        assert bits_equal(x, y)


def _replace(lst, i, value):
    out = list(lst)
    out[i] = value
    return out


def _noncontig(t):
    big = torch.zeros(t.numel() * 2, dtype=t.dtype)
    big[::2] = t.reshape(-1)
    return big[::2].view(t.shape)


TENSOR_ERRORS = {
    # name: (function (state, grads) -> (params, momenta, grads), exception, argument name)
    "grad_shape": (lambda s, g: (s.params, s.momenta, _replace(g, 1, g[1][:-1])), ValueError,
                   "grads[1]"),
    "grad_dtype": (lambda s, g: (s.params, s.momenta, _replace(g, 0, g[0].double())), ValueError,
                   "grads[0]"),
    "grad_device": (lambda s, g: (s.params, s.momenta, _replace(g, 1, g[1].to("meta"))),
                    ValueError, "grads[1]"),
    "grad_noncontig": (lambda s, g: (s.params, s.momenta, _replace(g, 1, _noncontig(g[1]))),
                       ValueError, "grads[1]"),
    "grad_sparse": (lambda s, g: (s.params, s.momenta, _replace(g, 0, g[0].to_sparse())),
                    ValueError, "grads[0]"),
    "grad_none": (lambda s, g: (s.params, s.momenta, _replace(g, 1, None)), TypeError,
                  "grads[1]"),
    "mom_shape": (lambda s, g: (s.params, _replace(s.momenta, 1, s.momenta[1][:5]), g),
                  ValueError, "momenta[1]"),
    "mom_dtype": (lambda s, g: (s.params, _replace(s.momenta, 0, s.momenta[0].double()), g),
                  ValueError, "momenta[0]"),
    "mom_device": (lambda s, g: (s.params, _replace(s.momenta, 0, s.momenta[0].to("meta")), g),
                   ValueError, "momenta[0]"),
    "mom_noncontig": (lambda s, g: (s.params, _replace(s.momenta, 1, _noncontig(s.momenta[1])),
                                    g), ValueError, "momenta[1]"),
    "mom_none": (lambda s, g: (s.params, _replace(s.momenta, 1, None), g), TypeError,
                 "momenta[1]"),
    "param_dtype": (lambda s, g: (_replace(s.params, 1, s.params[1].double()), s.momenta, g),
                    ValueError, "params[1]"),
    "param_device": (lambda s, g: (_replace(s.params, 1, s.params[1].to("meta")), s.momenta, g),
                     ValueError, "params[1]"),
    "param_noncontig": (lambda s, g: (_replace(s.params, 1, _noncontig(s.params[1])), s.momenta,
                                      g), ValueError, "params[1]"),
    "param_int": (lambda s, g: (_replace(s.params, 0, s.params[0].to(torch.int32)), s.momenta,
                                g), TypeError, "params[0]"),
    "param_not_tensor": (lambda s, g: (_replace(s.params, 0, [1.0] * 6), s.momenta, g),
                         TypeError, "params[0]"),
    "lengths": (lambda s, g: (s.params, s.momenta, g[:1]), ValueError, "params, momenta, grads"),
}


@pytest.mark.parametrize("case", list(TENSOR_ERRORS))
def test_bad_tensors_rejected(case, gen):
    st_, grads, kw = _base_call(gen)
    make, exc, name = TENSOR_ERRORS[case]
    params, momenta, call_grads = make(st_, grads)
    _assert_rejected(st_, grads, kw, exc, name, params=params, momenta=momenta,
                     call_grads=call_grads)


@pytest.mark.parametrize("name,value,exc", [
    (name, value, exc)
    for name in ["lr", "gamma", "tau", "sigma", "eps", "weight_decay"]
    for value, exc in [(-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                       (-math.inf, ValueError), ("0.1", TypeError), (None, TypeError),
                       (True, TypeError)]
    if not (name == "gamma" and value == math.inf)])  # allowed: tested below
def test_bad_hyperparameters_rejected(name, value, exc, gen):
    st_, grads, kw = _base_call(gen, scheme="OBACDEDCABO")
    kw[name] = value
    _assert_rejected(st_, grads, kw, exc, name)


def test_gamma_inf_and_zero_values_allowed(gen):
    st_, grads, kw = _base_call(gen, scheme="OBACDEDCABO")
    kw.update(gamma=math.inf, lr=0.0, tau=0.0, sigma=0.0, eps=0.0, weight_decay=0.0)
    assert kernels.thermo_step(st_.params, st_.momenta, grads, **kw) is None
    kw.update(gamma=torch.tensor(2.0), lr=torch.tensor(0.1, dtype=F64))  # 0-d tensors work
    assert kernels.thermo_step(st_.params, st_.momenta, grads, **kw) is None


@pytest.mark.parametrize("case", ["xi_dtype", "xi_2d", "xi_none", "xi_short", "segments_len",
                                  "uids_len"])
def test_bad_thermostat_arguments_rejected(case, gen):
    st_, grads, kw = _base_call(gen)
    name = case.split("_")[0]
    if case == "xi_dtype":
        kw["xi"] = st_.xi.float()
    elif case == "xi_2d":
        kw["xi"] = st_.xi.view(1, -1)
    elif case == "xi_none":
        kw["xi"] = None
    elif case == "xi_short":
        kw["xi"] = st_.xi[:1].clone()
        name = "segments"
    elif case == "segments_len":
        kw["segments"] = [0]
    elif case == "uids_len":
        kw["uids"] = [1]
    _assert_rejected(st_, grads, kw, ValueError, name)


@pytest.mark.parametrize("arg,value,exc", [
    ("offsets", [-1, 0], ValueError),      # a negative global index
    ("offsets", [0], ValueError),          # one entry for two tensors
    ("uids", [2**32, 1], ValueError),      # would wrap to uid 0 in the counter
    ("uids", [-1, 1], ValueError),
    ("step", -1, ValueError),              # would become 2**32-1, the thermal-momenta step
    ("seed", -1, ValueError),
    ("seed", 2**64, ValueError),
    ("seed", 1.5, TypeError),
])
def test_bad_counter_arguments_rejected(arg, value, exc, gen):
    # The noise counters take seed in [0, 2**64), uid in [0, 2**32), offset >= 0, step >= 0
    # (thermo_ext.random.normal rejects exactly these); a named error, nothing changed
    st_, grads, kw = _base_call(gen, scheme="BAOAB")
    kw[arg] = value
    _assert_rejected(st_, grads, kw, exc, arg)


# ---------------------------------------------------------------------------------------------
# Non-finite values: (index, kind) returned, nothing modified
# ---------------------------------------------------------------------------------------------

def _snapshot(st_, grads):
    return [t.clone() for t in [*st_.tensors(), *grads]]


def _unchanged(st_, grads, snap):
    return all(bits_equal(x, y) for x, y in zip(snap, [*st_.tensors(), *grads]))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("scheme,where,value,kind", [
    (scheme, where, value, kind)
    for scheme in ["BAOAB", "adl", "overdamped"]
    for where, value, kind in [("grad", math.nan, "gradient"), ("grad", math.inf, "gradient"),
                               ("param", -math.inf, "parameter"), ("param", math.nan, "parameter"),
                               ("mom", math.nan, "momentum")]
    # momenta are checked only by schemes with E (they are summed)
    if where != "mom" or fold(scheme).n_e])
@pytest.mark.parametrize("index,pos", [(0, 0), (2, 2**15 + 1)])
def test_non_finite_is_reported_and_nothing_changes(scheme, where, value, kind, index, pos,
                                                    dtype, gen):
    fs = fold(scheme)
    st_ = State([7, 4097, 2**16 + 9], dtype, fs, gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    target = {"grad": grads, "param": st_.params, "mom": st_.momenta}[where][index]
    target.view(-1)[pos] = value
    for impl in (kernels.thermo_step, reference.thermo_step):
        snap = _snapshot(st_, grads)
        got = st_.step(impl, grads, step=1, first=False, eps=1e-3)
        assert got == Refusal(None, index, kind), impl.__module__
        assert _unchanged(st_, grads, snap), impl.__module__


def test_first_bad_tensor_is_reported(gen):
    st_ = State([7, 4097, 70000], F32, "adl", gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    grads[2][5] = math.nan
    st_.params[1][4000] = math.inf
    snap = _snapshot(st_, grads)
    assert st_.step(kernels.thermo_step, grads, step=0, first=True) == Refusal(None, 1,
                                                                               "parameter")
    assert _unchanged(st_, grads, snap)
    grads[1][0] = math.nan  # same tensor: the gradient is reported before the parameter
    assert st_.step(kernels.thermo_step, grads, step=0, first=True) == Refusal(None, 1,
                                                                               "gradient")


@pytest.mark.parametrize("impl", [kernels.thermo_step, reference.thermo_step],
                         ids=["engine", "reference"])
@pytest.mark.parametrize("xi0,eps", [(-1e308, 0.0),   # exp(-xi delta) overflows in the first C
                                     (-1e4, 0.0),     # exp finite, sum p^2 overflows in E
                                     (0.1, 1e308)])   # xi itself overflows in E
@pytest.mark.parametrize("thermostat", ["tensor", "group"])
def test_thermostat_overflow_is_reported_and_nothing_changes(thermostat, xi0, eps, impl, gen):
    st_ = State([7, 4097, 70000], F64, "adl", gen=gen, thermostat=thermostat)
    grads = make_grads(st_, gen, 1)[0]
    seg = st_.segments[-1]
    st_.xi[seg] = xi0
    if eps:
        # every segment's xi moves by 0.1 eps sum p^2: the 7-element tensor's stays finite
        # (sum p^2 < 17), the first to overflow is the 4097-element tensor's
        assert float((st_.momenta[0].double() ** 2).sum()) < 17
        seg = st_.segments[1]
    snap = _snapshot(st_, grads)
    got = st_.step(impl, grads, step=0, first=True, eps=eps, tau=0.0, lr=0.1, sigma=0.0)
    assert got == Refusal(None, seg, "thermostat")
    assert _unchanged(st_, grads, snap)


def test_check_finite_false_skips_the_check(gen):
    st_ = State([7, 4097], F32, "BAOAB", gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    grads[1][3] = math.nan
    assert st_.step(kernels.thermo_step, grads, step=0, first=True, check_finite=False) is None
    assert torch.isnan(st_.params[1][3]) and torch.isfinite(st_.params[0]).all()


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 parameters with float32 momenta
# ---------------------------------------------------------------------------------------------

def _ulp_distance(a, b):
    """Distance in units in the last place between two 16-bit float tensors (finite values)."""
    def key(t):
        bits = t.view(torch.int16).to(torch.int32)
        mag = bits & 0x7FFF
        return torch.where(bits < 0, -mag, mag)
    return (key(a) - key(b)).abs()


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme", ["BAOAB", "adl", "OBACDEDCABO", "overdamped"])
def test_low_precision_parameters_match_reference(scheme, dtype, stochastic, gen):
    st_ = State([1, 3, 4097, 40001], dtype, scheme, gen=gen, thermostat="tensor")
    st_.offsets = [0, 2, 5, 2**20 + 1]
    grads = make_grads(st_, gen, 3)
    eng, ref = run_pair(st_, grads, eps=eps_for(st_), stochastic_rounding=stochastic)
    for i, (a, b) in enumerate(zip(eng.params, ref.params)):
        assert a.dtype == dtype
        d = _ulp_distance(a, b)
        assert int(d.max()) <= 1, f"params[{i}]: {int(d.max())} ulp"
    for i, (a, b) in enumerate(zip(eng.momenta, ref.momenta)):
        if b is not None:
            assert a.dtype == F32
            # a parameter one ulp apart feeds the next B through weight decay only (0 here) and
            # the next A by adding: p stays float32-close
            assert_close(a, b, 1e-5, f"momenta[{i}]")
    torch.testing.assert_close(eng.xi, ref.xi, rtol=XI_RTOL, atol=1e-15)
    assert not torch.equal(eng.params[3], st_.params[3])


@pytest.mark.parametrize("offset", [0, 5, 2**15 + 3])
def test_bf16_stochastic_rounding_is_unbiased_and_deterministic(offset, gen):
    # theta = 1 + 0.3 ulp(bf16) exactly in float32; stochastic rounding goes up with
    # probability 0.3, round-to-nearest always down. The bits equal the reference's (one Philox
    # word per element), also where blocks start inside a quad (offset)
    n = 100000
    ulp = 2.0**-7
    for stochastic, want in [(True, 0.3), (False, 0.0)]:
        p = torch.ones(n, dtype=torch.bfloat16)
        m = torch.full((n,), 0.3 * ulp, dtype=F32)
        g = torch.zeros(n, dtype=torch.bfloat16)
        kw = dict(scheme=fold("BA"), lr=1.0, gamma=0.0, tau=0.0, sigma=0.0, eps=0.0,
                  weight_decay=0.0, xi=None, segments=[0], seed=99, step=0, uids=[3],
                  offsets=[offset], first=True, stochastic_rounding=stochastic)
        assert kernels.thermo_step([p], [m], [g], **kw) is None
        up = (p.float() == 1.0 + ulp).double().mean().item()
        assert set(p.float().unique().tolist()) <= {1.0, 1.0 + ulp}
        assert abs(up - want) < 5 * math.sqrt(0.3 * 0.7 / n), (stochastic, up)
        q = torch.ones(n, dtype=torch.bfloat16)
        reference.thermo_step([q], [torch.full((n,), 0.3 * ulp, dtype=F32)], [g], **kw)
        assert torch.equal(p, q)


@pytest.mark.parametrize("scheme", ["adl", "BAOAB", "OBACDEDCABO"])
def test_mode_pre_then_finish_equals_all(scheme, gen):
    st_ = State([5, 4097, 70001], F64, scheme, gen=gen, thermostat="group")
    grads = make_grads(st_, gen, 2)
    a, b = st_.clone(), st_.clone()
    ws = torch.empty(max(2 * a.scheme.n_e * a.xi.numel(), 1), dtype=F64)
    for k, g in enumerate(grads):
        assert a.step(kernels.thermo_step, g, step=k, first=k == 0, eps=1e-5) is None
        snap = _snapshot(b, g)
        assert b.step(kernels.thermo_step, g, step=k, first=k == 0, eps=1e-5, mode="pre",
                      workspace=ws) is None
        assert _unchanged(b, g, snap)  # "pre" writes nothing
        assert b.step(kernels.thermo_step, g, step=k, first=k == 0, eps=1e-5, mode="finish",
                      workspace=ws) is None
    assert_states_equal(a, b)
    with pytest.raises(ValueError, match="^mode"):
        b.step(kernels.thermo_step, grads[0], step=0, first=True, mode="bogus")


def test_mode_pre_finish_with_a_too_small_workspace(gen):
    # "pre" leaves the xi versions in the caller's workspace for "finish". A workspace smaller
    # than 2 * n_e * n_seg doubles must be refused (naming workspace) -- or used correctly; it
    # must not be swapped silently for a fresh one, or "finish" runs on uninitialised xi versions.
    st_ = State([1000, 40001], F64, "adl", gen=gen, thermostat="tensor")  # needs 2*1*2 doubles
    grads = make_grads(st_, gen, 1)[0]
    want = st_.clone()
    assert want.step(kernels.thermo_step, grads, step=1, first=False, eps=1e-4) is None
    got = st_.clone()
    ws = torch.zeros(3, dtype=F64)
    try:
        got.step(kernels.thermo_step, grads, step=1, first=False, eps=1e-4, mode="pre",
                 workspace=ws)
        got.step(kernels.thermo_step, grads, step=1, first=False, eps=1e-4, mode="finish",
                 workspace=ws)
    except ValueError as e:
        assert str(e).startswith("workspace"), str(e)
        assert _unchanged(got, grads, _snapshot(st_, grads))
        return
    assert_states_close(got, want)


def test_seg_numel_of_wrong_length_is_named(gen):
    st_, grads, kw = _base_call(gen)  # two segments
    kw["seg_numel"] = [4097.0]
    _assert_rejected(st_, grads, kw, ValueError, "seg_numel")


def test_cuda_tensor_without_a_usable_engine_says_why_and_how_to_fix(monkeypatch):
    from types import SimpleNamespace

    from thermo_ext import cuda_library

    v = cuda_library.Verdict(False, "no library for CUDA 12 here", "Fix: do this", "why", None)
    monkeypatch.setattr(cuda_library, "_verdicts", {0: v})
    fake = SimpleNamespace(device=torch.device("cuda", 0))
    assert kernels._device_index(fake) == 0  # where a tensor lives needs no engine
    with pytest.raises(RuntimeError, match="cannot run on cuda:0: no library for CUDA 12 "
                                           "here. Fix: do this"):
        kernels._engine_index(fake)
    with pytest.raises(ValueError, match="cpu and cuda tensors only"):
        kernels._device_index(SimpleNamespace(device=torch.device("meta")))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["adl", "BACDEDCAB", "OBACEOCAB", "BCAEDEACB"])
def test_sum_phase_without_weight_decay_leaves_theta_unread(scheme, dtype, weight_decay, gen):
    # Without weight decay nothing carries theta into p before an E, so an unchecked read-only
    # phase skips loading theta and running A: the step must be bitwise the one that reads it
    # (the checked step, whose first phase reads theta to check it). With weight decay both read.
    shapes = [5, 4099, 33000]
    state = State(shapes, dtype, scheme, gen=gen)
    grads = make_grads(state, gen, 3)
    checked, unchecked = state.clone(), state.clone()
    for k, g in enumerate(grads):
        kw = dict(step=k, first=k == 0, weight_decay=weight_decay, eps=eps_for(state))
        assert checked.step(kernels.thermo_step, g, check_finite=True, **kw) is None
        assert unchecked.step(kernels.thermo_step, g, check_finite=False, **kw) is None
    for a, b in zip(checked.tensors(), unchecked.tensors()):
        assert torch.equal(a, b)
    ref = state.clone()
    for k, g in enumerate(grads):
        ref.step(reference.thermo_step, g, step=k, first=k == 0, weight_decay=weight_decay,
                 eps=eps_for(state), check_finite=False)
    torch.testing.assert_close(unchecked.xi, ref.xi, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# One definition of each engine constant, read from the compiled module
# ---------------------------------------------------------------------------------------------

def test_python_constants_are_the_engines():
    from thermo_ext import schemes

    C = thermo_ext._C
    assert kernels.DTYPES == {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2,
                              torch.float16: 3}
    assert kernels.DTYPES == {getattr(torch, k): v for k, v in C.DTYPE_CODES.items()}
    assert "".join(sorted(kernels.LETTER_CODES, key=kernels.LETTER_CODES.get)) == "ABOCDEV"
    assert kernels.BAD_KINDS == ("gradient", "parameter", "momentum", "thermostat")
    assert kernels.MODES == {"all": -1, "pre": -2, "finish": -3}
    assert kernels.HYPER_FIELDS == ("lr", "gamma", "tau", "sigma", "eps", "weight_decay",
                                    "mass_beta", "mass_eps", "mass_freeze")
    assert kernels.Hyper._fields == (*kernels.HYPER_FIELDS, "maximize")
    assert schemes.LETTERS == C.SCHEME_LETTERS == "ABOCDE"
    assert set(schemes.NOISE_LETTERS) == set(C.NOISE_LETTERS) == set("ODV")
    assert schemes.MAX_LETTERS == C.MAX_OPS == 32
    assert reference.ROUNDING_DRAW == C.ROUNDING_DRAW == 0xFFFF
    # the longest scheme the engine can hold is accepted, one letter more is not
    fold("B" + "A" * (C.MAX_OPS - 1))
    with pytest.raises(ValueError, match=f"at most {C.MAX_OPS}"):
        fold("B" + "A" * C.MAX_OPS)


def test_uid_is_group_and_position():
    assert kernels.uid(0, 0) == 0
    assert kernels.uid(3, 5) == 3 * 2**16 + 5
    assert kernels.uid(2**16 - 1, 2**16 - 1) == 2**32 - 1
    for args, exc, name in [((2**16, 0), ValueError, "group"), ((-1, 0), ValueError, "group"),
                            ((0, 2**16), ValueError, "position"), ((1.5, 0), TypeError, "group"),
                            ((0, None), TypeError, "position")]:
        with pytest.raises(exc, match=f"^{name}"):
            kernels.uid(*args)


def _python_coefficients(letter, delta, *, lr, gamma, tau, sigma, eps, weight_decay):
    # The letter coefficients as docs/DESIGN.md, Letters states them, in Python's libm.
    if letter in "AC":
        return delta, 0.0, 0.0
    if letter == "B":
        return delta, weight_decay, 0.0
    if letter == "O":
        if math.isinf(gamma):
            return 0.0, math.sqrt(tau), 0.0
        return math.exp(-gamma * delta), math.sqrt(tau * -math.expm1(-2.0 * gamma * delta)), 0.0
    if letter == "D":
        return sigma * math.sqrt(delta), 0.0, 0.0
    if letter == "E":
        return eps * delta, tau, 0.0
    return lr, weight_decay, math.sqrt(2.0 * lr * tau)


@settings(max_examples=60, deadline=None)
@given(letter=st.sampled_from("ABOCDEV"), factor=st.sampled_from([0.25, 1 / 3, 0.5, 1.0, 2.0]),
       lr=st.floats(0, 2), gamma=st.one_of(st.floats(0, 50), st.just(math.inf)),
       tau=st.floats(0, 3), sigma=st.floats(0, 3), eps=st.floats(0, 3), wd=st.floats(0, 1))
def test_engine_coefficients_are_the_formulas(letter, factor, lr, gamma, tau, sigma, eps, wd):
    # The engine computes the coefficients itself (the host's libm here, the same as Python's):
    # the same bits as the formulas.
    hyper = dict(lr=lr, gamma=gamma, tau=tau, sigma=sigma, eps=eps, weight_decay=wd)
    want = _python_coefficients(letter, factor * lr, **hyper)
    assert kernels.coefficients(letter, factor * lr, **hyper) == want
    prog = thermo_ext._C.Program([(kernels.LETTER_CODES[letter], factor, 0, 0)],
                                 [hyper[k] for k in kernels.HYPER_FIELDS[:6]])
    assert prog.ops[0][3:] == want


def test_programs_of_folded_schemes_carry_their_letters():
    f = fold("OBACDEDCABO")
    prog = kernels.build_program(f, False, kernels.Hyper(0.1, 1.0, 0.5, 0.3, 0.2, 0.01, 0.999,
                                                         1e-8, 0, False))
    assert prog.n_ops == len(f.program(False)) and prog.n_e == 1
    for (code, draw, ver, *_), x in zip(prog.ops, f.program(False)):
        assert (code, draw, ver) == (kernels.LETTER_CODES[x.letter], x.draw or 0, x.xi_version)


OPS_ERRORS = {
    # name: (ops, message start)
    "letter": ([(1, 0, 0, 0.1, 0, 0), (9, 0, 0, 0, 0, 0)], "ops[1]: unknown letter"),
    "xi_version_without_e": ([(1, 0, 0, 0.1, 0, 0), (3, 0, 1, 0.1, 0, 0), (0, 0, 0, 0.1, 0, 0)],
                             "ops[1]: C reads xi version 1"),
    "xi_version_ahead": ([(1, 0, 0, 0.1, 0, 0), (5, 0, 0, 0.1, 0.5, 0), (3, 0, 2, 0.1, 0, 0),
                          (0, 0, 0, 0.1, 0, 0)], "ops[2]: C reads xi version 2"),
    "xi_version_negative": ([(3, 0, -1, 0.1, 0, 0)], "ops[0]: C reads xi version -1"),
    "xi_version_on_b": ([(1, 0, 1, 0.1, 0, 0)], "ops[0]: xi_version"),
    "draw_negative": ([(2, -1, 0, 0.9, 0.1, 0)], "ops[0]: draw -1"),
    "draw_rounding": ([(2, 0xFFFF, 0, 0.9, 0.1, 0)], "ops[0]: draw 65535"),
    "draw_twice": ([(2, 1, 0, 0.9, 0.1, 0), (1, 0, 0, 0.1, 0, 0), (4, 1, 0, 0.1, 0, 0)],
                   "ops[2]: draw 1 is already used by ops[0]"),
    "too_long": ([(1, 0, 0, 0.1, 0, 0)] * 33, "ops: at most 32"),
}


@pytest.mark.parametrize("case", list(OPS_ERRORS))
def test_program_rejects_what_no_scheme_folds_to(case):
    ops, start = OPS_ERRORS[case]
    with pytest.raises(ValueError) as e:
        thermo_ext._C.Program(ops)
    assert str(e.value).startswith(start), str(e.value)


def test_program_from_letters_rejects_bad_factors_and_hyperparameters():
    hyper = (0.1, 1.0, 0.5, 0.3, 0.2, 0.0)
    with pytest.raises(ValueError, match=r"^letters\[1\]: factor nan"):
        thermo_ext._C.Program([(1, 0.5, 0, 0), (0, math.nan, 0, 0)], hyper)
    with pytest.raises(ValueError, match=r"^hyper\.tau"):
        thermo_ext._C.Program([(1, 1.0, 0, 0)], (0.1, 1.0, -0.5, 0.3, 0.2, 0.0))
    with pytest.raises(ValueError, match=r"^letters\[0\]: C reads xi version 1"):
        thermo_ext._C.Program([(3, 1.0, 0, 1)], hyper)
    thermo_ext._C.Program([(2, 1.0, 0, 0)], (0.1, math.inf, 0.5, 0.3, 0.2, 0.0))  # gamma = inf


def _plan(st_, **kw):
    args = dict(scheme=st_.scheme, xi=st_.xi, segments=st_.segments, seg_numel=None, seed=SEED,
                uids=st_.uids, offsets=st_.offsets)
    args.update(kw)
    return kernels.EnginePlan(st_.params, st_.momenta, **args)


PLAN_ERRORS = {
    # name: (EnginePlan keyword overrides, exception, argument named)
    "xi_dtype": (lambda s: dict(xi=s.xi.float()), ValueError, "xi"),
    "xi_none": (lambda s: dict(xi=None), TypeError, "xi"),
    "xi_noncontig": (lambda s: dict(xi=torch.zeros(2 * s.xi.numel(), dtype=F64)[::2]),
                     ValueError, "xi"),
    "segments": (lambda s: dict(segments=[0, 5]), ValueError, "segments"),
    "step_tensor_dtype": (lambda s: dict(step_tensor=torch.zeros((), dtype=torch.float32)),
                          ValueError, "step_tensor"),
    "step_tensor_size": (lambda s: dict(step_tensor=torch.zeros(2, dtype=torch.int64)),
                         ValueError, "step_tensor"),
    "step_tensor_device": (lambda s: dict(step_tensor=torch.zeros(1, dtype=torch.int64,
                                                                  device="meta")),
                           ValueError, "step_tensor"),
    "workspace_dtype": (lambda s: dict(workspace=torch.zeros(8, dtype=F32)), ValueError,
                        "workspace"),
    "workspace_small": (lambda s: dict(workspace=torch.zeros(3, dtype=F64)), ValueError,
                        "workspace"),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_plan_checks_every_buffer_it_keeps(case, gen):
    st_ = State([6, 4097], F32, "adl", gen=gen)
    make, exc, name = PLAN_ERRORS[case]
    with pytest.raises(exc, match=f"^{name}"):
        _plan(st_, **make(st_))


@pytest.mark.parametrize("case", ["dtype", "size", "noncontig", "device", "count"])
def test_plan_checks_gradients(case, gen):
    st_ = State([6, 4097], F32, "BAOAB", gen=gen)
    grads = make_grads(st_, gen, 1)[0]
    name = "grads[1]"
    if case == "dtype":
        grads[1] = grads[1].double()
    elif case == "size":
        grads[1] = grads[1][:-1]
    elif case == "noncontig":
        grads[1] = torch.zeros(2 * 4097)[::2]
    elif case == "device":
        grads[1] = grads[1].to("meta")
    else:
        grads, name = grads[:1], "grads"
    plan = _plan(st_)
    with pytest.raises(ValueError, match=rf"^{name}".replace("[", r"\[")):
        plan.set(grads, step=0, first=True, **dict(HYPER, eps=0.1))


def test_device_hyperparameters_are_for_cuda_plans(gen):
    st_ = State([6], F32, "adl", gen=gen)
    with pytest.raises(ValueError, match="^hyper: device hyperparameters are for CUDA"):
        _plan(st_).set_device_hyper(torch.zeros(6, dtype=F64))


def _hooked_plans(gen, scheme, sizes_per_plan, *, bad_plan=None):
    states, plans, seen = [], [], []
    for i, sizes in enumerate(sizes_per_plan):
        st_ = State(sizes, F64, scheme, gen=gen, thermostat="group")
        grads = make_grads(st_, gen, 1)[0]
        if i == bad_plan:
            grads[-1][3] = math.nan
        pl = _plan(st_)
        pl.set(grads, step=1, first=False, **dict(HYPER, eps=1e-3))
        pl.sum_hook = lambda sums, i=i: seen.append((i, sums.clone()))
        states.append((st_, grads))
        plans.append(pl)
    return states, plans, seen


@pytest.mark.parametrize("bad_plan", [None, 0, 1])
def test_sum_hooks_run_for_every_plan_and_e_even_after_a_refusal(bad_plan, gen):
    # A distributed step's reductions live in the sum hooks: a rank that refuses the step must
    # still make every one of them (or the other ranks wait forever), and write nothing.
    scheme = "BACEDECAB"  # two E letters
    states, plans, seen = _hooked_plans(gen, scheme, [[5, 300], [7]], bad_plan=bad_plan)
    snaps = [_snapshot(st_, g) for st_, g in states]
    got = _step_plans(plans)
    n_e = fold(scheme).n_e
    assert [i for i, _ in seen] == [0] * n_e + [1] * n_e
    if bad_plan is None:
        assert got is None
        assert not any(_unchanged(st_, g, s) for (st_, g), s in zip(states, snaps))
        return
    assert got == Refusal(bad_plan, 1 if bad_plan == 0 else 0, "gradient")
    assert all(_unchanged(st_, g, s) for (st_, g), s in zip(states, snaps))
    for i, sums in seen:
        if i == bad_plan:  # the refused plan took part with zeros
            assert torch.equal(sums, torch.zeros_like(sums))
        else:
            assert bool((sums > 0).all())


def test_a_failing_sum_hook_changes_nothing(gen):
    states, plans, _ = _hooked_plans(gen, "adl", [[5, 300], [7]])
    snaps = [_snapshot(st_, g) for st_, g in states]

    def hook(sums):
        raise RuntimeError("the all-reduce failed")

    plans[1].sum_hook = hook
    with pytest.raises(RuntimeError, match="the all-reduce failed"):
        _step_plans(plans)
    assert all(_unchanged(st_, g, s) for (st_, g), s in zip(states, snaps))


def test_run_plans_names_a_bad_mode(gen):
    _, plans, _ = _hooked_plans(gen, "adl", [[5]])
    with pytest.raises(ValueError, match="^mode"):
        kernels.run_plans(plans, check=True, mode="write")
