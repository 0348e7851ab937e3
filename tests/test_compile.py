"""torch.compile: the step is one torch.library op (thermo_ext::step), so a compiled step has no
graph break, gives eager's bits, follows schedulers without recompiling, and a whole train step
(forward, backward, step) compiles with fullgraph=True."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import thermo_ext as te

torch._dynamo.config.cache_size_limit = 64


def spiral_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(25, 2, generator=g)
    return x, (x[:, :1] * x[:, 1:] > 0).float()


METHODS = {
    "Langevin": lambda m: te.Langevin(m, tau=1e-3, seed=5),
    "AdL": lambda m: te.AdL(m, tau=1e-3, seed=5),
    "Overdamped": lambda m: te.Overdamped(m, tau=1e-3, seed=5),
    "AdLaLa": lambda m: te.AdLaLa(m, seed=5),
    "LOL": lambda m: te.LOL(m, seed=5),
    "OBABO+thermal": lambda m: te.Thermo(m.parameters(), scheme="OBABO", tau=1e-3, seed=5,
                                         momentum_init="thermal", weight_decay=1e-2),
}


def run(make, compiled: bool, steps=12):
    torch._dynamo.reset()
    m = spiral_net()
    opt = make(m)
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        step()
    return [p.detach().clone() for p in m.parameters()], opt


@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_step_gives_eager_bits(name):
    eager, opt_e = run(METHODS[name], False)
    compiled, opt_c = run(METHODS[name], True)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert [int(g["step"]) for g in opt_c.param_groups] == [12] * len(opt_c.param_groups)
    for xa, xb in zip(opt_e.thermostats(), opt_c.thermostats()):
        assert all(torch.equal(a, b) for a, b in zip(xa, xb))


def test_no_graph_break():
    m = spiral_net()
    opt = te.AdLaLa(m, seed=1)
    x, y = batch()
    nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert any("thermo_ext.step" in o for o in ops), ops


def test_scheduler_changes_reach_the_compiled_step_without_recompiling():
    """The op reads the group's hyperparameters when it runs, so an lr scheduler's change is
    the eager run's, and after the first state is made there is no recompilation."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        m = spiral_net()
        opt = te.AdLaLa(m, seed=2)
        # Compiled before the scheduler wraps opt.step (torch.optim.lr_scheduler's wrapper is
        # never traced by dynamo, for torch's optimizers as for this one).
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        temp = te.TemperatureScheduler(opt, lambda k: 1.0 / (1 + k))
        x, y = batch()
        base = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        counts = []
        warnings.filterwarnings("ignore", r"Detected call of .lr_scheduler\.step")
        for _ in range(8):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
            step()
            sched.step()
            temp.step()
            if compiled:
                counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - base)
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # One graph before the optimizer had state, one after: none for the 7 lr/tau changes.
    assert counts[-1] == counts[1] <= 2, counts


TRAIN_STEP = textwrap.dedent("""
    import json, torch
    from torch import nn
    import thermo_ext as te
    from test_compile import batch, spiral_net

    torch._dynamo.config.trace_autograd_ops = True  # lets dynamo trace loss.backward()
    losses = {}
    for compiled in (False, True):
        model = spiral_net()
        opt = te.Langevin(model, lr=0.1, gamma=1.0, tau=1e-6, seed=3)

        def train_step(x, y):
            for p in model.parameters():
                p.grad = None
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        fn = torch.compile(train_step, fullgraph=True) if compiled else train_step
        x, y = batch()
        losses[compiled] = [float(fn(x, y)) for _ in range(60)]
    print(json.dumps([losses[False], losses[True]]))
""")


def test_whole_train_step_compiles_with_fullgraph_and_trains():
    """Forward, backward and the step in one graph (in a fresh process: dynamo keeps state
    across compilations of closures). The compiled forward/backward may round differently from
    eager, so the check is that it trains as eager does, not bitwise."""
    res = subprocess.run([sys.executable, "-c", TRAIN_STEP], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), check=True)
    eager, compiled = json.loads(res.stdout.strip().splitlines()[-1])
    assert compiled[-1] < 0.85 * compiled[0]
    assert compiled[-1] == pytest.approx(eager[-1], rel=1e-3)


def test_compiled_step_raises_and_changes_nothing_on_a_non_finite_gradient():
    torch._dynamo.reset()
    m = spiral_net()
    opt = te.AdL(m, seed=4)
    step = torch.compile(opt.step, fullgraph=True)
    x, y = batch()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        step()
    before = [p.detach().clone() for p in m.parameters()]
    xis = [t.clone() for g in opt.thermostats() for t in g]
    next(m.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(xis, [t for g in opt.thermostats() for t in g]))
    assert int(opt.param_groups[0]["step"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_mode_with_capturable_replays_the_eager_run():
    """CUDA graphs (mode="reduce-overhead") with capturable=True: the replayed steps give the
    eager run's parameters."""
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = spiral_net().cuda()
        opt = te.AdLaLa(m, seed=9, capturable=True)
        step = torch.compile(opt.step, mode="reduce-overhead") if compiled else opt.step
        x, y = (t.cuda() for t in batch())
        for _ in range(10):
            opt.zero_grad(set_to_none=False)
            nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
            step()
        torch.cuda.synchronize()
        out.append([p.detach().cpu() for p in m.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
