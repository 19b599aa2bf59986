"""What each rank runs in tests/integration/test_stack_distributed.py (module-level, so
spawned ranks can import it): compiled steps on DTensor shards from the first
step, the process group taken or checked when none is given, and bitwise
resumes on the same layout. Every case is compared with a single-process run
or an uninterrupted one."""

from __future__ import annotations

import functools

import _dist_cases as C
import torch
from torch import nn

import interpolatron


def anderson_dtensor_compiled(rank, world, compile_backend, steps, dtype=torch.float32):
    """Anderson on DTensor shards (C._layout's 1d layout), ``opt.step`` compiled
    with ``fullgraph=True`` from the very first step, and the same run eager."""
    from torch.distributed.tensor import distribute_tensor

    mesh, place = C._layout(world, "1d", "cpu")
    x0, grads = C.global_data(dtype, steps)
    out = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        # (a Replicate placement's local tensor is x itself: clone, the step writes into it)
        params = [nn.Parameter(distribute_tensor(x.clone(), mesh, pl, src_data_rank=None))
                  for x, pl in zip(x0, place)]
        opt = interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend="torch")
        step = opt.step
        if mode == "compiled":
            step = torch.compile(opt.step, backend=compile_backend, fullgraph=True)
        coefs = []
        for g in grads:
            for p, gi, pl in zip(params, g, place):
                p.grad = distribute_tensor(gi, mesh, pl, src_data_rank=None)
            step()
            coefs.append(opt.coefficients.detach().clone())
        out[mode] = {"coefs": torch.stack(coefs), "params": [p.detach().full_tensor() for p in params]}
    return out


# -- item 2: the group taken where it is knowable, checked where it is not ---------------

def zero_auto(rank, world, name, steps):
    """ZeroRedundancyOptimizer with our optimizer class as is (no process_group)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = C.make_model()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=functools.partial(C._optimizer, name))
    coefs = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        C.loss_of(model, step).backward()
        opt.step()
        if hasattr(opt.optim, "coefficients"):
            coefs.append(opt.optim.coefficients.detach().clone())
    return {"params": C.full_params(model), "coefs": torch.stack(coefs) if coefs else None,
            "owned": sum(len(g["params"]) for g in opt.optim.param_groups)}


def fsdp1_auto(rank, world, name, steps, use_orig_params=False):
    """FSDP1 (flat parameters, or their use_orig_params views) without process_group."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(C.make_model(), use_orig_params=use_orig_params,
                                     device_id=torch.device("cpu"))
    opt = C._optimizer(name, model.parameters())
    coefs: list = []
    C.train(model, opt, 0, steps, coefs)
    with FullyShardedDataParallel.summon_full_params(model):
        params = [p.detach().clone() for p in model.module.parameters()]
    return {"params": params, "coefs": torch.stack(coefs) if coefs else None}


