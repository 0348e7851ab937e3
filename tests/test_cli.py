"""The ``thermo-ext`` command line end to end on tiny settings, and the data generators.

Every experiment here runs a few epochs on a few dozen points: the point is that the commands
write their files, print their tables and reject bad options, not the accuracy they reach.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import thermo_ext
from thermo_ext import data
from thermo_ext import methods as named_methods
from thermo_ext.cli import ALL_METHODS, cuda_status, main
from thermo_ext.experiments import METHODS

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

TINY = ["--epochs", "2", "--seeds", "1", "--eval-every", "1", "--jobs", "1", "--quiet"]
TINY_SPIRAL = TINY + ["--train", "50", "--test", "50"]


def _files(out, name):
    return [os.path.join(out, f) for f in (f"{name}.json", f"{name}_curves.csv",
                                           f"{name}_summary.csv", f"{name}_table.txt",
                                           f"{name}.png")]


# ----------------------------------------------------------------------------- commands
def test_spiral_writes_results_and_prints_every_method(tmp_path, capsys):
    out = str(tmp_path / "res")
    assert main(["spiral", *TINY_SPIRAL, "--out", out, "--set", "AdLaLa.lr=0.2",
                 "--set", "LaLa.gamma=0.1,0.2"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method"):]
    default_methods = ALL_METHODS.split(",")  # the default --methods
    for m in default_methods:
        assert m in table
    for f in _files(out, "spiral"):
        assert os.path.getsize(f) > 0, f
    with open(os.path.join(out, "spiral.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "spiral.json")) as f:
        record = json.load(f)
    assert len(record["runs"]) == len(default_methods)
    assert record["hyper"]["AdLaLa"]["lr"] == 0.2  # the override is recorded ...
    assert record["hyper"]["Adam"] == {"lr": 0.005}
    adlala = next(r for r in record["runs"] if r["method"] == "AdLaLa")
    assert [g["lr"] for g in adlala["optimizer"]] == [0.2, 0.2]  # ... and was used
    assert [g["scheme"] for g in adlala["optimizer"]] == ["adl", "langevin"]
    lala = next(r for r in record["runs"] if r["method"] == "LaLa")
    assert [g["gamma"] for g in lala["optimizer"]] == [0.1, 0.2]
    assert adlala["curves"]["epoch"] == [0, 1, 2]
    assert set(record["best_nets"]) == {"AdLaLa", "Adam"}
    assert record["machine"]["torch"] == torch.__version__
    with open(os.path.join(out, "spiral_curves.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("method,seed")
    assert len(lines) == 1 + len(default_methods) * 3


def test_existing_results_are_not_overwritten_silently(tmp_path, capsys):
    out = str(tmp_path / "res")
    args = ["spiral", *TINY_SPIRAL, "--methods", "Adam", "--out", out]
    assert main(args) == 0
    before = os.path.getmtime(os.path.join(out, "spiral.json"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--overwrite" in err and "spiral.json" in err
    assert os.path.getmtime(os.path.join(out, "spiral.json")) == before
    assert main(args + ["--overwrite"]) == 0
    # Another command's files do not conflict with these.
    assert main(["digits", *TINY, "--methods", "Adam", "--out", out]) == 0
    for f in _files(out, "digits"):
        assert os.path.exists(f), f


@pytest.mark.parametrize("bad, option", [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--seeds", "0"], "--seeds"),
    (["--methods", "AdLaLa,Foo"], "--methods"),
    (["--set", "AdLaLa.foo=1"], "--set"),
    (["--set", "Foo.lr=1"], "--set"),
    (["--set", "AdLaLa.lr"], "--set"),
    (["--set", "AdLaLa.lr=-1"], "--set"),
    (["--set", "Adam.lr=0.1", "--methods", "AdLaLa"], "--set"),
    (["--noise", "-0.5"], "--noise"),
    (["--train", "1"], "--train"),
    (["--batch", "100"], "--batch"),
])
def test_bad_options_exit_nonzero_naming_the_option(tmp_path, capsys, bad, option):
    out = tmp_path / "res"
    assert main(["spiral", *TINY_SPIRAL, "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err
    assert option in err, err
    assert not out.exists() or not any(out.iterdir())  # nothing was run or written


def test_unknown_command_and_help(capsys):
    assert main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["spiral", "--help"]) == 0
    assert "--epochs" in capsys.readouterr().out


def test_robustness_grid(tmp_path, capsys):
    out = str(tmp_path / "res")
    assert main(["robustness", *TINY_SPIRAL, "--methods", "AdLaLa,SGD", "--lr-factors", "1,4",
                 "--init-scales", "1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "AdLaLa: init" in printed and "SGD: init" in printed
    for f in ("robustness.json", "robustness.csv", "robustness_table.txt", "robustness.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    with open(os.path.join(out, "robustness.json")) as f:
        record = json.load(f)
    lrs = sorted((r["method"], r["hyper"]["lr"]) for r in record["runs"])
    assert lrs == [("AdLaLa", 0.25), ("AdLaLa", 1.0), ("SGD", 0.1), ("SGD", 0.4)]
    assert main(["robustness", *TINY_SPIRAL, "--lr-factors", "1,-2", "--out", out + "2"]) == 2
    assert "--lr-factors" in capsys.readouterr().err


def test_info_and_bench(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert thermo_ext.__version__ in printed and "openmp_threads" in printed
    info = thermo_ext.build_info()
    assert f"CUDA engine library for this torch: {'yes' if info['cuda'] else 'no'}" in printed
    assert f"CUDA engine usable here: {'yes' if info['cuda_available'] else 'no ('}" in printed
    threads = torch.get_num_threads()
    assert main(["bench", "--spiral", "--rounds", "2"]) == 0
    assert torch.get_num_threads() == threads  # the spiral table's single thread is undone
    printed = capsys.readouterr().out
    assert "spiral net" in printed and "1 thread" in printed
    adlala = next(line for line in printed.splitlines() if line.strip().startswith("AdLaLa "))
    # median, min and max per step with their units, the two ratios to Adam(fused), then the
    # quartiles of the per-round ratio
    fields = adlala.split()
    assert [fields[2], fields[4], fields[6]] == ["µs"] * 3 or "ms" in fields, adlala
    assert 0 < float(fields[-3]) < 100 and 0 < float(fields[-2]) < 100
    p25, p75 = map(float, fields[-1].split("-"))
    assert 0 < p25 <= p75 < 100
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def _fake_torch_cuda(monkeypatch, version, available):
    monkeypatch.setattr(torch.version, "cuda", version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


@pytest.mark.parametrize("info, torch_cuda, available, expected", [
    (dict(cuda=False, cuda_archs="", cuda_available=False, cuda_libraries=[],
          cuda_library_why="this torch (2.13.0+cpu) is built without CUDA"), None, False,
     ["CUDA engine library for this torch: no (this torch (2.13.0+cpu) is built without CUDA)",
      "installed: none", "usable here: no (no engine library for this torch: CUDA tensors step "
      "with the torch-op fallback)"]),
    (dict(cuda=False, cuda_archs="", cuda_available=False,
          cuda_libraries=["libthermo_ext_cuda13.so"],
          cuda_library_why="torch 2.9 uses CUDA 12.8, and this installation has no engine "
                           "library built for CUDA 12"), "12.8", True,
     ["library for this torch: no (torch 2.9 uses CUDA 12.8, and this installation has no "
      "engine library built for CUDA 12)", "installed: libthermo_ext_cuda13.so",
      "torch-op fallback"]),
    (dict(cuda=True, cuda_archs="90", cuda_available=False), None, False,
     ["CUDA engine library for this torch: yes (architectures 90)", "usable here: no (this "
      "torch", "is built without CUDA)"]),
    (dict(cuda=True, cuda_archs="90", cuda_available=False), "12.4", False,
     ["CUDA engine library for this torch: yes", "usable here: no (no CUDA device visible"]),
    (dict(cuda=True, cuda_archs="90-real", cuda_available=False, cuda_driver=12040,
          cuda_runtime=13000, cuda_library="/x/libthermo_ext_cuda13.so",
          cuda_min_driver="580.65.06", cuda_library_why="torch uses CUDA 13.0: the library",
          cuda_fallback="cuda:0: the NVIDIA driver supports CUDA 12.4, below the floor"),
     "13.0", True,
     ["chosen: torch uses CUDA 13.0: the library",
      "loaded: /x/libthermo_ext_cuda13.so (needs a driver >= 580.65.06)",
      "usable here: no (CUDA tensors step with the torch-op fallback: cuda:0: the NVIDIA driver "
      "supports CUDA 12.4", "CUDA versions: cuda driver 12.4, cuda runtime 13.0"]),
    (dict(cuda=True, cuda_archs="90", cuda_available=False, cuda_driver_version=0), None, False,
     ["CUDA versions: cuda driver version unknown"]),
])
def test_info_says_whether_cuda_is_compiled_and_usable_and_why_not(monkeypatch, info,
                                                                    torch_cuda, available,
                                                                    expected):
    _fake_torch_cuda(monkeypatch, torch_cuda, available)
    text = "\n".join(cuda_status(info))
    for part in expected:
        assert part in text, text
    if not any(k in info for k in ("cuda_driver_version", "cuda_runtime_version", "cuda_driver")):
        assert "CUDA versions" not in text


def test_python_dash_m_in_a_subprocess_with_two_workers(tmp_path):
    """``python -m thermo_ext`` (this very package) with the process-pool path."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(thermo_ext.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "thermo_ext", "spiral", "--epochs", "2", "--seeds", "2",
           "--train", "50", "--test", "50", "--methods", "AdLaLa,Adam", "--jobs", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "AdLaLa" in proc.stdout and "Adam" in proc.stdout
    # stderr is a pipe, not a terminal: a plain line per finished run, no bar redrawing
    assert "4/4" in proc.stderr and "seed 1: test acc" in proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    with open(out / "spiral.json") as f:
        record = json.load(f)
    assert sorted((r["method"], r["seed"]) for r in record["runs"]) == [
        ("AdLaLa", 0), ("AdLaLa", 1), ("Adam", 0), ("Adam", 1)]
    # time/run counts the training loop only: the total includes spawning two workers that
    # import torch (seconds), each run's two epochs on 50 points take milliseconds.
    assert max(r["wall_s"] for r in record["runs"]) < 0.2 * record["wall_s"], (
        [r["wall_s"] for r in record["runs"]], record["wall_s"])
    bad = subprocess.run(cmd[:4] + ["--epochs", "-3"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--epochs" in bad.stderr


def test_runs_are_reproducible_and_paired(tmp_path):
    from thermo_ext.experiments import RunSpec, SpiralTask, init_model, train_run

    task = SpiralTask(train=50, test=50)
    spec = RunSpec(task, "AdLaLa", dict(METHODS["AdLaLa"].defaults), seed=3, epochs=2,
                   eval_every=1, batch=25)
    torch.manual_seed(0)
    a = train_run(spec)
    torch.manual_seed(1)  # the global RNG plays no part
    b = train_run(spec)
    assert a["curves"] == b["curves"]
    # Every method of one seed starts from the same network.
    m1, m2 = init_model(task, 3), init_model(task, 3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    m3 = init_model(task, 3, scale=2.0)
    assert all(torch.equal(2 * p, q) for p, q in zip(m1.parameters(), m3.parameters()))


@pytest.mark.parametrize("task_name", ["spiral", "digits"])
def test_closed_form_gradient_matches_autograd(task_name):
    from thermo_ext.experiments import DigitsTask, MLPGradient, SpiralTask, init_model

    task = SpiralTask(train=50, test=50) if task_name == "spiral" else DigitsTask()
    (x, y), _ = task.data(0)
    x, y = x[:25], y[:25]
    model = init_model(task, 0, scale=3.0)  # large weights: many ReLUs off, logits far from 0
    task.loss(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    assert MLPGradient.applies(model, task)
    MLPGradient(model, task)(x, task.grad_target(y))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert not MLPGradient.applies(model, SpiralTask(loss_form="sigmoid"))


def test_closed_form_and_autograd_runs_agree():
    from thermo_ext.experiments import RunSpec, SpiralTask, train_run

    spec = RunSpec(SpiralTask(train=50, test=50), "AdLaLa", dict(METHODS["AdLaLa"].defaults),
                   seed=0, epochs=3, eval_every=1, batch=25)
    fast = train_run(spec)
    slow = train_run(dataclasses.replace(spec, closed_form=False))
    assert (fast["gradient"], slow["gradient"]) == ("closed-form", "autograd")
    torch.testing.assert_close(fast["curves"]["train_loss"], slow["curves"]["train_loss"],
                               rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- data
def test_two_spirals_deterministic_for_a_seed():
    (x, y), (xt, yt) = data.two_spirals(seed=5)
    (x2, y2), (xt2, yt2) = data.two_spirals(seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(xt, xt2) and torch.equal(yt, yt2)
    (x3, _), (xt3, _) = data.two_spirals(seed=6)
    assert not torch.equal(x, x3) and not torch.equal(xt, xt3)
    assert not torch.equal(x[:100], xt[:100])  # test points are a separate draw


def test_two_spirals_shape_balance_and_geometry():
    (x, y), (xt, yt) = data.two_spirals(seed=0)
    assert x.shape == (500, 2) and y.shape == (500, 1) and x.dtype == torch.float32
    assert xt.shape == (1000, 2) and yt.shape == (1000, 1)
    assert int(y.sum()) == 250 and int(yt.sum()) == 500
    # The arms lie within radius 2 (plus noise), the second the reflection of the first.
    r = x.norm(dim=1)
    assert float(r.max()) < 2.1 and float(r.min()) >= 0
    (xn, yn), _ = data.two_spirals(train=7, test=2, noise=0.0, seed=0)
    assert int(yn.sum()) == 4 and xn.shape == (7, 2)
    x0, _ = data.spiral_points(6, noise=0.0, generator=data.generator(0, "t"))
    assert torch.allclose(x0[:3], -x0[3:])


def test_spiral_points_rejects_too_few_points():
    with pytest.raises(ValueError, match="n"):
        data.spiral_points(1, generator=torch.Generator())


def test_digits_deterministic_stratified_and_standardised():
    pytest.importorskip("sklearn")
    (x, y), (xt, yt) = data.digits(seed=0)
    (x2, y2), (xt2, yt2) = data.digits(seed=0)
    assert torch.equal(x, x2) and torch.equal(yt, yt2)
    (x3, _), _ = data.digits(seed=1)
    assert not torch.equal(x, x3)
    assert x.shape[1] == 64 and len(x) + len(xt) == 1797
    assert abs(len(xt) / 1797 - 0.25) < 0.01
    assert torch.bincount(yt, minlength=10).min() >= 40  # every class held out
    assert abs(float(x.mean())) < 1e-5
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(1.5)


def test_derived_seeds_differ_by_stream_and_seed():
    seeds = {data.derive_seed(s, k) for s in range(4) for k in ("init", "noise", "shuffle")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------- presets
PRESET_METHODS = ["AdLaLa", "LOL", "LaLa", "Langevin", "AdL", "Overdamped"]


def _with_other_defaults(fn, factor=0.5):
    """``fn`` with every numeric default multiplied by ``factor``, in its signature and in what
    it does when a keyword is left out."""
    sig = inspect.signature(fn)
    new = {p.name: p.default * factor for p in sig.parameters.values()
           if isinstance(p.default, float)}

    def patched(*args, **kwargs):
        for k, v in new.items():
            kwargs.setdefault(k, v)
        return fn(*args, **kwargs)

    patched.__name__ = fn.__name__
    patched.__signature__ = sig.replace(parameters=[p.replace(default=new.get(p.name, p.default))
                                                    for p in sig.parameters.values()])
    return patched, new


@pytest.fixture
def other_defaults(monkeypatch):
    """The named methods with defaults other than the paper's (as a future release may have)."""
    new = {}
    for m in PRESET_METHODS:
        fn, new[m] = _with_other_defaults(getattr(named_methods, m))
        monkeypatch.setattr(named_methods, m, fn)
    return new


def _expected_groups(method, v):
    """What each param group of ``method`` runs with, given its keyword arguments ``v``."""
    if method == "AdLaLa":
        shared = dict(lr=v["lr"], gamma=v["gamma"], sigma=v["sigma"], eps=v["eps"], xi0=v["xi0"])
        return [dict(shared, scheme="adl", tau=v["tau1"]),
                dict(shared, scheme="langevin", tau=v["tau2"])]
    if method == "LOL":
        return [dict(lr=v["lr"], tau=v["tau1"], gamma=v["gamma"]),
                dict(lr=v["lr"], tau=v["tau2"], gamma="inf")]
    if method == "LaLa":
        return [dict(lr=v["lr"], gamma=v["gamma"], tau=v["tau"])] * 2
    return [dict(v)]


def _run_settings(record, method):
    run = next(r for r in record["runs"] if r["method"] == method)
    return run["hyper"], run["optimizer"]


def test_experiments_run_the_paper_preset_whatever_the_signature_defaults(tmp_path, capsys,
                                                                          other_defaults):
    # the table reads the (patched) signature
    assert METHODS["AdLaLa"].defaults["lr"] == other_defaults["AdLaLa"]["lr"]
    out = str(tmp_path / "res")
    assert main(["spiral", *TINY_SPIRAL, "--methods", ",".join(PRESET_METHODS), "--out",
                 out]) == 0
    printed = capsys.readouterr().out
    assert "preset paper" in printed
    with open(os.path.join(out, "spiral.json")) as f:
        record = json.load(f)
    assert record["settings"]["preset"] == "paper"
    for m in PRESET_METHODS:
        paper = named_methods.PRESETS["paper"][m]
        hyper, groups = _run_settings(record, m)
        assert {k: hyper[k] for k in paper} == paper, m
        want = _expected_groups(m, paper)
        assert len(groups) == len(want), m
        for group, expected in zip(groups, want):
            assert {k: group[k] for k in expected} == expected, (m, group)
        # the header line of each method shows these values
        line = next(x for x in printed.splitlines() if x.strip().startswith(m + " "))
        assert f"lr={paper['lr']:g}" in line


def test_preset_default_runs_the_signature_defaults(tmp_path, capsys, other_defaults):
    out = str(tmp_path / "res")
    assert main(["spiral", *TINY_SPIRAL, "--methods", ",".join(PRESET_METHODS), "--preset",
                 "default", "--set", "LaLa.gamma=0.3", "--out", out]) == 0
    assert "preset default" in capsys.readouterr().out
    with open(os.path.join(out, "spiral.json")) as f:
        record = json.load(f)
    assert record["settings"]["preset"] == "default"
    for m in PRESET_METHODS:
        hyper, groups = _run_settings(record, m)
        starts = {} if m == "Overdamped" else {  # the signature's momentum start
            "momentum_init": inspect.signature(getattr(named_methods, m))
            .parameters["momentum_init"].default}
        expected = dict(other_defaults[m], mass="adaptive", **starts,
                        **({"gamma": 0.3} if m == "LaLa" else {}))
        assert hyper == expected, m
        wants = _expected_groups(m, expected)
        assert len(groups) == len(wants), m
        for group, want in zip(groups, wants):
            assert {k: group[k] for k in want} == want, (m, group)


def test_help_lists_the_values_each_preset_runs_with(capsys, other_defaults):
    assert main(["digits", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--preset {default,paper,unit}" in text
    paper_block, default_block = text.split("with --preset default")
    adlala = next(x for x in paper_block.splitlines() if x.strip().startswith("AdLaLa "))
    assert "lr=0.25" in adlala and "gamma=0.1" in adlala
    adlala = next(x for x in default_block.splitlines() if x.strip().startswith("AdLaLa "))
    want = other_defaults["AdLaLa"]
    assert f"lr={want['lr']:g}" in adlala and f"gamma={want['gamma']:g}" in adlala
    assert "Adam " not in default_block  # the baselines do not depend on the preset


def test_help_says_when_the_presets_agree(capsys, monkeypatch):
    # A paper preset equal to the signature defaults (as in the first release): the help says
    # the default preset has the same values instead of listing differences.
    from thermo_ext.experiments import signature_defaults

    agreeing = {m: {k: signature_defaults(getattr(named_methods, m))[0][k]
                    for k in named_methods.PRESETS["paper"][m]} for m in PRESET_METHODS}
    monkeypatch.setitem(named_methods.PRESETS, "paper", agreeing)
    assert main(["spiral", "--help"]) == 0
    text = capsys.readouterr().out
    default_block = text.split("with --preset default")[1].split("with --preset")[0]
    assert "the same values" in default_block and "where they differ" not in default_block
    monkeypatch.undo()
    assert main(["spiral", "--help"]) == 0
    assert "the same values" not in capsys.readouterr().out  # today's defaults differ


def test_bad_preset_is_refused_naming_it(tmp_path, capsys):
    from thermo_ext.experiments import SettingsError, parse_settings

    assert main(["spiral", *TINY_SPIRAL, "--preset", "fast", "--out", str(tmp_path)]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="--preset"):
        parse_settings([], ["AdLaLa"], preset="fast")
    with pytest.raises(SettingsError, match="--preset"):
        METHODS["Adam"].settings("fast")


def test_robustness_multiplies_the_preset_step_size(tmp_path, capsys, other_defaults):
    out = str(tmp_path / "res")
    assert main(["robustness", *TINY_SPIRAL, "--methods", "Langevin", "--lr-factors", "0.5,2",
                 "--init-scales", "1", "--out", out]) == 0
    with open(os.path.join(out, "robustness.json")) as f:
        record = json.load(f)
    assert sorted(r["hyper"]["lr"] for r in record["runs"]) == [0.125, 0.5]
    assert record["grid"]["Langevin"]["default_lr"] == 0.25


# ----------------------------------------------------------------------------- progress, timing
def _tiny_specs(n=2):
    from thermo_ext.experiments import RunSpec, SpiralTask

    task = SpiralTask(train=50, test=50)
    return [RunSpec(task, "Adam", {"lr": 0.005}, seed=s, epochs=2, eval_every=1, batch=25)
            for s in range(n)]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from thermo_ext.experiments import run_many, runner

    monkeypatch.setattr(runner, "STATUS_EVERY_S", 0.0)  # a status line at every evaluation
    results = run_many(_tiny_specs())
    err = capsys.readouterr().err
    assert len(results) == 2
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert any(x.endswith(f"1/2 Adam seed 0: test acc {results[0]['final_test_acc']:5.1f}%")
               for x in lines), err
    assert any("2/2 Adam seed 1: test acc" in x for x in lines)
    assert any("1/2 runs done; running: Adam seed 1 epoch 1/2" in x for x in lines), err


def test_progress_bars_on_a_terminal_and_nothing_when_quiet(capsys, monkeypatch):
    from thermo_ext.experiments import run_many

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_many(_tiny_specs(1))
    err = capsys.readouterr().err
    assert "\r" in err and "Adam seed 0" in err and "2/2" in err  # tqdm redraws its bar
    run_many(_tiny_specs(1), quiet=True)
    assert capsys.readouterr().err == ""


def test_time_per_run_excludes_building_the_optimizer(monkeypatch):
    """A fresh worker's first optimizer pays torch's lazy imports: not the method's time."""
    from thermo_ext.experiments import RunSpec, SpiralTask, train_run

    real = named_methods.AdLaLa

    def slow_to_build(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    slow_to_build.__signature__ = inspect.signature(real)
    monkeypatch.setattr(named_methods, "AdLaLa", slow_to_build)
    spec = RunSpec(SpiralTask(train=50, test=50), "AdLaLa", METHODS["AdLaLa"].settings("paper"),
                   seed=0, epochs=2, eval_every=1, batch=25)
    t0 = time.perf_counter()
    result = train_run(spec)
    assert time.perf_counter() - t0 >= 1.0
    assert result["wall_s"] < 0.9 and math.isfinite(result["wall_s"])


def test_experiments_package_keeps_its_public_names():
    import thermo_ext.experiments as ex

    for name in ["METHODS", "Method", "SettingsError", "SpiralTask", "DigitsTask", "LOSS_FORMS",
                 "MLPGradient", "RunSpec", "init_model", "parse_settings", "check_settings",
                 "resolve_methods", "train_run", "run_many", "default_jobs", "summarize",
                 "format_summary", "robustness_table", "format_robustness", "machine_info",
                 "curve_rows", "plot_comparison", "plot_robustness", "write_json", "write_csv",
                 "optimizer_settings"]:
        assert name in ex.__all__ and getattr(ex, name) is not None, name
    assert 1 <= ex.default_jobs() <= 2
    assert ex.machine_info()["cores"] == ex.available_cores() == len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- mnist1d
TINY_MNIST1D = ["--epochs", "2", "--seeds", "2", "--samples", "200", "--jobs", "1", "--quiet",
                "--ensemble", "2", "--lr-factors", "0.5,1", "--swa-start", "0.5",
                "--methods", "AdLaLa,Langevin,SGD,Adam,AdamW"]


def test_mnist1d_tiny_run_writes_every_table_and_file(tmp_path, capsys, other_defaults):
    pytest.importorskip("mnist1d")
    from thermo_ext.experiments.mnist1d import BASELINES

    out = str(tmp_path / "res")
    assert main(["mnist1d", *TINY_MNIST1D, "--out", out]) == 0
    printed = capsys.readouterr().out
    for part in ("(i) faster", "(ii) more accurate, MLP", "(ii) more accurate, CNN",
                 "(iii) more robust, MLP", "(iv) the sampler's answer, CNN",
                 "AdLaLa, prediction average", "deep ensemble, 2 Adam × 1 epochs",
                 "deep ensemble, 2 Adam × 2 epochs", "SWA of SGD (averaged after epoch 1)"):
        assert part in printed, part
    files = ["mnist1d.json", "mnist1d_curves.csv", "mnist1d_summary.csv", "mnist1d_table.txt",
             "mnist1d.png"]
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "mnist1d.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "mnist1d.json")) as f:
        record = json.load(f)
    runs = record["runs"]
    roles = [r["role"] for r in runs]
    # main: 2 nets x 5 methods x 2 seeds; grid: 2 nets x 5 methods x the other factor x 1 seed;
    # per net and seed: 2 short members, 1 more full-length member, 1 SWA run
    assert (roles.count("main"), roles.count("grid"), roles.count("member"),
            roles.count("swa")) == (20, 10, 12, 4)
    # The named methods run with the unit-mass preset over their (here patched) signatures'
    # defaults, the baselines with their usual settings.
    for m in ("AdLaLa", "Langevin"):
        unit = named_methods.PRESETS["unit"][m]
        assert record["hyper"][m] == {**other_defaults[m], "mass": "adaptive", **unit}, m
        assert record["hyper"][m]["mass"] == "unit"
    for m in ("SGD", "Adam", "AdamW"):
        assert record["hyper"][m] == BASELINES[m], m
    sgd = next(r for r in runs if r["method"] == "SGD" and r["role"] == "main")
    assert sgd["optimizer"][0]["momentum"] == 0.9 and sgd["optimizer"][0]["lr"] == 0.05
    adamw = next(r for r in runs if r["method"] == "AdamW" and r["role"] == "main")
    assert adamw["optimizer"][0]["weight_decay"] == 0.01
    grid = next(r for r in runs if r["method"] == "AdLaLa" and r["role"] == "grid")
    assert grid["lr_factor"] == 0.5 and grid["seed"] == 0
    assert [g["lr"] for g in grid["optimizer"]] == [0.5 * named_methods.PRESETS["unit"]["AdLaLa"]
                                                    ["lr"]] * 2
    # 160 training signals, batch 32: 5 steps per epoch. The average starts after epoch 1 (half
    # of 2) and takes max(1, 5 // 4) = every step: 5 samples.
    main_run = next(r for r in runs if r["method"] == "AdLaLa" and r["role"] == "main")
    assert main_run["steps"] == 10 and main_run["pp_samples"] == 5
    assert main_run["curves"]["epoch"] == [0, 1, 2]
    assert main_run["last"]["acc"] == main_run["final_test_acc"] == \
        main_run["curves"]["test_acc"][-1]
    swa = [r for r in runs if r["role"] == "swa"]
    assert all(r["swa_averaged"] == 1 and r["method"] == "SGD" for r in swa)
    members = sorted((r["arch"], r["seed"], r["member"], r["epochs"]) for r in runs
                     if r["role"] == "member")
    assert members[:3] == [("CNN", 0, 0, 1), ("CNN", 0, 1, 1), ("CNN", 0, 1, 2)]
    kinds = [(r["arch"], r["kind"], r["epochs"]) for r in record["comparison"]]
    assert ("MLP", "ensemble", 2) in kinds and ("MLP", "ensemble_long", 4) in kinds
    assert ("CNN", "swa", 2) in kinds and kinds.count(("MLP", "pp", 2)) == 5
    robust = next(r for r in record["robust"] if r["arch"] == "CNN" and r["method"] == "Adam")
    assert robust["factors"] == [0.5, 1.0] and robust["lr"] == 1e-3
    assert record["settings"]["targets"] == {"MLP": 60.0, "CNN": 85.0}
    with open(os.path.join(out, "mnist1d_curves.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("net,method,role") and len(lines) == 1 + 3 * 30 + 2 * 8 + 3 * 8


@pytest.mark.parametrize("bad, option", [
    (["--nets", "MLP,RNN"], "--nets"),
    (["--lr-factors", "0.5,2"], "--lr-factors"),
    (["--grid-seeds", "3"], "--grid-seeds"),
    (["--targets", "MLP=120"], "--targets"),
    (["--targets", "GRU=50"], "--targets"),
    (["--methods", "AdLaLa,Adam"], "--comparison"),
    (["--epochs", "1"], "--epochs"),
    (["--samples", "50"], "--samples"),
    (["--set", "SGD.foo=1"], "--set"),
    (["--set", "AdamW.lr=-1"], "--set"),
    (["--batch", "1000"], "--batch"),
    (["--pp-burn-in", "1.5"], "--pp-burn-in"),
])
def test_mnist1d_bad_options_exit_nonzero_naming_the_option(tmp_path, capsys, bad, option):
    out = tmp_path / "res"
    assert main(["mnist1d", *TINY_MNIST1D, "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err
    assert option in err, err
    assert not out.exists() or not any(out.iterdir())


def test_mnist1d_data_from_the_generator_offline_and_deterministic():
    pytest.importorskip("mnist1d")
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args

    sig = inspect.signature(data.mnist1d)
    standard = get_dataset_args()
    assert (sig.parameters["samples"].default, sig.parameters["seed"].default,
            sig.parameters["train_split"].default) == (standard.num_samples, standard.seed,
                                                       standard.train_split)
    np.random.seed(3)
    random.seed(3)
    expected = (np.random.rand(), random.random())
    np.random.seed(3)
    random.seed(3)
    (x, y), (xt, yt) = data.mnist1d(200, seed=7)
    assert (np.random.rand(), random.random()) == expected  # global random states restored
    assert x.shape == (160, 40) and xt.shape == (40, 40)
    from thermo_ext.experiments.mnist1d import Mnist1dTask

    assert Mnist1dTask(samples=200).sizes == (160, 40)
    assert Mnist1dTask(samples=105).sizes == (80, 20)  # the generator makes 10 per class
    (x105, _), (xt105, _) = data.mnist1d(105, seed=7)
    assert (len(x105), len(xt105)) == (80, 20)
    assert Mnist1dTask().sizes == (4000, 1000)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    (x2, y2), (xt2, yt2) = data.mnist1d(200, seed=7)
    assert torch.equal(x, x2) and torch.equal(yt, yt2)
    (x3, _), _ = data.mnist1d(200, seed=8)
    assert not torch.equal(x, x3)
    for bad in (dict(samples=10), dict(samples=200.0), dict(seed=-1), dict(train_split=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            data.mnist1d(**{"samples": 200, **bad})


def test_mnist1d_metrics_and_summaries_by_hand():
    from thermo_ext.experiments.mnist1d import (comparison_rows, expected_calibration_error,
                                                faster_rows, metrics, robustness_rows)

    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # confidences 0.9, 0.6, 0.7, 0.55 (right, wrong, right, right); 15 bins of width 1/15:
    # 0.9 in bin 13, 0.6 in bin 8, 0.7 in bin 10, 0.55 in bin 8.
    # bin 8: |(0 - 0.6) + (1 - 0.55)| = 0.15; bin 10: 0.3; bin 13: 0.1 -> 0.55 / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(100 * 0.55 / 4)
    m = metrics(probs, labels)
    assert m["acc"] == 75.0
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)
                                       + math.log(0.55)) / 4)
    bad = metrics(torch.tensor([[math.nan, 0.5], [0.2, 0.8]], dtype=torch.float64),
                  torch.tensor([0, 1]))
    assert bad["acc"] == 50.0 and math.isnan(bad["nll"]) and math.isnan(bad["ece"])

    def run(seed, accs, role="main", method="AdLaLa", f=1.0, **extra):
        return dict(arch="MLP", method=method, role=role, seed=seed, lr_factor=f, epochs=3,
                    hyper={"lr": 0.4}, diverged_at=None, curves={"epoch": [0, 1, 2, 3],
                                                                  "test_acc": accs},
                    last={"acc": accs[-1], "nll": 1.0 + seed, "ece": 2.0}, **extra)

    results = [run(0, [10, 50, 61, 65], pp={"acc": 70, "nll": 0.5, "ece": 1.0}),
               run(1, [10, 62, 64, 66], pp={"acc": 72, "nll": 0.7, "ece": 3.0}),
               run(2, [10, 20, 30, 40], pp={"acc": 74, "nll": 0.9, "ece": 5.0}),
               run(0, [10, 20, 30, 64], role="grid", f=2.0)]
    (row,) = faster_rows(results, ["MLP"], ["AdLaLa"], {"MLP": 60.0})
    assert (row["per_seed"], row["epochs_median"], row["reached"]) == ([2, 1, None], 2, 2)
    (row,) = robustness_rows(results, ["MLP"], ["AdLaLa"], [1.0, 2.0], grid_seeds=1)
    assert row["acc"] == [65, 64] and row["within"] == 2 and row["lr"] == 0.4
    (row,) = robustness_rows(results, ["MLP"], ["AdLaLa"], [1.0, 2.0], grid_seeds=1,
                             within=0.5)
    assert row["fraction"] == 0.5
    # Deep ensembles average the members' probabilities; per seed, then mean +- std over seeds.
    p = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.6], [0.9, 0.1]], dtype=torch.float64)
    y2 = torch.tensor([0, 1])
    members = [dict(arch="MLP", method="Adam", role="member", seed=s, member=k, epochs=1,
                    ensemble="equal", probs=(p if k == 0 else q)) for s in (0, 1)
               for k in (0, 1)]
    rows = comparison_rows(results[:3] + members, ["MLP"], ["AdLaLa"], 2, y2)
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["pp"]["acc"] == 72 and by_kind["pp"]["acc_std"] == pytest.approx(2.0)
    assert by_kind["last"]["nll"] == 2.0 and by_kind["last"]["epochs"] == 3
    want = metrics((p + q) / 2, y2)
    assert by_kind["ensemble"]["acc"] == want["acc"] and by_kind["ensemble"]["epochs"] == 2
    assert by_kind["ensemble"]["nll"] == pytest.approx(want["nll"], rel=1e-15)
    assert by_kind["ensemble"]["acc_std"] == 0.0 and "ensemble_long" not in by_kind


def test_mnist1d_temperature_sets_every_tau_from_the_data_set_size(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    out = str(tmp_path / "res")
    assert main(["mnist1d", "--epochs", "1", "--seeds", "1", "--samples", "100", "--jobs", "1",
                 "--quiet", "--nets", "MLP", "--methods", "AdLaLa,LaLa,Overdamped,Adam",
                 "--no-comparison", "--lr-factors", "1", "--temperature", "0.5",
                 "--set", "LaLa.tau=1e-6", "--out", out]) == 0
    assert "te.posterior_temperature(80, temperature=0.5) = 0.00625" in capsys.readouterr().out
    with open(os.path.join(out, "mnist1d.json")) as f:
        record = json.load(f)
    tau = thermo_ext.posterior_temperature(80, temperature=0.5)
    assert tau == 0.5 / 80 and record["settings"]["posterior_tau"] == tau
    hyper = record["hyper"]
    assert (hyper["AdLaLa"]["tau1"], hyper["AdLaLa"]["tau2"], hyper["Overdamped"]["tau"]) == \
        (tau, tau, tau)
    assert hyper["LaLa"]["tau"] == 1e-6 and "tau" not in hyper["Adam"]  # --set wins
    adlala = next(r for r in record["runs"] if r["method"] == "AdLaLa")
    assert [g["tau"] for g in adlala["optimizer"]] == [tau, tau]
    assert [r["role"] for r in record["runs"]] == ["main"] * 4
