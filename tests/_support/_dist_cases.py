"""What each rank runs in the distributed tests (module-level, so spawned
processes can import it), and the single-process runs they are compared with.

Every case feeds the same global gradients to every layout, so the whole
model's trajectory must not depend on the layout."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from optimizers import make
from torch import nn

import interpolatron

# Shapes chosen so that 2, 3 and 4 ranks split them unevenly (some ranks get
# nothing of the small ones), plus one replicated parameter.
SHAPES = [(7, 3), (5,), (11, 2), (1,), (3, 4)]
REPLICATED = 4  # index of the parameter left whole on every rank


def global_data(dtype: torch.dtype, steps: int, seed: int = 0):
    """Initial parameters and one gradient per step (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
             for _ in range(steps)]
    return x0, grads


def _coefficients(opt) -> torch.Tensor:
    return opt.coefficients.detach().clone().cpu()


# Steps at which some parameters have no gradient (the set of parameters with
# gradients changes: the Gram's older ages are rebuilt from the rings).
SKIPS = {2: (1,), 3: (1, 3), 5: (0,)}


# GradScaler's fused contract on shards: every gradient times SCALE, and at
# the INF_STEPS one shard's gradient holds an inf (the step must write nothing).
SCALE = 8.0
INF_STEPS = (2, 4)


def _amp_args(step: int, amp: bool) -> dict:
    if not amp:
        return {}
    return {"grad_scale": torch.tensor([SCALE]), "found_inf": torch.tensor([float(step in INF_STEPS)])}


def _scaled(g: torch.Tensor, step: int, i: int, amp: bool) -> torch.Tensor:
    if not amp:
        return g
    g = g * SCALE
    if step in INF_STEPS and i == 0:
        g = g.clone()
        g.view(-1)[0] = float("inf")
    return g


def run_anderson_plain(dtype, backend, steps, history=3, weight_decay=0.01, device="cpu", skips=None,
                       amp=False, drop=()):
    """The single-process reference: plain tensors. ``drop``: steps left out
    (their gradients never seen), the independent reference of a run whose
    scaler skipped them."""
    x0, grads = global_data(dtype, steps)
    grads = [[g.to(device) for g in gs] for gs in grads]
    params = [x.to(device).requires_grad_() for x in x0]
    opt = interpolatron.Anderson(params, lr=0.1, history=history, weight_decay=weight_decay, backend=backend)
    coefs = []
    for step, g in enumerate(grads):
        if step in drop:
            coefs.append(coefs[-1] if coefs else _coefficients(opt))
            continue
        for i, (p, gi) in enumerate(zip(params, g)):
            p.grad = None if i in (skips or {}).get(step, ()) else _scaled(gi, step, i, amp).clone()
        opt.step(**_amp_args(step, amp))
        coefs.append(_coefficients(opt))
    return {"coefs": torch.stack(coefs), "params": [p.detach().cpu().clone() for p in params]}


