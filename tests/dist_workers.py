"""Worker functions for tests/test_distributed.py, run in spawned processes (gloo, CPU).

Every worker is wrapped in :func:`clean_exit`: once its results are on disk it tears down the
process group and leaves with ``os._exit``, so that gloo's worker threads, still alive during
interpreter shutdown, cannot abort a process whose work is done ("terminate called without an
active exception", SIGABRT; plain torch DDP does the same on torch 2.13).
"""

import functools
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import helpers as H
import thermo_ext as te

STEPS = 20


def clean_exit(fn):
    @functools.wraps(fn)
    def run(rank, *args):
        code = 0
        try:
            fn(rank, *args)
        except BaseException:  # noqa: BLE001 - reported, then the exit code fails the test
            traceback.print_exc()
            code = 1
        finally:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = code or 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    return run


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, generator=g)
    return x, (x[:, :1] * x[:, 1:] > 0).float()


def fsdp_model(rank, world, mesh=None):
    """The test model with each Linear and the whole model under FSDP2's fully_shard (on
    ``mesh``, by default the world's), and this rank's part of the global batch."""
    from torch.distributed.fsdp import fully_shard

    x, y = global_batch()
    n = x.shape[0] // world
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def make_opt(model, scheme):
    if scheme == "adl":
        return te.AdL(model.parameters(), tau=1e-2, seed=99)
    if scheme == "adlala":
        # (the unit mass: at tau 1e-3 the adaptive mass's floor makes its weights run away)
        return te.AdLaLa(model, tau1=1e-3, tau2=1e-3, seed=99, mass="unit")
    return te.Langevin(model.parameters(), tau=1e-2, seed=99)


def single_process(scheme, steps=STEPS):
    m = make_model()
    x, y = global_batch()
    opt = make_opt(m, scheme)
    H.train(m, opt, steps, x, y)
    return [p.detach().clone() for p in m.parameters()], opt


def _init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


@clean_exit
def ddp_worker(rank, world, port, out_dir, scheme):
    _init(rank, world, port)
    torch.manual_seed(1000 + rank)  # the optimizer must take rank 0's seed anyway
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = te.Thermo(model.parameters(), scheme="langevin" if scheme == "langevin" else "adl",
                    lr=0.1, tau=1e-2)
    x, y = global_batch()
    n = x.shape[0] // world
    H.train(ddp, opt, STEPS, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    torch.save({"params": [p.detach() for p in model.parameters()],
                "seed": opt.param_groups[0]["seed"]}, os.path.join(out_dir, f"ddp{rank}.pt"))


@clean_exit
def fsdp_worker(rank, world, port, out_dir, scheme):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    _init(rank, world, port)

    def build():
        model, xs, ys = fsdp_model(rank, world)
        return model, make_opt(model, scheme), xs, ys

    model, opt, xs, ys = build()
    half = STEPS // 2
    H.train(model, opt, half, xs, ys)
    ck = os.path.join(out_dir, "ck")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
    H.train(model, opt, STEPS - half, xs, ys)
    full = [p.full_tensor().detach() for p in model.parameters()]
    xis = [float(x) for g in opt.thermostats() for x in g]
    # Resume from the checkpoint in a fresh model and optimizer.
    model2, opt2, _, _ = build()
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=ck)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    H.train(model2, opt2, STEPS - half, xs, ys)
    resumed = [p.full_tensor().detach() for p in model2.parameters()]
    torch.save({"params": full, "resumed": resumed, "xis": xis,
                "kt": [None if t is None else float(t) for t in opt.kinetic_temperature()]},
               os.path.join(out_dir, f"fsdp{rank}.pt"))


