"""The CUDA engine against the CPU engine (both through thermo_ext.kernels.thermo_step).

Every test needs a CUDA device and skips without one. The CPU engine is the reference: the two
share the letter math, the noise and the rounding (csrc/substeps.h, philox.h, lowp.h) and the
CUDA build turns off FMA contraction, so theta and p usually agree bitwise; the tests allow
1e-6 relative in float32 (1e-12 in float64) because exp(-xi delta) comes from different math
libraries, and xi 1e-10 relative because the segment sums add in a different (but fixed) order.
Bitwise equality is asserted where the contract promises it: the same call twice on one device,
graph replay against eager steps, and the noise and rounding bits.
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers as H
import thermo_ext
from thermo_ext import kernels
from thermo_ext.random import normal
from thermo_ext.schemes import fold



def _engine_runs() -> bool:
    """A CUDA device, and the fused engine can run on it (thermo_ext.cuda_library: the library
    for torch's CUDA major, loaded here; the emulation's plugin loads its own beforehand)."""
    if not torch.cuda.is_available():
        return False
    if thermo_ext._C.cuda_compiled():
        return True
    return thermo_ext.cuda_library.verdict(torch.cuda.current_device()).usable


CUDA = _engine_runs()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")]

# The device under test. Tensors get there through dut(); a harness may redirect these hooks.
DEV = "cuda"
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
RTOL = {F32: 1e-6, F64: 1e-12}
XI_RTOL = 1e-10
SEED = 2**40 + 987654321
HYPER = dict(lr=0.05, gamma=1.0, tau=0.01, sigma=0.02, eps=0.05, weight_decay=1e-3)
SCHEMES = ["langevin", "adl", "OBABO", "ABOBA", "overdamped", "BACDEDCAB"]
# Odd sizes around the engine's quads (4) and chunks (8192 elements).
SIZES = [1, 3, 5, 7, 33, 1021, 8191, 8193, 20001]


def dut(t: torch.Tensor) -> torch.Tensor:
    """A copy of t on the device under test."""
    return t.detach().to(DEV).clone()


def dut_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor on the device under test."""
    return torch.empty(n, dtype=dtype, device=DEV)


def host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def sync() -> None:
    torch.cuda.synchronize()


def new_flag() -> torch.Tensor:
    """The non-finite flag of one step: zeroed by the caller, set by the kernels."""
    return torch.zeros(1, dtype=torch.int32, device=DEV)


# ---------------------------------------------------------------------------------------------
# State: parameters, momenta, gradients and xi of one call, on the CPU; copies go to the device.
# ---------------------------------------------------------------------------------------------

class State(H.CallState):
    def __init__(self, sizes, dtype, scheme, *, seed=0, thermostat="tensor", xi0=None):
        super().__init__(sizes, dtype, scheme, gen=torch.Generator().manual_seed(seed),
                         thermostat=thermostat, with_grads=True, momentum_scale=0.1, xi0=xi0,
                         uid_group=3)

    def to_dut(self):
        return self.copy(dut)

    def to_host(self):
        return self.copy(lambda t: t.detach().clone().cpu())

    def step(self, *, step, first=False, flag=None, **kw):
        args = dict(HYPER)
        args.update(kw)
        thermo = self.scheme.uses_thermostat
        return kernels.thermo_step(
            self.params, self.momenta, self.grads, scheme=self.scheme,
            xi=self.xi if thermo else None, segments=self.segments, seed=SEED, step=step,
            uids=self.uids, offsets=self.offsets, first=first, flag=flag, **args)