def _layout(world: int, kind: str, device: str):
    """A mesh and each parameter's placements: ``1d`` Shard(0) over every rank
    (one Replicate); on a 2 x (world/2) mesh ``hsdp`` (Replicate, Shard(0)) and
    ``2d`` (Shard(0), Shard(1)) for matrices, (Shard(0), Replicate) for vectors."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    if kind == "1d":
        mesh = init_device_mesh(device, (world,))
        return mesh, [[Replicate()] if i == REPLICATED else [Shard(0)] for i in range(len(SHAPES))]
    mesh = init_device_mesh(device, (2, world // 2))
    if kind == "hsdp":
        return mesh, [[Replicate(), Replicate()] if i == REPLICATED else [Replicate(), Shard(0)]
                      for i in range(len(SHAPES))]
    return mesh, [[Shard(0), Shard(1)] if len(s) == 2 else [Shard(0), Replicate()] for s in SHAPES]


def anderson_dtensor(rank, world, dtype, backend, steps, history=3, weight_decay=0.01, device="cpu",
                     kind="1d", skips=None, amp=False, compiled=False):
    """Anderson on DTensor parameters laid out by :func:`_layout`; gradients
    distributed the same way."""
    from torch.distributed.tensor import distribute_tensor

    mesh, place = _layout(world, kind, device)
    x0, grads = global_data(dtype, steps)
    x0 = [x.to(mesh.device_type) for x in x0]
    grads = [[g.to(mesh.device_type) for g in gs] for gs in grads]
    params = [nn.Parameter(distribute_tensor(x, mesh, pl, src_data_rank=None)) for x, pl in zip(x0, place)]
    opt = interpolatron.Anderson(params, lr=0.1, history=history, weight_decay=weight_decay, backend=backend)
    # Compiled: after one eager step (a first compiled step on DTensors fails in
    # Dynamo's analysis; on plain tensors it compiles from the first step).
    step_fn = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    coefs = []
    for step, g in enumerate(grads):
        for i, (p, gi, pl) in enumerate(zip(params, g, place)):
            skip = i in (skips or {}).get(step, ())
            g_step = _scaled(gi, step, i, amp)
            p.grad = None if skip else distribute_tensor(g_step, mesh, pl, src_data_rank=None)
        (opt.step if step == 0 else step_fn)(**_amp_args(step, amp))
        coefs.append(_coefficients(opt))
    hist = opt.state[params[0]]["x_hist"]
    return {"coefs": torch.stack(coefs), "params": [p.detach().full_tensor().cpu() for p in params],
            "hist_type": type(hist).__name__, "hist_placements": str(hist.placements),
            "hist_shape": tuple(hist.shape), "hist_local": tuple(hist.to_local().shape)}


def plain_and_sharded_state_dicts(rank, world, steps, switch_at):
    """Checkpoints between layouts with the plain ``state_dict()``: a plain
    optimizer's state loaded into one over DTensor shards (split like the
    parameters), and a sharded optimizer's loaded into a plain one (gathered),
    each continuing the single-process trajectory."""
    from torch.distributed.tensor import distribute_tensor

    mesh, place = _layout(world, "1d", "cpu")
    x0, grads = global_data(torch.float32, steps)
    def make(params):
        return interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend="torch")

    out = {}
    for first in ("plain", "sharded"):
        if first == "plain":
            params = [x.clone().requires_grad_() for x in x0]
        else:
            params = [nn.Parameter(distribute_tensor(x, mesh, pl, src_data_rank=None))
                      for x, pl in zip(x0, place)]
        opt, coefs = make(params), []
        for step in range(steps):
            if step == switch_at:  # rebuild everything in the other layout from the state_dict
                sd = opt.state_dict()
                values = [p.detach().full_tensor() if first == "sharded" else p.detach().clone()
                          for p in params]
                if first == "plain":
                    params = [nn.Parameter(distribute_tensor(v, mesh, pl, src_data_rank=None))
                              for v, pl in zip(values, place)]
                else:
                    params = [v.requires_grad_() for v in values]
                opt = make(params)
                opt.load_state_dict(sd)
            sharded = (first == "plain") == (step >= switch_at)
            for p, g, pl in zip(params, grads[step], place):
                p.grad = distribute_tensor(g, mesh, pl, src_data_rank=None) if sharded else g.clone()
            opt.step()
            coefs.append(_coefficients(opt))
        out[first] = {"coefs": torch.stack(coefs),
                      "params": [(p.detach().full_tensor() if first == "plain" else p.detach()).clone()
                                 for p in params]}
    return out


def interpolatron_diagnostics_dtensor(rank, world, steps):
    from torch.distributed.tensor import distribute_tensor

    mesh, place = _layout(world, "1d", "cpu")
    x0, grads = global_data(torch.float32, steps)
    params = [nn.Parameter(distribute_tensor(x, mesh, pl, src_data_rank=None)) for x, pl in zip(x0, place)]
    return _diagnostics_run(params, [[distribute_tensor(g, mesh, pl, src_data_rank=None)
                                      for g, pl in zip(gs, place)] for gs in grads])


def run_diagnostics_plain(steps):
    x0, grads = global_data(torch.float32, steps)
    return _diagnostics_run([x.clone().requires_grad_() for x in x0], grads)


def _diagnostics_run(params, grads):
    opt = interpolatron.Interpolatron(params, lr=0.1, alphas=(0.1, 0.3, 0.6), weight_decay=0.01,
                                      diagnostics=True, backend="torch")
    norms, cosines = [], []
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi
        opt.step()
        d = opt.diagnostics
        norms.append(d["grad_norm"].item())
        cosines.append(d["grad_cosine"].item() if "grad_cosine" in d else 0.0)
    f64 = torch.float64
    return {"norms": torch.tensor(norms, dtype=f64), "cosines": torch.tensor(cosines, dtype=f64)}


def anderson_partitioned(rank, world, steps, skips):
    """ZeRO's layout by hand: rank r's Anderson owns the whole parameters i with
    i % world == r (plain tensors, ``process_group``); some steps leave
    parameters without gradients, so one rank's set changes while another's
    does not."""
    x0, grads = global_data(torch.float32, steps)
    mine = [i for i in range(len(SHAPES)) if i % world == rank]
    params = {i: x0[i].clone().requires_grad_() for i in mine}
    opt = interpolatron.Anderson(list(params.values()), lr=0.1, history=3, weight_decay=0.01,
                                 backend="torch", process_group=dist.group.WORLD)
    coefs = []
    for step, g in enumerate(grads):
        for i, p in params.items():
            p.grad = None if i in skips.get(step, ()) else g[i].clone()
        opt.step()
        coefs.append(_coefficients(opt))
    return {"coefs": torch.stack(coefs), "params": {i: p.detach().clone() for i, p in params.items()}}


# -- models ---------------------------------------------------------------------------

def make_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(8, 5, generator=gen, dtype=torch.float64),
            torch.randn(8, 3, generator=gen, dtype=torch.float64))


def loss_of(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean()


def _optimizer(name: str, params, **kw):
    """The registry's configuration ``name`` on the torch backend."""
    return make(name, params, "torch", weight_decay=1e-3, **kw)


