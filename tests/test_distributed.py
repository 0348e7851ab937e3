"""torch.distributed: DDP and FSDP2 on 2 CPU ranks (gloo) follow the 1-process run."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W  # noqa: E402
import helpers as H  # noqa: E402

import thermo_ext as te  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, tmp_path, scheme):
    mp.spawn(fn, args=(2, free_port(), str(tmp_path), scheme), nprocs=2, join=True)


@pytest.mark.parametrize("scheme", ["langevin", "adl"])
def test_ddp_replicas_identical_and_equal_to_single_process(tmp_path, scheme):
    spawn(W.ddp_worker, tmp_path, scheme)
    r0 = torch.load(tmp_path / "ddp0.pt")
    r1 = torch.load(tmp_path / "ddp1.pt")
    assert r0["seed"] == r1["seed"]  # rank 0's seed was broadcast
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # bitwise identical replicas, no extra communication
    # The single-process run with the same seed and the same global batch.
    m = W.make_model()
    opt = te.Thermo(m.parameters(), scheme=scheme, lr=0.1, tau=1e-2, seed=r0["seed"])
    x, y = W.global_batch()
    H.train(m, opt, W.STEPS, x, y)
    for a, b in zip(m.parameters(), r0["params"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["langevin", "adl", "adlala"])
def test_fsdp2_shards_follow_single_process_and_resume_exactly(tmp_path, scheme):
    spawn(W.fsdp_worker, tmp_path, scheme)
    r0 = torch.load(tmp_path / "fsdp0.pt")
    r1 = torch.load(tmp_path / "fsdp1.pt")
    ref, opt = W.single_process(scheme)
    for a, b, c in zip(r0["params"], r1["params"], ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    for a, b in zip(r0["resumed"], r0["params"]):
        assert torch.equal(a, b)  # DCP save on 2 ranks, load on 2 ranks: exact
    want = [float(x) for g in opt.thermostats() for x in g]
    assert r0["xis"] == pytest.approx(want, rel=1e-6)
    kt = [None if t is None else float(t) for t in opt.kinetic_temperature()]
    assert r0["kt"] == pytest.approx(kt, rel=1e-5)


@pytest.mark.parametrize("scheme", ["langevin", "adl", "adlala"])
def test_fsdp2_nan_on_one_rank_is_refused_by_every_rank(tmp_path, scheme):
    """FSDP2 reduce-scatters gradients, so a non-finite value lands on one rank only. Every rank
    raises FloatingPointError (naming the rank that found it), no rank changes any shard,
    momentum, thermostat or counter, nobody waits in a collective, and the next step runs."""
    spawn(W.fsdp_nan_worker, tmp_path, scheme)
    for rank in range(2):
        r = torch.load(tmp_path / f"nan{rank}.pt")
        assert r["message"] is not None, f"rank {rank} did not raise"
        assert "non-finite gradient" in r["message"] and "on any rank" in r["message"]
        assert r["unchanged"], f"rank {rank} changed its state"
        assert r["moved"] and r["steps"] == [3] * len(r["steps"])
    assert "parameter" in torch.load(tmp_path / "nan1.pt")["message"]
    assert "on rank 1" in torch.load(tmp_path / "nan0.pt")["message"]


@pytest.mark.parametrize("scheme", ["langevin", "adl"])
def test_replicated_dtensors_count_once_and_partial_gradients_are_reduced(tmp_path, scheme):
    """Tensor-parallel plans replicate some parameters (Replicate placements) and leave their
    gradients Partial. Each replicated tensor's thermostat sum counts once, not once per rank;
    a Partial gradient is summed over the ranks before the step; so the run equals the
    single-process one (bitwise where no sum crosses ranks) and the replicas stay identical."""
    spawn(W.replicate_worker, tmp_path, scheme)
    r0, r1 = (torch.load(tmp_path / f"rep{r}.pt") for r in range(2))
    init, grads = W._dtensor_case()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = te.Thermo(params, scheme=scheme, lr=0.1, tau=1e-2, eps=0.5, seed=5)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for a, b, c in zip(r0["params"], r1["params"], params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(r0["local"][1:], r1["local"][1:]):
        assert torch.equal(a, b)  # the replicas
    for a, c in zip(r0["params"][1:], params[1:]):
        assert torch.equal(a, c.detach())  # replicated: no sum crosses ranks, the same bits
    if scheme != "langevin":
        want = [float(x) for x in opt.thermostats()[0]]
        assert r0["xis"] == pytest.approx(want, rel=1e-9)
        assert r0["xis"][1:] == want[1:]
    assert r0["kt"] == pytest.approx(float(opt.kinetic_temperature()[0]), rel=1e-9)
    for r in (r0, r1):
        assert r["mixed"] is not None and "sharded and replicated" in r["mixed"]


@pytest.mark.parametrize("scheme", ["adl", "adlala"])
def test_hsdp_on_a_2d_mesh_follows_single_process(tmp_path, scheme):
    """FSDP2 over a (replicate, shard) mesh of 4 ranks: the thermostat sums are all-reduced over
    the shard dimension only, the agreement runs over all ranks, and the run follows the
    single-process one (bitwise-identical replicas)."""
    mp.spawn(W.hsdp_worker, args=(4, free_port(), str(tmp_path), scheme), nprocs=4, join=True)
    runs = [torch.load(tmp_path / f"hsdp{r}.pt") for r in range(4)]
    assert "Replicate()" in runs[0]["placements"][0] and "Shard(dim=0)" in runs[0]["placements"][0]
    ref, opt = W.single_process(scheme)
    for r in runs[1:]:
        for a, b in zip(runs[0]["params"], r["params"]):
            assert torch.equal(a, b)
    for a, c in zip(runs[0]["params"], ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    want = [float(x) for g in opt.thermostats() for x in g]
    assert runs[0]["xis"] == pytest.approx(want, rel=1e-6)
    kt = [None if t is None else float(t) for t in opt.kinetic_temperature()]
    assert runs[0]["kt"] == pytest.approx(kt, rel=1e-5)


@pytest.mark.parametrize("scheme", ["langevin", "adl"])
def test_tensor_parallel_shards_draw_their_global_elements_noise(tmp_path, scheme):
    """Shards on dim 1 or 2 (tensor parallelism's row-wise weights) are runs of global indices;
    each local element gets its global element's noise (thermal momenta and bf16 stochastic
    rounding included), so with the same gradients the run equals the single-process one —
    bitwise where no thermostat sum crosses ranks. A column- then row-wise parallel MLP trained
    by AdLaLa follows the single-process MLP."""
    spawn(W.tp_worker, tmp_path, scheme)
    r0, r1 = (torch.load(tmp_path / f"tp{r}.pt") for r in range(2))
    init, grads = W._tp_case()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = W.tp_optimizer(params, scheme)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for backend in ("engine", "reference"):
        for a, b, c in zip(r0[backend], r1[backend], params):
            assert torch.equal(a, b)
            if scheme == "langevin" and backend == "engine":
                assert torch.equal(a, c.detach())
            else:
                torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-5)
    if scheme == "adl":
        want = [float(x) for t in opt.thermostats() for x in t]
        assert r0["engine xis"] == pytest.approx(want, rel=1e-6)
        assert r0["reference xis"] == pytest.approx(want, rel=1e-5)
    mlp, _ = _single_process_mlp(scheme)
    for a, b, c in zip(r0["mlp"], r1["mlp"], mlp.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-5)


def _single_process_mlp(scheme):
    mlp, x, y = W.tp_mlp()
    opt = W.tp_mlp_optimizer(mlp, scheme)
    for _ in range(W.STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(mlp(x), y).backward()
        opt.step()
    return mlp, opt


@pytest.mark.parametrize("scheme", ["adlala", "adl"])
def test_fsdp2_over_tensor_parallelism_follows_single_process(tmp_path, scheme):
    """FSDP2 on top of tensor parallelism, (dp, tp) mesh of 4 ranks: _StridedShard and
    two-dim shards step with their global indices' noise; each tensor's thermostat sums run over
    the mesh dims that split it (both for the weights, dp only for the row-wise bias, which tp
    replicates: such tensors go to calls of their own); the run follows the single-process MLP."""
    mp.spawn(W.fsdp_tp_worker, args=(4, free_port(), str(tmp_path), scheme), nprocs=4,
             join=True)
    runs = [torch.load(tmp_path / f"fsdptp{r}.pt") for r in range(4)]
    assert any("_StridedShard" in p for p in runs[0]["placements"])
    assert any("Shard(dim=1)" in p for p in runs[0]["placements"])
    mlp, opt = _single_process_mlp(scheme)
    for r in runs[1:]:
        for a, b in zip(runs[0]["params"], r["params"]):
            assert torch.equal(a, b)
    for a, c in zip(runs[0]["params"], mlp.parameters()):
        torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-6)
    want = [float(x) for g in opt.thermostats() for x in g]
    assert runs[0]["xis"] == pytest.approx(want, rel=1e-6)


def test_dtensor_is_looked_up_only_once_the_program_imports_it():
    # importing torch.distributed.tensor costs most of a second; no DTensor exists before the
    # program imports it, so `import thermo_ext` leaves it alone and finds it afterwards
    import subprocess
    import textwrap
    code = textwrap.dedent("""
        import sys
        import thermo_ext
        from thermo_ext import _compat
        from thermo_ext.distributed import is_dtensor
        import torch
        assert "torch.distributed.tensor" not in sys.modules
        assert _compat.dtensor_type() is None and not is_dtensor(torch.zeros(2))
        from torch.distributed.tensor import DTensor
        assert _compat.dtensor_type() is DTensor and not is_dtensor(torch.zeros(2))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
