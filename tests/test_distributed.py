"""torch.distributed: DDP and FSDP2 on 2 CPU ranks (gloo) follow the 1-process run."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W  # noqa: E402

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
    W.train(m, opt, x, y, W.STEPS)
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