def train(model, opt, first: int, last: int, coefs: list | None = None):
    for step in range(first, last):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()
        opt.step()
        if coefs is not None and hasattr(opt, "coefficients"):
            coefs.append(_coefficients(opt))


def full_params(model) -> list[torch.Tensor]:
    from interpolatron.sharding import is_dtensor

    return [(p.full_tensor() if is_dtensor(p) else p).detach().clone() for p in model.parameters()]


def run_model_plain(name: str, steps: int, restart_at: int | None = None):
    """The single-process run; ``restart_at``: a fresh optimizer from that step on
    (what a resume that lost the optimizer's state would do)."""
    model = make_model()
    opt = _optimizer(name, model.parameters())
    coefs: list = []
    if restart_at is not None:
        train(model, opt, 0, restart_at)
        opt = _optimizer(name, model.parameters())
        coefs = [None] * restart_at
        train(model, opt, restart_at, steps, coefs)
        return {"params": full_params(model), "coefs": torch.stack(coefs[restart_at:]) if coefs[restart_at:]
                else None}
    train(model, opt, 0, steps, coefs)
    return {"params": full_params(model), "coefs": torch.stack(coefs) if coefs else None}


def _fsdp2_model(layers: bool = True):
    """FSDP2 on a CPU mesh (explicitly: by default FSDP2 would move the model
    to the GPU where there is one), each linear layer and the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model()
    for layer in (model[0], model[2]) if layers else ():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2(rank, world, name, steps):
    model = _fsdp2_model()
    opt = _optimizer(name, model.parameters())
    coefs: list = []
    train(model, opt, 0, steps, coefs)
    st = opt.state[model[0].weight]
    return {"params": full_params(model), "coefs": torch.stack(coefs) if coefs else None,
            "hist_type": type(st["x_hist"]).__name__}


def ddp(rank, world, name, steps):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = _optimizer(name, model.parameters())
    coefs: list = []
    train(model, opt, 0, steps, coefs)
    return {"params": full_params(model.module), "coefs": torch.stack(coefs) if coefs else None}


def zero(rank, world, name, steps, group=True):
    """ZeroRedundancyOptimizer: each rank's Anderson owns whole parameters (a
    different set per rank); ``process_group`` sums the Gram over the ranks."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    cls = functools.partial(_optimizer, name, process_group=dist.group.WORLD if group else None)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)
    coefs: list = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()  # every rank the same batch: the global gradient
        opt.step()
        if hasattr(opt.optim, "coefficients"):
            coefs.append(_coefficients(opt.optim))
    return {"params": full_params(model), "coefs": torch.stack(coefs) if coefs else None,
            "owned": sum(len(g["params"]) for g in opt.optim.param_groups)}


