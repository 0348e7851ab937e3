"""The ``thermo-ext`` command line end to end on tiny settings, and the data generators.

Every experiment here runs a few epochs on a few dozen points: the point is that the commands
write their files, print their tables and reject bad options, not the accuracy they reach.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import thermo_ext
from thermo_ext import data
from thermo_ext.cli import main
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
    for m in METHODS:
        assert m in table
    for f in _files(out, "spiral"):
        assert os.path.getsize(f) > 0, f
    with open(os.path.join(out, "spiral.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "spiral.json")) as f:
        record = json.load(f)
    assert len(record["runs"]) == len(METHODS)
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
    assert len(lines) == 1 + len(METHODS) * 3


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two-thread kernels stall on a busy 2-core machine: keep it short
    try:
        assert main(["bench", "--spiral", "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "spiral net" in printed and "AdLaLa" in printed
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


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
    assert "seed 1" in proc.stderr  # a progress bar per run
    with open(out / "spiral.json") as f:
        record = json.load(f)
    assert sorted((r["method"], r["seed"]) for r in record["runs"]) == [
        ("AdLaLa", 0), ("AdLaLa", 1), ("Adam", 0), ("Adam", 1)]
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
