"""The step-time benchmark's measuring: warm-up, interleaved rounds, threads, the table."""

from __future__ import annotations

import json
import time

import pytest
import torch

import thermo_ext as te
from thermo_ext import benchmark

CPU = torch.device("cpu")


def _slow_start(first_calls: int, seconds: float):
    """A contender whose first calls are slow (state allocation, thread pools), then fast."""
    calls = [0]

    def fn():
        calls[0] += 1
        if calls[0] <= first_calls:
            time.sleep(seconds)

    return fn, calls


def test_warm_up_absorbs_slow_first_calls():
    fn, calls = _slow_start(first_calls=6, seconds=0.01)
    t = benchmark.measure({"slow start": fn, "steady": lambda: None}, CPU, rounds=3,
                          block_s=0.002, warmup_s=0.1)
    # Two warm-up calls (the old count) would have left four 10 ms calls in the timed blocks.
    assert calls[0] > 6
    assert t["slow start"].max < 1e-3, t["slow start"]
    assert len(t["slow start"].samples) == 3 and len(t["steady"].samples) == 3


def test_warm_up_runs_at_least_the_minimum_calls_and_time():
    fn, calls = _slow_start(first_calls=0, seconds=0)
    t0 = time.perf_counter()
    benchmark.warm_up(fn, CPU, seconds=0.05, calls=3)
    assert time.perf_counter() - t0 >= 0.05 and calls[0] >= 3
    fn, calls = _slow_start(first_calls=100, seconds=0.001)
    benchmark.warm_up(fn, CPU, seconds=0.0, calls=3)
    assert calls[0] == 3


def test_rounds_are_interleaved_in_rotating_order():
    order = []
    contenders = {k: (lambda k=k: order.append(k)) for k in "abc"}
    t = benchmark.measure(contenders, CPU, rounds=3, reps={k: 1 for k in "abc"},
                          warmup_s=0.0)
    timed = order[-9:]  # after the warm-up calls
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(t[k].reps == 1 for k in "abc")


def test_blocks_are_sized_from_the_warm_up():
    t = benchmark.measure({"sleep 1 ms": lambda: time.sleep(1e-3)}, CPU, rounds=2,
                          block_s=0.01, warmup_s=0.02)
    assert 2 <= t["sleep 1 ms"].reps <= 10  # about 10 ms of 1 ms (or slower) calls
    assert t["sleep 1 ms"].min >= 1e-3


def test_threads_are_set_inside_and_restored():
    before = torch.get_num_threads(), te.get_num_threads()
    with benchmark.threads(1):
        assert torch.get_num_threads() == 1 and te.get_num_threads() == 1
    assert (torch.get_num_threads(), te.get_num_threads()) == before


def test_spiral_table_is_single_threaded(monkeypatch):
    seen = []
    real = benchmark.measure

    def spy(contenders, device, rounds, *args, **kwargs):
        seen.append((torch.get_num_threads(), te.get_num_threads()))
        return real(contenders, device, rounds, *args, **kwargs)

    monkeypatch.setattr(benchmark, "measure", spy)
    monkeypatch.setattr(benchmark, "WARMUP_S", 0.0)
    rows = benchmark.bench_spiral(rounds=1)
    assert seen == [(1, 1)]
    names = [r.name for r in rows]
    assert names[0] == "Adam(fused)" and "AdLaLa" in names and rows[0].value == 1.0
    assert all(r.timing is not None and r.value > 0 and r.min_ratio > 0 for r in rows)


def test_table_prints_times_spread_and_ratios(capsys):
    base = benchmark.Timing((2e-5, 1e-5, 3e-5), reps=10)
    other = benchmark.Timing((1e-5, 0.5e-5, 2e-5), reps=10)
    rows = benchmark._ratios({"Adam(fused)": base, "x": other}, "Adam(fused)")
    rows.append(benchmark.Row("speed-up", 2.0, "x"))
    benchmark.print_table("title", rows, "median / Adam(fused)")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "title"
    assert lines[2].split() == ["contender", "median", "min", "max", "median", "/",
                                "Adam(fused)", "(of", "minimums)", "per", "round,", "p25-p75"]
    assert lines[3].split() == ["Adam(fused)", "20", "µs", "10", "µs", "30", "µs", "1.000",
                                "1.000", "1.000-1.000"]
    # per-round ratios 0.5, 0.5, 2/3: quartiles (inclusive) 0.5 and 0.583
    assert lines[4].split() == ["x", "10", "µs", "5", "µs", "20", "µs", "0.500", "0.500",
                                "0.500-0.583"]
    assert lines[5].split() == ["speed-up", "2.000", "x"]


def test_per_round_ratio_pairs_rounds():
    # a baseline slowed down in one round moves the ratio of medians, not the per-round ratio
    base = benchmark.Timing((1.0, 1.0, 5.0, 1.0, 1.0), reps=1)
    other = benchmark.Timing((2.0, 2.0, 10.0, 2.0, 2.0), reps=1)
    assert other.per_round(base) == (2.0, 2.0)
    assert benchmark.Timing((3.0,), reps=1).per_round(benchmark.Timing((2.0,), reps=1)) == \
        (1.5, 1.5)