def assert_close_state(got: State, want: State, rtol=None):
    rtol = RTOL[F64 if want.dtype == F64 else F32] if rtol is None else rtol
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        torch.testing.assert_close(host(a).double(), host(b).double(), rtol=rtol, atol=rtol,
                                   msg=lambda m: f"params[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got.momenta, want.momenta)):
        if b is not None:
            torch.testing.assert_close(host(a).double(), host(b).double(), rtol=rtol, atol=rtol,
                                       msg=lambda m: f"momenta[{i}]: {m}")
    if want.scheme.uses_thermostat:
        torch.testing.assert_close(host(got.xi), host(want.xi), rtol=XI_RTOL, atol=1e-12,
                                   msg=lambda m: f"xi: {m}")


def assert_equal_state(a: State, b: State):
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(host(x), host(y))


def run_both(state: State, *, steps=((0, True), (7, False)), **kw):
    """The same steps on the device and on the CPU; returns (device state, CPU state)."""
    d, c = state.to_dut(), state.to_host()
    for step, first in steps:
        flag = new_flag()
        assert c.step(step=step, first=first, **kw) is None
        assert d.step(step=step, first=first, flag=flag, **kw) is None
        sync()
        assert int(host(flag)[0]) == 0, f"flag {int(host(flag)[0])} on a finite step"
    return d, c


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (4096, 0), (100003, 5), (12345, 2**33 + 1)])
def test_fill_normal_matches_cpu(n, offset):
    kw = dict(seed=SEED, uid=(2 << 16) | 9, step=12, draw=1, offset=offset)
    got = host(normal(n, device=DEV, **kw))
    want = normal(n, device="cpu", **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Our own log/sin/cos polynomials and IEEE sqrt without contraction: the same bits.
    assert torch.equal(got, want), "normals differ in bits between CUDA and CPU"


def test_fill_normal_any_split():
    kw = dict(seed=5, uid=1, step=3, draw=0)
    whole = host(normal(1001, device=DEV, **kw))
    parts = torch.cat([host(normal(n, device=DEV, offset=o, **kw))
                       for o, n in ((0, 3), (3, 500), (503, 498))])
    assert torch.equal(whole, parts)


# ---------------------------------------------------------------------------------------------
# Parity with the CPU engine
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("thermostat", ["tensor", "group"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_matches_cpu(scheme, thermostat):
    state = State(SIZES, F32, scheme, seed=1, thermostat=thermostat)
    d, c = run_both(state, steps=((0, True), (1, False), (2**32 + 5, False)))
    assert_close_state(d, c)


@pytest.mark.parametrize("scheme", ["langevin", "adl", "overdamped", "OBABO"])
def test_float64_matches_cpu(scheme):
    state = State(SIZES, F64, scheme, seed=2)
    d, c = run_both(state)
    assert_close_state(d, c)


def test_infinite_friction_and_zero_noise_letters():
    # gamma = inf (O sets p = sqrt(tau) R); sigma = 0 and tau = 0 (zero-coefficient noise).
    for kw in (dict(gamma=math.inf), dict(sigma=0.0, tau=0.0), dict(weight_decay=0.0)):
        for scheme in ("langevin", "adl", "overdamped"):
            d, c = run_both(State(SIZES[:6], F32, scheme, seed=3), **kw)
            assert_close_state(d, c)


def test_sharded_offsets_and_misaligned_views():
    # Two shards of one tensor (same uid and segment, global offsets) in one call, starting at
    # element offsets that are not multiples of 4, stored in views that are not 16-byte aligned.
    full = State([30011], F32, "adl", seed=4, thermostat="group")
    cut = 5003
    shards = full.to_host()
    shards.params = [full.params[0][:cut], full.params[0][cut:]]
    shards.grads = [full.grads[0][:cut], full.grads[0][cut:]]
    shards.momenta = [full.momenta[0][:cut], full.momenta[0][cut:]]
    shards.segments = [0, 0]
    shards.uids = [full.uids[0]] * 2
    shards.offsets = [0, cut]

    def misaligned(t):  # a contiguous view starting one element into a device buffer
        buf = dut_empty(t.numel() + 1, t.dtype)
        view = buf[1:]
        view.copy_(t)
        return view

    d = shards.copy(misaligned)
    d.xi = dut(full.xi)
    c = full.to_host()
    for step, first in ((0, True), (1, False)):
        flag = new_flag()
        assert c.step(step=step, first=first) is None
        assert d.step(step=step, first=first, flag=flag) is None
        sync()
        assert int(host(flag)[0]) == 0
    got = torch.cat([host(p) for p in d.params])
    torch.testing.assert_close(got, host(c.params[0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([host(m) for m in d.momenta]), host(c.momenta[0]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(host(d.xi), host(c.xi), rtol=XI_RTOL, atol=1e-12)


def test_distributed_phases_match_whole_step():
    # With a sum_hook the engine runs phase by phase with update_xi between the phases.
    state = State(SIZES, F32, "adl", seed=5)
    whole, c = run_both(state)
    phased = state.to_dut()
    seen = []
    for step, first in ((0, True), (7, False)):
        flag = new_flag()
        phased.step(step=step, first=first, flag=flag, sum_hook=lambda s: seen.append(1))
        sync()
        assert int(host(flag)[0]) == 0
    assert seen, "sum_hook was not called"
    assert_equal_state(phased, whole)
    assert_close_state(phased, c)


def test_pre_then_finish_across_calls():
    # An optimizer with several calls per step runs every "pre" (all that can fail) before any
    # "finish" (the writes), with one flag: a failure in any call leaves every call unchanged.
    a = State(SIZES[:6], F32, "adl", seed=19)
    b = State(SIZES[:5], F32, "langevin", seed=20)
    ws = lambda s: dut_empty(2 * s.scheme.n_e * s.xi.numel(), F64)  # noqa: E731
    da, db = a.to_dut(), b.to_dut()
    wa = ws(da)
    flag = new_flag()
    for mode in ("pre", "finish"):
        da.step(step=4, flag=flag, mode=mode, workspace=wa)
        db.step(step=4, flag=flag, mode=mode)
    sync()
    assert int(host(flag)[0]) == 0
    ra, _ = run_both(a, steps=((4, False),))
    rb, _ = run_both(b, steps=((4, False),))
    assert_equal_state(da, ra)
    assert_equal_state(db, rb)

    b.grads[1][2] = float("nan")
    da, db = a.to_dut(), b.to_dut()
    before = [host(t).clone() for t in da.tensors() + db.tensors()]
    flag = new_flag()
    for mode in ("pre", "finish"):
        da.step(step=4, flag=flag, mode=mode, workspace=wa)
        db.step(step=4, flag=flag, mode=mode)
    sync()
    assert int(host(flag)[0]) == 1 * 4 + 0 + 1
    assert all(torch.equal(host(x), y) for x, y in zip(da.tensors() + db.tensors(), before))


def test_bitwise_repeatable():
    for scheme in ("adl", "langevin"):
        state = State(SIZES + [300007], F32, scheme, seed=6, thermostat="group")
        a, b = state.to_dut(), state.to_dut()
        for s in (a, b):
            for step in range(3):
                s.step(step=step, first=step == 0, flag=new_flag())
        sync()
        assert_equal_state(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("scheme", ["adl", "BCAEDEACB"])
def test_sum_phase_without_weight_decay_leaves_theta_unread(scheme, weight_decay):
    # An unchecked read-only phase without a weight-decay B skips loading theta (4 of its 12
    # bytes per element): the same bits as the checked step, which reads theta to check it.
    state = State(SIZES, F32, scheme, seed=23)
    checked, unchecked, c = state.to_dut(), state.to_dut(), state.to_host()
    for step, first in ((0, True), (5, False)):
        checked.step(step=step, first=first, flag=new_flag(), weight_decay=weight_decay)
        unchecked.step(step=step, first=first, check_finite=False, weight_decay=weight_decay)
        c.step(step=step, first=first, check_finite=False, weight_decay=weight_decay)
    sync()
    assert_equal_state(unchecked, checked)
    assert_close_state(unchecked, c)


def test_segments_in_any_order():
    # Tensors whose segments are not sorted, and a segment without tensors (its xi keeps moving
    # by the E with a zero sum and N = 0, as on the CPU).
    state = State(SIZES, F32, "adl", seed=22)
    state.segments = [(5 * i + 2) % 4 for i in range(len(SIZES))]
    state.xi = torch.tensor([0.1, -0.02, 0.05, 0.0, 0.07], dtype=F64)
    d, c = run_both(state)
    assert_close_state(d, c)


def test_many_tensors_one_call():
    # More tensors than one launch's arguments hold, and more segments than one segment launch.
    gen = torch.Generator().manual_seed(7)
    sizes = [2 * int(x) + 1 for x in torch.randint(0, 1500, (1500,), generator=gen)]
    for scheme, thermostat in (("adl", "tensor"), ("langevin", "group"), ("adl", "group")):
        state = State(sizes, F32, scheme, seed=8, thermostat=thermostat)
        d, c = run_both(state)
        assert_close_state(d, c)


# ---------------------------------------------------------------------------------------------
# Low precision parameters
# ---------------------------------------------------------------------------------------------

def test_bf16_matches_cpu():
    for stochastic in (True, False):
        # Without C letters every operation is IEEE arithmetic on both sides: the same bits,
        # rounding bits included (the same Philox words).
        state = State(SIZES, BF16, "langevin", seed=9)
        d, c = run_both(state, stochastic_rounding=stochastic)
        for x, y in zip(d.params, c.params):
            assert torch.equal(host(x), host(y))
        assert_close_state(d, c, rtol=1e-6)
        # exp(-xi delta) may differ by an ulp between math libraries: within one bf16 rounding.
        state = State(SIZES, BF16, "adl", seed=9)
        d, c = run_both(state, stochastic_rounding=stochastic)
        for x, y in zip(d.params, c.params):
            torch.testing.assert_close(host(x).float(), host(y).float(), rtol=2**-6, atol=1e-6)
        for x, y in zip(d.momenta, c.momenta):
            torch.testing.assert_close(host(x), host(y), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(host(d.xi), host(c.xi), rtol=1e-6, atol=1e-9)


def test_fp16_matches_cpu_and_float32():
    state = State(SIZES, F16, "langevin", seed=10)
    d, c = run_both(state)
    for x, y in zip(d.params, c.params):
        assert torch.equal(host(x), host(y))
    # Against the same step in float32 on the device: within fp16's rounding.
    f = state.copy(lambda t: dut(t.float()) if t.dtype == F16 else dut(t))
    f.dtype = F32
    for step, first in ((0, True), (7, False)):
        f.step(step=step, first=first, flag=new_flag())
    for x, y in zip(d.params, f.params):
        torch.testing.assert_close(host(x).float(), host(y), rtol=2**-9, atol=1e-3)


def test_bf16_stochastic_rounding_unbiased():
    # theta in bf16 and float32 hold the same values and the momenta are float32 in both, so
    # the float32 step computes exactly the value the bf16 step rounds: E[bf16] = float32.
    n = 1 << 18
    state = State([n], BF16, "langevin", seed=11)
    total, var, count = 0.0, 0.0, 0
    for step in range(8):
        b = state.to_dut()
        f = state.copy(lambda t: dut(t.float()) if t.dtype == BF16 else dut(t))
        f.dtype = F32
        b.step(step=100 + step, flag=new_flag())
        f.step(step=100 + step, flag=new_flag())
        x32 = host(f.params[0]).double()
        xb = host(b.params[0]).double()
        # bracket of x32 in bf16: truncation toward zero and the next representable value
        bits = host(f.params[0]).view(torch.int32)
        trunc = (bits & ~0xFFFF).view(torch.float32).double()
        up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32).double()
        assert bool(((xb == trunc) | (xb == up) | (xb == x32)).all()), \
            "stochastic rounding left the bracket of the float32 value"
        exact = trunc == x32
        frac = torch.where(exact, torch.zeros_like(x32), (x32 - trunc) / (up - trunc))
        total += float((xb - x32).sum())
        var += float(((up - trunc) ** 2 * frac * (1 - frac)).sum())
        count += n
    z = total / math.sqrt(var)
    assert abs(z) < 5.0, f"stochastic rounding biased: z = {z:.2f} over {count} values"


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------

def assert_flagged_and_unchanged(state: State, index: int, kind: str):
    """The device step sets the flag to the code of (index, kind) + 1 and changes nothing; the
    CPU engine refuses the same step with (index, kind)."""
    d = state.to_dut()
    before = [host(t).clone() for t in d.tensors()]
    flag = new_flag()
    assert d.step(step=3, flag=flag) is None
    sync()
    assert int(host(flag)[0]) == index * 4 + kernels.BAD_KINDS.index(kind) + 1
    assert all(H.same_bits(host(x), y) for x, y in zip(d.tensors(), before))  # NaN stays NaN
    refusal = state.to_host().step(step=3)
    assert (refusal.index, refusal.kind) == (index, kind)


@pytest.mark.parametrize("scheme", ["langevin", "adl", "overdamped"])
def test_nonfinite_gradient_flags_and_changes_nothing(scheme):
    state = State(SIZES, F32, scheme, seed=12)
    state.grads[3][5] = float("nan")
    state.grads[4][0] = float("inf")
    assert_flagged_and_unchanged(state, 3, "gradient")


def test_nonfinite_parameter_and_momentum():
    state = State(SIZES, F32, "adl", seed=13)
    state.params[3][2] = float("inf")
    state.grads[5][0] = float("nan")
    assert_flagged_and_unchanged(state, 3, "parameter")

    state = State(SIZES, F32, "adl", seed=13)
    state.momenta[1][0] = float("nan")  # checked by schemes with E (their phase 0 reads p)
    assert_flagged_and_unchanged(state, 1, "momentum")


def test_thermostat_overflow_flags():
    state = State(SIZES[:4], F32, "adl", seed=14)
    state.xi[2] = -1e308  # exp(-xi delta) overflows
    assert_flagged_and_unchanged(state, 2, "thermostat")


def test_flag_cleared_and_unchecked_step_runs():
    state = State(SIZES[:5], F32, "langevin", seed=15)
    d = state.to_dut()
    flag = new_flag()
    d.step(step=1, flag=flag)
    sync()
    assert int(host(flag)[0]) == 0
    state.grads[0][0] = float("nan")
    d2, c2 = state.to_dut(), state.to_host()
    assert c2.step(step=1, check_finite=False) is None
    d2.step(step=1, flag=new_flag(), check_finite=False)
    sync()
    assert torch.isnan(host(d2.params[0])[0]) and torch.isnan(c2.params[0][0])
    for x, y in zip(d2.params[1:], c2.params[1:]):
        torch.testing.assert_close(host(x), y, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA graphs and large tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["adl", "langevin"])
def test_graph_capture_replay(scheme):
    state = State(SIZES, F32, scheme, seed=16)
    s0 = 40
    live = state.to_dut()
    step_t = torch.full((), s0, dtype=torch.int64, device=DEV)
    flag = new_flag()
    n_e = live.scheme.n_e
    ws = torch.empty(max(1, 2 * n_e * live.xi.numel()), dtype=F64, device=DEV)

    def one_step(s):
        flag.zero_()
        s.step(step=0, flag=flag, workspace=ws, step_tensor=step_t)

    # warm up on a side stream (loads the kernels), on throw-away copies
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = state.to_dut()
        for _ in range(2):
            warm.step(step=0, flag=flag, workspace=ws, step_tensor=step_t)
    torch.cuda.current_stream().wait_stream(side)
    sync()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step(live)
        step_t += 1
    # capture does not run the kernels: restore the initial values, then replay
    for x, y in zip(live.tensors(), state.to_dut().tensors()):
        x.copy_(y)
    step_t.fill_(s0)
    eager = state.to_dut()
    fixed = state.to_dut()
    for i in range(3):
        graph.replay()
        eager.step(step=s0 + i, flag=new_flag())
        fixed.step(step=s0, flag=new_flag())
        sync()
        assert int(host(flag)[0]) == 0
        assert_equal_state(live, eager)
    assert int(host(step_t)) == s0 + 3
    # fresh noise each replay: a run that reuses one step's noise ends elsewhere
    assert not torch.equal(host(live.params[-1]), host(fixed.params[-1]))
    c = state.to_host()
    for i in range(3):
        c.step(step=s0 + i)
    assert_close_state(live, c)


@pytest.mark.parametrize("scheme", ["adl", "langevin", "overdamped"])
def test_step_tensor_matches_host_step(scheme):
    # capturable: the kernels read the counter from a device tensor, not the call's argument.
    state = State(SIZES, F32, scheme, seed=18)
    host_counted, dev_counted = state.to_dut(), state.to_dut()
    for step in (0, 1, 2**32 + 9):
        host_counted.step(step=step, first=step == 0, flag=new_flag())
        step_t = dut(torch.tensor(step, dtype=torch.int64))
        dev_counted.step(step=12345, first=step == 0, flag=new_flag(), step_tensor=step_t)
    sync()
    assert_equal_state(dev_counted, host_counted)


def test_tensor_over_2_31_elements():
    n = 2**31 + 4099
    need = 3 * 4 * n + (3 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} free")
    # "BEA": phase 0 is B, then E sums p^2 over the whole tensor; the writing phase B A.
    scheme = fold("BEA")
    torch.manual_seed(17)
    theta = torch.randn(n, device=DEV)
    grad = torch.randn(n, device=DEV)
    mom = torch.randn(n, device=DEV).mul_(0.1)
    xi = torch.tensor([0.1], dtype=F64, device=DEV)
    slices = [(0, 4096), (2**31 - 2050, 2**31 + 2051), (n - 3001, n)]
    saved = [(host(theta[a:b]).clone(), host(mom[a:b]).clone(), host(grad[a:b]).clone())
             for a, b in slices]
    kw = dict(HYPER, weight_decay=0.0)
    h = kw["lr"]
    # the sum the E sees, in float64, from p after B(h) computed as the engine does
    total = 0.0
    for a in range(0, n, 1 << 27):
        b = min(n, a + (1 << 27))
        p = mom[a:b] - h * (grad[a:b] + 0.0 * theta[a:b])
        total += float(p.double().pow(2).sum())
        del p
    flag = new_flag()
    kernels.thermo_step([theta], [mom], [grad], scheme=scheme, xi=xi, segments=[0], seed=SEED,
                        step=3, uids=[5], flag=flag, **kw)
    sync()
    assert int(host(flag)[0]) == 0
    want_xi = 0.1 + kw["eps"] * h * (total - n * kw["tau"])
    assert abs(float(xi) - want_xi) <= 1e-10 * abs(want_xi) + 1e-12
    for (a, b), (th0, p0, g0) in zip(slices, saved):
        th, p = th0.clone(), p0.clone()
        cpu_xi = torch.tensor([0.1], dtype=F64)
        kernels.thermo_step([th], [p], [g0], scheme=scheme, xi=cpu_xi, segments=[0],
                            seg_numel=[float(n)], seed=SEED, step=3, uids=[5], offsets=[a], **kw)
        torch.testing.assert_close(host(theta[a:b]), th, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(host(mom[a:b]), p, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Through the optimizer
# ---------------------------------------------------------------------------------------------

SHAPES = [(16, 8), (16,), (4, 16), (4,), (3, 3, 3)]


def _opt_params(on_dut: bool):
    g = torch.Generator().manual_seed(31)
    out = []
    for s in SHAPES:
        t = torch.randn(s, generator=g)
        p = torch.nn.Parameter(dut(t) if on_dut else t)
        p.grad = torch.zeros_like(p)
        out.append(p)
    return out


def _grads(k):
    g = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _thermo(params, lr=0.05, **kw):
    from thermo_ext.optim import Thermo
    groups = [{"params": params[:2], "scheme": "adl"},
              {"params": params[2:4], "scheme": "langevin"},
              {"params": params[4:], "scheme": "OBABO", "thermostat": "group"}]
    return Thermo(groups, lr=lr, tau=0.01, sigma=0.02, seed=2024, **kw)


def _four_steps_on_both(**kw):
    """The same optimizer on the device and on the CPU, four steps of the same gradients:
    (device params, CPU params, device optimizer, CPU optimizer)."""
    dev_p, cpu_p = _opt_params(True), _opt_params(False)
    dev_o, cpu_o = _thermo(dev_p, **kw), _thermo(cpu_p, **kw)
    for k in range(4):
        for a, b, g in zip(dev_p, cpu_p, _grads(k)):
            a.grad.copy_(g)
            b.grad.copy_(g)
        dev_o.step()
        cpu_o.step()
    return dev_p, cpu_p, dev_o, cpu_o


def test_optimizer_matches_cpu():
    dev_p, cpu_p, _, _ = _four_steps_on_both()
    for a, b in zip(dev_p, cpu_p):
        torch.testing.assert_close(host(a.detach()), b.detach(), rtol=1e-5, atol=1e-6)


def test_optimizer_nonfinite_raises_and_changes_nothing():
    dev_p = _opt_params(True)
    dev_o = _thermo(dev_p)
    for k in range(2):
        for a, g in zip(dev_p, _grads(k)):
            a.grad.copy_(g)
        dev_o.step()
    dev_p[3].grad[1] = float("nan")  # the second call: the first must stay untouched too
    before = [host(p.detach()).clone() for p in dev_p]
    with pytest.raises(FloatingPointError):
        dev_o.step()
    assert all(torch.equal(host(p.detach()), b) for p, b in zip(dev_p, before))


def _step_both(runs, k):
    """Gradients _grads(k) into every (params, optimizer) run, then a step of each."""
    for params, opt in runs:
        for a, g in zip(params, _grads(k)):
            a.grad.copy_(dut(g))
        opt.step()


def test_optimizer_device_counter_matches_host_counter():
    # Without a graph, capturable=True keeps the counter on the device and changes nothing else.
    cap_p, plain_p = _opt_params(True), _opt_params(True)
    cap_o, plain_o = _thermo(cap_p, capturable=True), _thermo(plain_p)
    for k in range(3):
        _step_both([(cap_p, cap_o), (plain_p, plain_o)], k)
    sync()
    for a, b in zip(cap_p, plain_p):
        assert torch.equal(host(a.detach()), host(b.detach()))
    for group in cap_o.param_groups:
        assert isinstance(group["step"], torch.Tensor) and int(host(group["step"])) == 3


def test_optimizer_device_counter_skips_nonfinite_step():
    # capturable=True cannot raise (no host read): a flagged step changes nothing and is counted.
    dev_p = _opt_params(True)
    dev_o = _thermo(dev_p, capturable=True)
    for k in range(2):
        _step_both([(dev_p, dev_o)], k)
    assert int(host(dev_o.skipped_steps())) == 0
    dev_p[3].grad[1] = float("nan")
    before = [host(p.detach()).clone() for p in dev_p]
    dev_o.step()
    sync()
    assert all(torch.equal(host(p.detach()), b) for p, b in zip(dev_p, before))
    assert int(host(dev_o.skipped_steps())) == 1
    _step_both([(dev_p, dev_o)], 3)
    sync()
    assert int(host(dev_o.skipped_steps())) == 1
    assert not torch.equal(host(dev_p[0].detach()), before[0])


def test_optimizer_device_counter_does_not_advance_on_a_skipped_step():
    # torch's found_inf rule: a step skipped on the device leaves the device counter alone, so
    # the next step draws the noise the eager run (which refused the same step) draws.
    dev_p, eager_p = _opt_params(True), _opt_params(True)
    dev_o, eager_o = _thermo(dev_p, capturable=True), _thermo(eager_p)
    for k in range(2):
        _step_both([(dev_p, dev_o), (eager_p, eager_o)], k)
    dev_p[3].grad[1] = float("nan")
    eager_p[3].grad[1] = float("nan")
    dev_o.step()  # skipped on the device
    with pytest.raises(FloatingPointError):
        eager_o.step()
    sync()
    assert [int(host(g["step"])) for g in dev_o.param_groups] == [2, 2, 2]
    _step_both([(dev_p, dev_o), (eager_p, eager_o)], 3)
    sync()
    assert [int(host(g["step"])) for g in dev_o.param_groups] == [3, 3, 3]
    for a, b in zip(dev_p, eager_p):
        assert torch.equal(host(a.detach()), host(b.detach()))


def test_optimizer_device_hyperparameters_follow_in_place_changes():
    # capturable=True: every CUDA call computes its coefficients from the group's
    # hyperparameters on the device, so an lr tensor changed in place (as torch's schedulers
    # change a tensor lr) reaches the next step without a host read -- and a graph's replays.
    lr = dut(torch.tensor(0.05, dtype=F64))
    cap_p, plain_p = _opt_params(True), _opt_params(True)
    cap_o, plain_o = _thermo(cap_p, capturable=True, lr=lr), _thermo(plain_p)
    for k in range(4):
        if k == 2:
            lr.fill_(0.02)
            for g in plain_o.param_groups:
                g["lr"] = 0.02
        _step_both([(cap_p, cap_o), (plain_p, plain_o)], k)
    sync()
    for a, b in zip(cap_p, plain_p):  # device and host exp/sqrt may differ by an ulp
        torch.testing.assert_close(host(a.detach()), host(b.detach()), rtol=1e-6, atol=1e-7)


def test_optimizer_capturable_graph_replay():
    cap_p, eager_p = _opt_params(True), _opt_params(True)
    cap_o, eager_o = _thermo(cap_p, capturable=True), _thermo(eager_p)
    grads = [[g.to(DEV) for g in _grads(k)] for k in range(6)]

    def set_grads(k):
        for a, b, g in zip(cap_p, eager_p, grads[k]):
            a.grad.copy_(g)
            b.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (the first step differs), as torch recommends
        for k in range(2):
            set_grads(k)
            cap_o.step()
            eager_o.step()
    torch.cuda.current_stream().wait_stream(side)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap_o.step()
    for k in range(2, 6):
        set_grads(k)
        graph.replay()
        eager_o.step()
    sync()
    for a, b in zip(cap_p, eager_p):
        torch.testing.assert_close(host(a.detach()), host(b.detach()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw,eager_steps,match", [
    (dict(capturable=True), 0, "first step"),      # the first step's program differs
    (dict(), 1, "capturable=True"),                # the counter would stay on the host
])
def test_optimizer_graph_capture_refused(kw, eager_steps, match):
    params = _opt_params(True)
    opt = _thermo(params, **kw)
    for k in range(eager_steps):
        for a, g in zip(params, _grads(k)):
            a.grad.copy_(dut(g))
        opt.step()
    sync()
    before = [host(p.detach()).clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=match):
        with torch.cuda.graph(graph):
            opt.step()
    sync()
    assert all(torch.equal(host(p.detach()), b) for p, b in zip(params, before))


def test_build_info_reports_cuda():
    info = thermo_ext.build_info()
    assert info["cuda"] and info["cuda_available"]
    assert info["cuda_archs"] and info["cuda_library"] and info["cuda_min_driver"]
    assert "archs=" in thermo_ext._C.cuda_build_info()


# ---------------------------------------------------------------------------------------------
# Device hyperparameters: the coefficients recomputed on the device (graphs follow schedulers)
# ---------------------------------------------------------------------------------------------

EMULATED = "emulated" in thermo_ext._C.cuda_build_info()


def hyper_tensor(**kw):
    # (the mass's settings: the unit mass ignores them)
    values = dict(HYPER, mass_beta=0.999, mass_eps=1e-8, mass_freeze=0)
    values.update(kw)
    return dut(torch.tensor([values[k] for k in kernels.HYPER_FIELDS], dtype=F64))


def plan_step(state, *, step, first, hyper=None, flag=None, step_tensor=None, **kw):
    """One step of state through an EnginePlan, with device hyperparameters when given."""
    thermo = state.scheme.uses_thermostat
    plan = kernels.EnginePlan(state.params, state.momenta, scheme=state.scheme,
                              xi=state.xi if thermo else None, segments=state.segments,
                              seg_numel=None, seed=SEED, uids=state.uids, offsets=state.offsets,
                              step_tensor=step_tensor)
    args = dict(HYPER)
    args.update(kw)
    plan.set(state.grads, step=step, first=first, **args)
    plan.set_device_hyper(hyper)
    return plan, kernels.run_plans([plan], check=flag is not None, flag=flag)


def assert_same_up_to_device_libm(got: State, want: State):
    # The emulation evaluates the device's exp/expm1/sqrt with the host's libm: the same bits.
    # A GPU's CUDA math library may differ by an ulp in a coefficient (kernels.py,
    # set_device_hyper), which a step carries into theta and p at float rounding.
    if EMULATED:
        assert_equal_state(got, want)
    else:
        assert_close_state(got, want, rtol=1e-6 if want.dtype != F64 else 1e-12)


@pytest.mark.parametrize("kw", [{}, dict(gamma=math.inf, weight_decay=0.0),
                                dict(tau=0.0, sigma=0.0)], ids=["default", "gamma_inf", "cold"])
@pytest.mark.parametrize("scheme", ["adl", "langevin", "OBABO", "overdamped"])
def test_device_hyper_matches_host_coefficients(scheme, kw):
    state = State(SIZES, F32, scheme, seed=24)
    host_c, dev_c = state.to_dut(), state.to_dut()
    hyper = hyper_tensor(**kw)
    for step, first in ((0, True), (1, False), (2, False)):
        flag = new_flag()
        _, bad = plan_step(host_c, step=step, first=first, flag=flag, **kw)
        assert bad is None
        # the host values handed to set() are stale on purpose: the device ones must be used
        _, bad = plan_step(dev_c, step=step, first=first, hyper=hyper, flag=flag, lr=0.5,
                           gamma=7.0, tau=3.0, sigma=1.0, eps=0.9, weight_decay=0.5)
        assert bad is None
        sync()
        assert int(host(flag)[0]) == 0
    assert_same_up_to_device_libm(dev_c, host_c)


def test_device_hyper_changed_in_place_reaches_the_next_step():
    # What a scheduler does to a captured graph's hyperparameters: the same plan, the tensor
    # changed in place between two steps, equals host steps with the old then the new values.
    state = State(SIZES, F32, "adl", seed=25)
    dev_c, host_c = state.to_dut(), state.to_dut()
    hyper = hyper_tensor()
    plan, _ = plan_step(dev_c, step=3, first=False, hyper=hyper, flag=new_flag())
    plan_step(host_c, step=3, first=False, flag=new_flag())
    new = dict(lr=0.02, tau=0.03, eps=0.2)
    hyper.copy_(hyper_tensor(**new))
    plan.set(dev_c.grads, step=4, first=False, **HYPER)  # stale host values again
    assert kernels.run_plans([plan], check=True, flag=new_flag()) is None
    plan_step(host_c, step=4, first=False, flag=new_flag(), **new)
    sync()
    assert_same_up_to_device_libm(dev_c, host_c)
    unchanged = state.to_dut()
    plan_step(unchanged, step=3, first=False, flag=new_flag())
    plan_step(unchanged, step=4, first=False, flag=new_flag())
    sync()
    assert not torch.equal(host(unchanged.xi), host(dev_c.xi))


def test_device_hyper_in_a_distributed_step():
    # Phase by phase (a sum hook between the phases): E and the C checks read the device values.
    state = State(SIZES, F32, "BACEDECAB", seed=26)
    dev_c, host_c = state.to_dut(), state.to_dut()
    seen = []
    plan, _ = plan_step(dev_c, step=2, first=False, hyper=hyper_tensor(eps=0.3), lr=0.5)
    plan.sum_hook = seen.append
    plan.set(dev_c.grads, step=3, first=False, **dict(HYPER, lr=0.5))
    assert kernels.run_plans([plan], check=True, flag=new_flag()) is None
    plan_step(host_c, step=2, first=False, eps=0.3)
    plan_step(host_c, step=3, first=False, eps=0.3)
    sync()
    assert len(seen) == 2
    assert_same_up_to_device_libm(dev_c, host_c)


def test_device_hyper_tensor_is_checked():
    state = State(SIZES[:3], F32, "adl", seed=27).to_dut()
    plan, _ = plan_step(state, step=1, first=False)
    for bad, why in [(dut(torch.zeros(6, dtype=F32)), "float32"),
                     (dut(torch.zeros(5, dtype=F64)), "5 elements"),
                     (dut(torch.zeros(12, dtype=F64))[::2], "strided")]:
        with pytest.raises(ValueError, match="^hyper"):
            plan.set_device_hyper(bad)
    # a program given as coefficients has no letter factors to recompute them from
    plan.set_device_hyper(hyper_tensor())
    prog = thermo_ext._C.Program([(1, 0, 0, 0.05, 0.0, 0.0), (0, 0, 0, 0.05, 0.0, 0.0)])
    plan.plan.set([g.data_ptr() for g in state.grads], prog, 1, True)
    with pytest.raises(ValueError, match="device hyperparameters need a program built from"):
        kernels.run_plans([plan], check=True, flag=new_flag())


def test_flag_and_step_tensor_are_checked():
    state = State(SIZES[:3], F32, "langevin", seed=28)
    d = state.to_dut()
    before = [host(t).clone() for t in d.tensors()]
    for flag in (dut(torch.zeros(1, dtype=F32)), dut_empty(0, torch.int32)):
        with pytest.raises(ValueError, match="^flag"):
            d.step(step=1, flag=flag)
    for step_t in (dut(torch.tensor(1.0)), dut(torch.zeros(2, dtype=torch.int64))):
        with pytest.raises(ValueError, match="^step_tensor"):
            d.step(step=1, flag=new_flag(), step_tensor=step_t)
    if not EMULATED:  # the emulation's "device" tensors are CPU tensors
        with pytest.raises(ValueError, match="^flag"):
            d.step(step=1, flag=torch.zeros(1, dtype=torch.int32))
    sync()
    assert all(torch.equal(host(x), y) for x, y in zip(d.tensors(), before))


def test_small_parameter_layout_matches_cpu():
    # The 4 KB kernel-argument layout (drivers before R530, builds before CUDA 12.1): more
    # launches, the same results.
    large = thermo_ext._C.cuda_param_layout()
    try:
        thermo_ext._C.cuda_param_layout(False)
        assert thermo_ext._C.cuda_param_layout() is False
        gen = torch.Generator().manual_seed(29)
        sizes = [2 * int(x) + 1 for x in torch.randint(0, 300, (400,), generator=gen)]
        for scheme, thermostat in (("adl", "tensor"), ("langevin", "group")):
            d, c = run_both(State(sizes, F32, scheme, seed=30, thermostat=thermostat))
            assert_close_state(d, c)
    finally:
        thermo_ext._C.cuda_param_layout(large)


def test_cuda_versions_in_build_info():
    driver, runtime = thermo_ext._C.cuda_versions()
    assert driver // 1000 >= runtime // 1000 > 0
    info = thermo_ext.build_info()
    assert (info["cuda_driver"], info["cuda_runtime"]) == (driver, runtime)


@pytest.mark.skipif(not EMULATED, reason="needs the emulation's pretend driver")
def test_too_old_driver_is_refused_with_the_fix():
    import os
    import subprocess
    import sys

    code = ("import sys\n"  # the emulation build on PYTHONPATH, not an editable install
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not type(f).__module__.startswith('_editable_skbc_')]\n"
            "import torch, thermo_ext\n"
            "v = thermo_ext.cuda_library.verdict(0)\n"
            "print('verdict:', v.usable, v.reason, v.fix)\n"
            "out = torch.empty(8)\n"
            "thermo_ext._C.fill_normal(0, 0, out.data_ptr(), 8, 1, 2, 3, 0, 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TE_EMU_DRIVER_VERSION="12080"), timeout=120)
    assert run.returncode != 0
    err = run.stderr.strip().splitlines()[-1]
    assert err.startswith("RuntimeError: thermo_ext CUDA engine: this build uses CUDA 13.0"), err
    for part in ("580", "supports CUDA 12.8", "THERMO_EXT_CUDA_HOME=/usr/local/cuda-12"):
        assert part in err, err
    # The run-time choice says the same before any call: the fallback's reason and fix.
    verdict = next(line for line in run.stdout.splitlines() if line.startswith("verdict:"))
    for part in ("verdict: False", "supports CUDA 12.8", "floor", ">= 580.65.06",
                 "update the NVIDIA driver"):
        assert part in verdict, verdict


# ---------------------------------------------------------------------------------------------
# GPU only: graph replay with changing hyperparameters, the device guard with two GPUs
# ---------------------------------------------------------------------------------------------

def test_graph_replay_follows_device_hyper():
    # A captured step with device hyperparameters: changing the tensor between replays (as a
    # scheduler does) changes the replayed step exactly as eager steps with those values.
    state = State(SIZES, F32, "adl", seed=31)
    live, eager = state.to_dut(), state.to_dut()
    s0 = 5
    step_t = torch.full((), s0, dtype=torch.int64, device=DEV)
    hyper = hyper_tensor()
    flag = new_flag()
    plan, _ = plan_step(live, step=s0, first=False, hyper=hyper, flag=flag,
                        step_tensor=step_t)  # warm-up: loads the kernels
    sync()
    for x, y in zip(live.tensors(), state.to_dut().tensors()):
        x.copy_(y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flag.zero_()
        kernels.run_plans([plan], check=True, flag=flag)
        step_t += 1
    step_t.fill_(s0)
    schedule = [dict(), dict(lr=0.03), dict(lr=0.01, tau=0.05, eps=0.1)]
    for i, kw in enumerate(schedule):
        hyper.copy_(hyper_tensor(**kw))
        graph.replay()
        plan_step(eager, step=s0 + i, first=False, flag=new_flag(), **kw)
        sync()
        assert int(host(flag)[0]) == 0
        assert_close_state(live, eager)


def test_device_guard_leaves_no_context_on_other_gpus():
    # Stepping tensors on cuda:1 from a fresh process must not create a primary context on
    # cuda:0 (hundreds of MB of memory), nor leave the thread on another device than torch's.
    if torch.cuda.device_count() < 2 or EMULATED:
        pytest.skip("needs two GPUs")
    import subprocess
    import sys

    code = """
import ctypes, torch, thermo_ext
from thermo_ext import kernels
from thermo_ext.schemes import fold
cuda = ctypes.CDLL("libcuda.so.1")
def active(d):
    flags, on = ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDevicePrimaryCtxGetState(d, ctypes.byref(flags), ctypes.byref(on)) == 0
    return on.value
dev = torch.device("cuda", 1)
p, m, g = (torch.randn(1000, device=dev) for _ in range(3))
xi = torch.zeros(1, dtype=torch.float64, device=dev)
flag = torch.zeros(1, dtype=torch.int32, device=dev)
for k in range(2):
    kernels.thermo_step([p], [m], [g], scheme=fold("adl"), lr=0.1, gamma=1.0, tau=0.1, sigma=0.1,
                        eps=0.1, weight_decay=0.0, xi=xi, segments=[0], seed=1, step=k,
                        uids=[0], first=k == 0, flag=flag)
torch.cuda.synchronize(dev)
print(active(0), active(1))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["0", "1"], run.stdout


# ---------------------------------------------------------------------------------------------
# The adaptive mass (docs/DESIGN.md, Mass)
# ---------------------------------------------------------------------------------------------

MASS_KW = dict(mass_beta=0.99, mass_eps=1e-8, mass_freeze=0)


def _with_masses(state: State, seed: int):
    g = torch.Generator().manual_seed(seed)
    mdt = kernels.momentum_dtype(state.dtype)
    state.masses = [(torch.rand(s, generator=g, dtype=F64) * 0.01).to(mdt) for s in state.shapes]
    state.mass_starts = [k % 3 for k in range(len(state.shapes))]
    return state


def _mass_run_both(state: State, steps, **kw):
    d, c = state.to_dut(), state.to_host()
    d.masses = [dut(v) for v in state.masses]
    c.masses = [v.clone() for v in state.masses]
    for step, first in steps:
        flag = new_flag()
        for s, fl in ((c, None), (d, flag)):
            assert s.step(step=step, first=first, flag=fl, masses=s.masses,
                          mass_starts=state.mass_starts, **MASS_KW, **kw) is None
        sync()
        assert int(host(flag)[0]) == 0
    return d, c


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["f32", "f64", "bf16"])
def test_adaptive_mass_matches_cpu(scheme, dtype):
    """The same letters with the mass as the CPU engine: v bitwise without weight decay (the
    same IEEE operations on the same g; with it v takes g + λθ, and θ differs by the device's
    exp/log after the first step), theta and p to the tolerance of the device's exp/log (the
    bias correction and the coefficients), xi likewise."""
    for wd in (0.0, HYPER["weight_decay"]):
        state = _with_masses(State(SIZES, dtype, scheme, seed=7), 8)
        d, c = _mass_run_both(state, ((0, True), (1, False), (5, False)), weight_decay=wd)
        if dtype == BF16:
            for a, b in zip(d.params, c.params):
                torch.testing.assert_close(host(a).float(), b.float(), rtol=2**-7, atol=1e-6)
        else:
            assert_close_state(d, c, rtol=1e-5 if dtype == F32 else 1e-11)
        for a, b in zip(d.masses, c.masses):
            if wd == 0.0:
                assert torch.equal(host(a), b)
            else:
                torch.testing.assert_close(host(a), b, rtol=1e-5 if dtype != F64 else 1e-11,
                                           atol=0)


def test_adaptive_mass_with_device_hyperparameters_matches_host_values():
    """capturable: the mass's beta, eps and freeze come from the device hyperparameters."""
    state = _with_masses(State(SIZES, F32, "langevin", seed=9), 10)
    hyper = dict(HYPER, **MASS_KW)
    ref, dev = state.to_dut(), state.to_dut()
    ref.masses = [dut(v) for v in state.masses]
    dev.masses = [dut(v) for v in state.masses]
    plans = []
    for s in (ref, dev):
        plans.append(kernels.EnginePlan(s.params, s.momenta, scheme=s.scheme, xi=s.xi,
                                        segments=s.segments, seg_numel=None, seed=SEED,
                                        uids=s.uids, masses=s.masses,
                                        mass_starts=state.mass_starts))
    plans[1].set_device_hyper(dut(torch.tensor([hyper[k] for k in kernels.HYPER_FIELDS],
                                               dtype=F64)))
    for step in (1, 2):
        for pl, s in zip(plans, (ref, dev)):
            pl.set(s.grads, step=step, first=False, **hyper)
            assert kernels.run_plans([pl], check=True, flag=new_flag()) is None
    sync()
    assert_close_state(dev, ref, rtol=1e-6)
    for a, b in zip(dev.masses, ref.masses):  # v takes g + λθ: θ to the device's exp/log
        torch.testing.assert_close(host(a), host(b), rtol=1e-6, atol=0)


def test_optimizer_with_the_mass_matches_cpu():
    dev_p, cpu_p, dev_o, cpu_o = _four_steps_on_both(mass="adaptive")
    for a, b in zip(dev_p, cpu_p):
        torch.testing.assert_close(host(a.detach()), b.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(host(dev_o.state[a]["exp_avg_sq"]), cpu_o.state[b]["exp_avg_sq"])