def fsdp1(rank, world, name, steps):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    opt = _optimizer(name, model.parameters(), process_group=dist.group.WORLD)
    coefs: list = []
    train(model, opt, 0, steps, coefs)
    with FullyShardedDataParallel.summon_full_params(model):
        params = [p.detach().clone() for p in model.module.parameters()]
    return {"params": params, "coefs": torch.stack(coefs) if coefs else None}


# -- RNA ------------------------------------------------------------------------------

def _rna_run(model, residual: str, records: int = 5):
    from interpolatron.sharding import is_dtensor

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rna = interpolatron.RNA(model, window=3, reg=1e-8, residual=residual, optimizer=opt, backend="torch")
    for step in range(records):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()
        opt.step()
        rna.record()
    out = rna.extrapolate()
    full = {n: (t.full_tensor() if is_dtensor(t) else t).detach().clone() for n, t in out.items()}
    rna.close()
    return {"coefs": rna.coefficients.detach().clone().cpu(), "extrapolated": full}


def rna_fsdp1(rank, world, residual):
    """RNA over FSDP1 flat parameter shards (``process_group``): the
    coefficients, and the extrapolation swapped into the model and gathered."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rna = interpolatron.RNA(model, window=3, reg=1e-8, residual=residual, optimizer=opt, backend="torch",
                            process_group=dist.group.WORLD)
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()
        opt.step()
        rna.record()
    with rna.swapped():
        with FullyShardedDataParallel.summon_full_params(model):
            extrapolated = [p.detach().clone() for p in model.module.parameters()]
    rna.close()
    return {"coefs": rna.coefficients.detach().clone(), "extrapolated": extrapolated}


def run_rna_plain(residual: str):
    return _rna_run(make_model(), residual)


def rna_fsdp2(rank, world, residual):
    return _rna_run(_fsdp2_model(), residual)


# -- distributed checkpoints ----------------------------------------------------------

def dcp_save(rank, world, name, saved_at, steps, path):
    """Train on FSDP2, save model and optimizer with DCP after ``saved_at``
    steps, keep training to ``steps`` (the uninterrupted run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _fsdp2_model()
    opt = _optimizer(name, model.parameters())
    coefs: list = []
    train(model, opt, 0, saved_at, coefs)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    train(model, opt, saved_at, steps, coefs)
    return {"params": full_params(model), "coefs": torch.stack(coefs) if coefs else None}


def dcp_load(rank, world, name, saved_at, steps, path):
    """A fresh FSDP2 model and optimizer (another rank count: resharded) resume
    from the checkpoint and train to ``steps``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _fsdp2_model()
    opt = _optimizer(name, model.parameters())
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    coefs: list = [None] * saved_at
    train(model, opt, saved_at, steps, coefs)
    st = opt.state[model[0].weight]
    resumed = coefs[saved_at:]
    return {"params": full_params(model), "coefs": torch.stack(resumed) if resumed else None,
            "hist_local": tuple(st["x_hist"].to_local().shape)}


# -- collectives ----------------------------------------------------------------------

def count_collectives(rank, world, steps):
    """Collectives issued by optimizer steps on FSDP2 parameters (the backward's
    reduce-scatters are outside the counted region)."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts = {}
    for name in ("interpolatron", "anderson"):
        model = _fsdp2_model(layers=False)
        opt = _optimizer(name, model.parameters())
        total = 0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_of(model, step).backward()
            with CommDebugMode() as comm:
                opt.step()
            total += comm.get_total_counts()
        counts[name] = total
    # The counter sees a plain all-reduce of a device tensor (what gram.py issues).
    with CommDebugMode() as comm:
        dist.all_reduce(torch.zeros(3, dtype=torch.float64))
    counts["probe"] = comm.get_total_counts()
    return counts


# -- one process group per rank count runs every case --------------------------------

def suite(rank, world, cases):
    """Run ``cases`` (``(name, function, args)``) in order; a case's error is
    returned as text instead of ending the others."""
    import traceback

    out = {}
    for name, fn, args in cases:
        try:
            out[name] = fn(rank, world, *args)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out