@pytest.mark.parametrize("seconds, text", [(2.5, "2.5 s"), (0.0123, "12.3 ms"),
                                           (4.56e-5, "45.6 µs"), (3e-9, "3 ns")])
def test_time_units(seconds, text):
    assert benchmark._time(seconds).strip() == text


def _args(**kw):
    import argparse
    ap = argparse.ArgumentParser()
    benchmark.add_arguments(ap)
    args = ap.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_isa_option_rejects_a_set_the_cpu_lacks(monkeypatch, capsys):
    monkeypatch.setattr(te, "build_info", lambda: {"isa": "avx2", "isas": ["baseline", "avx2"]})
    errors = []
    assert benchmark.run(_args(isa="avx512"), error=errors.append) == 2
    assert errors == ["--isa: avx512 is not supported by this CPU or build (supported: "
                      "baseline, avx2)"]
    assert benchmark.run(_args(isa="avx512")) == 2
    assert "--isa: avx512 is not supported" in capsys.readouterr().err


def test_isa_all_runs_each_set_in_its_own_process(monkeypatch, capsys):
    # each set in a fresh process with THERMO_EXT_ISA (the engine picks its set once per
    # process), the options passed on, then one summary line per set
    monkeypatch.setattr(te, "build_info", lambda: {"isa": "avx2", "isas": ["baseline", "avx2"]})
    calls = []

    def fake_call(cmd, env):
        isa = env["THERMO_EXT_ISA"]
        calls.append((isa, cmd))
        path = cmd[cmd.index("--summary-json") + 1]
        with open(path, "w") as f:
            json.dump({"isa": isa, "thermo_ext langevin": [1.25, 1.5],
                       "ns per normal per thread, 1 thread": 0.75}, f)
        return 0

    monkeypatch.setattr(benchmark.subprocess, "call", fake_call)
    assert benchmark.run(_args(isa="all", numel=1000, no_reference=True)) == 0
    assert [c[0] for c in calls] == ["baseline", "avx2"]
    for isa, cmd in calls:
        assert cmd[1:3] == ["-m", "thermo_ext.benchmark"]
        assert cmd[cmd.index("--isa") + 1] == isa
        assert cmd[cmd.index("--numel") + 1] == "1000" and "--no-reference" in cmd
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split()[:4] == ["baseline", "1.250;", "1.500", "-"]
    assert out[-1].split()[:4] == ["avx2", "1.250;", "1.500", "-"]
    assert "0.750" in out[-1]


def test_isa_of_this_process_runs_here(monkeypatch):
    isa = te.build_info()["isa"]
    monkeypatch.setattr(benchmark.subprocess, "call", lambda *a, **k: pytest.fail("spawned"))
    monkeypatch.setattr(benchmark, "WARMUP_S", 0.0)
    assert benchmark.run(_args(isa=isa, spiral=True, rounds=1)) == 0


def test_noise_table_reports_the_cost_of_a_normal_per_thread(monkeypatch):
    monkeypatch.setattr(benchmark, "WARMUP_S", 0.0)
    rows = {r.name: r for r in benchmark.bench_noise(CPU, 1 << 16, rounds=1)}
    one = rows["ns per normal per thread, 1 thread"]
    assert one.note == "ns" and 0 < one.value < 1000
    t = rows["thermo_ext noise, 1 thread"].timing
    assert one.value == pytest.approx(t.median / (1 << 16) * 1e9)
    n = te.get_num_threads()
    if n > 1:
        assert rows[f"ns per normal per thread, {n} threads"].value == pytest.approx(
            rows["thermo_ext noise"].timing.median * n / (1 << 16) * 1e9)
    else:
        assert not any(k.startswith("ns per normal per thread, ") and k != one.name
                       for k in rows)


def test_posteriors_updates_read_the_fixed_gradients(monkeypatch):
    # the contenders' steps are posteriors' own updates with the .grad tensors as gradients:
    # SGLD at temperature 0 is theta + lr * grad exactly; the gradient function is restored
    pytest.importorskip("posteriors")
    import posteriors.sgmcmc.sgld as sgld

    monkeypatch.setattr(benchmark, "POSTERIORS_SAMPLERS",
                        {"posteriors SGLD": ("sgld", dict(lr=0.5, temperature=0.0))})
    made = []

    def make():
        ps = benchmark._params(1000, 3, CPU, seed=len(made))
        made.append([(p.detach().clone(), p.grad.clone()) for p in ps])
        return ps

    original = sgld.grad_and_value
    with benchmark.posteriors_updates(make) as steps:
        assert list(steps) == ["posteriors SGLD"] and sgld.grad_and_value is not original
        steps["posteriors SGLD"]()
        steps["posteriors SGLD"]()
    assert sgld.grad_and_value is original
    assert len(made) == 1
    params = steps["posteriors SGLD"].state.params
    assert sorted(params) == ["0", "1", "2"]
    for i, (theta0, g) in enumerate(made[0]):
        assert torch.equal(params[str(i)], (theta0 + 0.5 * g) + 0.5 * g)
