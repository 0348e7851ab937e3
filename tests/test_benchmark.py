"""The step-time benchmark's measuring: warm-up, interleaved rounds, threads, the table."""

from __future__ import annotations

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
                                "Adam(fused)", "(of", "minimums)"]
    assert lines[3].split() == ["Adam(fused)", "20", "µs", "10", "µs", "30", "µs", "1.000",
                                "1.000"]
    assert lines[4].split() == ["x", "10", "µs", "5", "µs", "20", "µs", "0.500", "0.500"]
    assert lines[5].split() == ["speed-up", "2.000", "x"]


@pytest.mark.parametrize("seconds, text", [(2.5, "2.5 s"), (0.0123, "12.3 ms"),
                                           (4.56e-5, "45.6 µs"), (3e-9, "3 ns")])
def test_time_units(seconds, text):
    assert benchmark._time(seconds).strip() == text