def ddp_collectives(rank, world, steps):
    """DDP without process_group: the collectives each optimizer step issues
    (the backward's all-reduces are outside the counted region), and the run."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name in ("interpolatron", "anderson"):
        model = DistributedDataParallel(C.make_model())
        opt = C._optimizer(name, model.parameters())
        counts, coefs = [], []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            C.loss_of(model, step).backward()
            with CommDebugMode() as comm:
                opt.step()
            counts.append(comm.get_total_counts())
            if hasattr(opt, "coefficients"):
                coefs.append(opt.coefficients.detach().clone())
        out[name] = {"counts": counts, "params": C.full_params(model.module),
                     "coefs": torch.stack(coefs) if coefs else None}
    return out


def partitioned_without_group(rank, world, name, process_group=None, diagnostics=False):
    """Whole parameters partitioned over the ranks by hand (plain tensors, the
    default process group initialised), no process_group: the step must not
    fit a per-rank Gram silently."""
    x0, grads = C.global_data(torch.float32, 2)
    mine = [i for i in range(len(C.SHAPES)) if i % world == rank]
    params = [x0[i].clone().requires_grad_() for i in mine]
    if name == "anderson":
        opt = interpolatron.Anderson(params, lr=0.1, history=2, backend="torch", process_group=process_group)
    else:
        opt = interpolatron.Interpolatron(params, lr=0.1, backend="torch", diagnostics=diagnostics,
                                          process_group=process_group)
    for p, i in zip(params, mine):
        p.grad = grads[0][i].clone()
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except RuntimeError as exc:
        return {"error_text": str(exc), "unchanged": all(torch.equal(p, b) for p, b in zip(params, before)),
                "state": len(opt.state)}
    return {"error_text": None, "params": {i: p.detach().clone() for i, p in zip(mine, params)}}


# -- item 7: copies --------------------------------------------------------------------

def _step_all(pairs, grads):
    """Give each (optimizer, params) the same gradients and step it."""
    for opt, params, make_grad in pairs:
        for p, g in zip(params, grads):
            p.grad = make_grad(g)
        opt.step()


def copies(rank, world, steps):
    """deepcopy and pickle of an Anderson with process_group= (a hand partition)
    and of one over DTensor shards, and deepcopy of the DTensor one's state_dict."""
    import copy
    import pickle

    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    out = {}
    x0, grads = C.global_data(torch.float32, steps)
    mine = [i for i in range(len(C.SHAPES)) if i % world == rank]
    params = [x0[i].clone().requires_grad_() for i in mine]
    opt = interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend="torch",
                                 process_group=dist.group.WORLD)
    plain = lambda g: g.clone()  # noqa: E731
    for t in range(2):
        _step_all([(opt, params, plain)], [grads[t][i] for i in mine])
    twin = copy.deepcopy(opt)
    out["same_group"] = twin.process_group is opt.process_group
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for t in range(2, steps):
        _step_all([(opt, params, plain), (twin, twin_params, plain)], [grads[t][i] for i in mine])
    out["group_copy_bitwise"] = (torch.equal(opt.coefficients, twin.coefficients)
                                 and all(torch.equal(a, b) for a, b in zip(params, twin_params)))
    out["group_copy_moved"] = not all(torch.equal(a, x0[i]) for a, i in zip(twin_params, mine))
    try:
        pickle.dumps(opt)
        out["pickle"] = None
    except TypeError as exc:
        out["pickle"] = str(exc)

    mesh, place = C._layout(world, "1d", "cpu")
    dparams = [nn.Parameter(distribute_tensor(x.clone(), mesh, pl, src_data_rank=None))
               for x, pl in zip(x0, place)]
    dopt = interpolatron.Anderson(dparams, lr=0.1, history=3, weight_decay=0.01, backend="torch")
    shard = lambda pl: lambda g: distribute_tensor(g, mesh, pl, src_data_rank=None)  # noqa: E731
    for t in range(2):
        for p, g, pl in zip(dparams, grads[t], place):
            p.grad = shard(pl)(g)
        dopt.step()
    sd = dopt.state_dict()
    copied = copy.deepcopy(sd)
    hist = sd["state"][1]["x_hist"]
    out["sd_copy_equal"] = all(
        torch.equal(copied["state"][i][k].full_tensor(), sd["state"][i][k].full_tensor())
        for i in sd["state"] for k in ("x_hist", "g_hist"))
    copied["state"][1]["x_hist"].to_local().add_(1.0)  # the copy owns its memory
    out["sd_copy_independent"] = torch.equal(hist.full_tensor(), sd["state"][1]["x_hist"].full_tensor()) and \
        not torch.equal(hist.full_tensor(), copied["state"][1]["x_hist"].full_tensor())
    dtwin = copy.deepcopy(dopt)
    twin_dparams = [p for g in dtwin.param_groups for p in g["params"]]
    # pickle leaves the partial Grams (keyed by the mesh's process groups) out:
    # the unpickled copy rebuilds them from the rings.
    try:
        ptwin = pickle.loads(pickle.dumps(dopt))
        out["dtensor_pickle"] = None
    except Exception as exc:  # reported by the test
        ptwin, out["dtensor_pickle"] = None, f"{type(exc).__name__}: {exc}"
    runs = [(dparams, dopt), (twin_dparams, dtwin)]
    if ptwin is not None:
        runs.append(([p for g in ptwin.param_groups for p in g["params"]], ptwin))
    for t in range(2, steps):
        for ps, o in runs:
            for p, g, pl in zip(ps, grads[t], place):
                p.grad = shard(pl)(g)
            o.step()
    same = lambda ps, o: (torch.equal(dopt.coefficients, o.coefficients)  # noqa: E731
                          and all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(dparams, ps)))
    out["dtensor_copy_bitwise"] = same(*runs[1])
    out["dtensor_pickle_bitwise"] = ptwin is not None and same(*runs[2])
    return out