@clean_exit
def fsdp_nan_worker(rank, world, port, out_dir, scheme):
    """A NaN in one rank's shard of a gradient: every rank refuses the step (no hang, no shard
    changed anywhere), and the next clean step runs on every rank."""
    from datetime import timedelta

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A bounded timeout: a rank left waiting in a collective fails the test instead of hanging
    # for gloo's default 30 minutes (generous, for a loaded machine).
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))
    torch.set_num_threads(1)
    model, xs, ys = fsdp_model(rank, world)
    opt = make_opt(model, scheme)
    H.train(model, opt, 2, xs, ys)
    opt.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(xs), ys).backward()
    if rank == 1:
        with torch.no_grad():
            list(model.parameters())[2].grad.to_local().view(-1)[0] = float("nan")
    before = [p.to_local().detach().clone() for p in model.parameters()]
    moms = [opt.state[p]["momentum_buffer"].to_local().clone() for p in model.parameters()
            if "momentum_buffer" in opt.state.get(p, {})]
    xis = [t.clone() for g in opt.thermostats() for t in g]
    steps = [int(g["step"]) for g in opt.param_groups]
    try:
        opt.step()
        message = None
    except FloatingPointError as e:
        message = str(e)
    unchanged = (all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
                 and all(torch.equal(a, opt.state[p]["momentum_buffer"].to_local())
                         for a, p in zip(moms, [p for p in model.parameters()
                                                if "momentum_buffer" in opt.state.get(p, {})]))
                 and all(torch.equal(a, b) for a, b in
                         zip(xis, [t for g in opt.thermostats() for t in g]))
                 and steps == [int(g["step"]) for g in opt.param_groups])
    H.train(model, opt, 1, xs, ys)  # the next, clean step runs everywhere
    moved = not all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    torch.save({"message": message, "unchanged": unchanged, "moved": moved,
                "steps": [int(g["step"]) for g in opt.param_groups]},
               os.path.join(out_dir, f"nan{rank}.pt"))


def _dtensor_case():
    """A sharded weight, a replicated weight and a replicated bias with their gradients for
    STEPS steps: the replicated weight's gradient as Partial (each rank one summand, as tensor
    parallelism leaves it), exact in float so that the sum is the full gradient bit for bit."""
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(8, 3, generator=g), torch.randn(5, 3, generator=g),
            torch.randn(5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(STEPS)]
    return init, grads