# -- item 5: sharded Anderson resumes bitwise on the same layout -------------------------

def sharded_resume(rank, world, backend, dtype, steps, save_at, skips):
    """Anderson on DTensor shards (1d layout), uninterrupted and resumed at
    ``save_at`` from ``state_dict()`` without its ``"anderson_partials"`` into
    a new optimizer over new parameter objects of the same layout (the
    partials rebuilt from the rings, as after a distributed checkpoint).
    ``skips``: steps at which some parameters have no gradient (the partial
    Grams are rebuilt)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    # Large enough that float64 sums of products round (C.SHAPES' are exact) and span
    # several column blocks of gram.ring_gram.
    shapes = [(301, 7), (150001,), (5,), (64, 33)]
    mesh = init_device_mesh("cpu", (world,))
    place = [[Replicate()] if i == 2 else [Shard(0)] for i in range(len(shapes))]
    gen = torch.Generator().manual_seed(3)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
             for _ in range(steps)]

    def make(params):
        return interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend=backend)

    def run(params, opt, first, last, coefs):
        for step in range(first, last):
            for i, (p, g, pl) in enumerate(zip(params, grads[step], place)):
                skip = i in skips.get(step, ())
                p.grad = None if skip else distribute_tensor(g, mesh, pl, src_data_rank=None)
            opt.step()
            coefs.append(opt.coefficients.detach().clone())

    out = {}
    for mode in ("straight", "resumed"):
        params = [nn.Parameter(distribute_tensor(x.clone(), mesh, pl, src_data_rank=None))
                  for x, pl in zip(x0, place)]
        opt, coefs = make(params), []
        if mode == "straight":
            run(params, opt, 0, steps, coefs)
        else:
            run(params, opt, 0, save_at, coefs)
            sd = opt.state_dict()
            # Without the carried partial Grams (what a distributed checkpoint
            # holds): each rank rebuilds its own from the rings.
            del sd["anderson_partials"]
            params = [nn.Parameter(p.detach().clone()) for p in params]
            opt = make(params)
            opt.load_state_dict(sd)
            run(params, opt, save_at, steps, coefs)
        out[mode] = {"coefs": torch.stack(coefs), "params": [p.detach().full_tensor() for p in params]}
    return out


# -- item 4: a DCP resume on the same layout is bitwise ---------------------------------

def dcp_load_model_first(rank, world, name, saved_at, steps, path):
    """A fresh FSDP2 model loads its state from the checkpoint first; then the
    fresh optimizer's template (get_optimizer_state_dict initialises it with an
    lr-0 step on zero gradients of the loaded model), its state, and training
    on to ``steps``. Returns whether the initialising step moved the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = C._fsdp2_model()
    opt = C._optimizer(name, model.parameters())
    model_sd = get_model_state_dict(model)
    dcp.load({"model": model_sd}, checkpoint_id=path)
    set_model_state_dict(model, model_sd)
    loaded = C.full_params(model)
    optim_sd = get_optimizer_state_dict(model, opt)
    moved = max((a - b).abs().max().item() for a, b in zip(C.full_params(model), loaded))
    dcp.load({"optim": optim_sd}, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, optim_sd)
    coefs: list = [None] * saved_at
    C.train(model, opt, saved_at, steps, coefs)
    resumed = coefs[saved_at:]
    return {"params": C.full_params(model), "coefs": torch.stack(resumed) if resumed else None,
            "moved": moved}