@clean_exit
def replicate_worker(rank, world, port, out_dir, scheme):
    """Replicated DTensor parameters next to a sharded one: each replica counts its thermostat
    sums once (not once per rank), Partial gradients are reduced before the step, and the run
    follows the single-process one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    init, grads = _dtensor_case()
    places = [[Shard(0)], [Replicate()], [Replicate()]]
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(init, places)]
    opt = te.Thermo(params, scheme=scheme, lr=0.1, tau=1e-2, eps=0.5, seed=5)
    for step in grads:
        params[0].grad = distribute_tensor(step[0].clone(), mesh, [Shard(0)])
        params[1].grad = DTensor.from_local(step[1].clone() if rank == 0 else
                                            torch.zeros_like(step[1]), mesh, [Partial()])
        params[2].grad = distribute_tensor(step[2].clone(), mesh, [Replicate()])
        opt.step()
    xis = [float(x) for x in opt.thermostats()[0]] if scheme != "langevin" else []
    kt = float(opt.kinetic_temperature()[0])
    mixed = None
    try:  # one thermostat over sharded and replicated tensors: refused on every rank
        te.Thermo(params, scheme="adl", thermostat="group", seed=5).step()
    except ValueError as e:
        mixed = str(e)
    torch.save({"params": [p.full_tensor().detach() for p in params],
                "local": [p.to_local().detach().clone() for p in params],
                "xis": xis, "kt": kt, "mixed": mixed},
               os.path.join(out_dir, f"rep{rank}.pt"))


@clean_exit
def hsdp_worker(rank, world, port, out_dir, scheme):
    """FSDP2 on a 2-D mesh (HSDP: replicated across the first dimension, sharded across the
    second): placements (Replicate(), Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model, xs, ys = fsdp_model(rank, world, mesh)
    opt = make_opt(model, scheme)
    H.train(model, opt, STEPS, xs, ys)
    torch.save({"params": [p.full_tensor().detach() for p in model.parameters()],
                "placements": [str(p.placements) for p in model.parameters()],
                "xis": [float(x) for g in opt.thermostats() for x in g],
                "kt": [None if t is None else float(t) for t in opt.kinetic_temperature()]},
               os.path.join(out_dir, f"hsdp{rank}.pt"))


def _tp_case():
    """Weights as tensor parallelism shards them (dim 1 of a matrix, dims 1 and 2 of 3-D
    tensors, and a bf16 one), with dim-0 and replicated neighbours, and STEPS steps of
    gradients."""
    g = torch.Generator().manual_seed(11)
    shapes = [(6, 8), (4, 6, 5), (4, 6, 4), (8, 3), (5,), (6, 4)]
    init = [torch.randn(s, generator=g) for s in shapes]
    init[5] = init[5].bfloat16()
    grads = [[torch.randn(t.shape, generator=g).to(t.dtype) for t in init] for _ in range(STEPS)]
    return init, grads


def tp_placements():
    from torch.distributed.tensor import Replicate, Shard
    return [[Shard(1)], [Shard(1)], [Shard(2)], [Shard(0)], [Replicate()], [Shard(1)]]


def tp_optimizer(params, scheme, backend="engine"):
    return te.Thermo(params, scheme=scheme, lr=0.1, tau=1e-2, eps=0.5, seed=5,
                     momentum_init="thermal", backend=backend)


@clean_exit
def tp_worker(rank, world, port, out_dir, scheme):
    """Shards on dims other than 0 (tensor parallelism), with fixed gradients: the noise of
    each local element is its global element's, so the run equals the single-process one; and
    a parallelize_module MLP (column- then row-wise) trains as the single-process MLP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    init, grads = _tp_case()
    out = {}
    for backend in ("engine", "reference"):
        params = [nn.Parameter(distribute_tensor(t.clone(), mesh, pl))
                  for t, pl in zip(init, tp_placements())]
        opt = tp_optimizer(params, scheme, backend)
        for step in grads:
            for p, g, pl in zip(params, step, tp_placements()):
                p.grad = distribute_tensor(g.clone(), mesh, pl)
            opt.step()
        out[backend] = [p.full_tensor().detach() for p in params]
        out[backend + " xis"] = [float(x) for t in opt.thermostats() for x in t]
    mlp, x, y = tp_mlp()
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = tp_mlp_optimizer(mlp, scheme)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(mlp(x), y).backward()
        opt.step()
    out["mlp"] = [p.full_tensor().detach() for p in mlp.parameters()]
    torch.save(out, os.path.join(out_dir, f"tp{rank}.pt"))


@clean_exit
def fsdp_tp_worker(rank, world, port, out_dir, scheme):
    """FSDP2 over tensor parallelism on a (dp, tp) mesh of 4 ranks: placements such as
    (_StridedShard(0), Shard(0)) and (Shard(0), Shard(1))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    mlp, x, y = tp_mlp()
    parallelize_module(mlp, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(mlp, mesh=mesh["dp"])
    opt = tp_mlp_optimizer(mlp, scheme)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(mlp(x), y).backward()
        opt.step()
    torch.save({"params": [p.full_tensor().detach() for p in mlp.parameters()],
                "placements": [str(p.placements) for p in mlp.parameters()],
                "xis": [float(x) for g in opt.thermostats() for x in g]},
               os.path.join(out_dir, f"fsdptp{rank}.pt"))


def tp_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    return mlp, x, x.repeat(1, 2)[:, :10].sin()


def tp_mlp_optimizer(mlp, scheme):
    if scheme == "adl":
        return te.AdL(mlp.parameters(), tau=1e-3, seed=3)
    return te.AdLaLa(mlp, seed=3)
