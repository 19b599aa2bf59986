"""What each rank runs in the master-weights distributed tests (module-level,
so spawned processes can import it), and the single-process run they are
compared with.

A bf16 ``nn.Linear`` whose loss is linear in its output, ``sum(c * model(x))``
with ``x`` and ``c`` in {-1, 0, 1}: every gradient is a small integer, exact
in bfloat16 however it is summed, and so is the mean of two ranks' gradients.
Each rank trains on its own batch, so the replicas agree only if the
gradients are averaged at every step (DDP's all-reduce, FSDP1's
reduce-scatter, both hooked on the parameter's AccumulateGrad node); the
single-process run steps on the exact mean of the ranks' gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from optimizers import make
from torch import nn

IN, OUT, BATCH = 5, 7, 2
LR = 0.1


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(IN, OUT).to(torch.bfloat16)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randint(-1, 2, (BATCH, IN), generator=gen).to(torch.bfloat16)
    c = torch.randint(-1, 2, (BATCH, OUT), generator=gen).to(torch.bfloat16)
    return x, c


def loss_of(model, step: int, rank: int) -> torch.Tensor:
    x, c = batch(step, rank)
    return (model(x).float() * c.float()).sum()


def mean_grads(step: int, world: int) -> list[torch.Tensor]:
    """The exact mean over the ranks of their gradients (weight, bias), in bf16."""
    gw = torch.zeros(OUT, IN, dtype=torch.float64)
    gb = torch.zeros(OUT, dtype=torch.float64)
    for r in range(world):
        x, c = batch(step, r)
        gw += c.double().t() @ x.double()
        gb += c.double().sum(0)
    return [(gw / world).to(torch.bfloat16), (gb / world).to(torch.bfloat16)]


def _optimizer(name: str, params, **kw):
    return make(name, params, "torch", lr=LR, master_weights=True, **kw)


def _coefs(opt) -> torch.Tensor | None:
    return opt.coefficients.detach().clone() if hasattr(opt, "coefficients") else None


def _result(params: list[torch.Tensor], coefs: list) -> dict:
    return {"params": [p.detach().clone() for p in params],
            "coefs": torch.stack(coefs) if coefs and coefs[0] is not None else None}


def run_plain(name: str, steps: int, world: int) -> dict:
    """One process, the mean of the ranks' gradients at every step."""
    model = make_model()
    opt = _optimizer(name, model.parameters())
    coefs = []
    for step in range(steps):
        for p, g in zip(model.parameters(), mean_grads(step, world)):
            p.grad = g
        opt.step()
        coefs.append(_coefs(opt))
    out = _result(list(model.parameters()), coefs)
    out["masters"] = [opt.state[p]["master"].clone() for p in model.parameters()]
    return out


def _train(model, opt, steps: int, rank: int) -> list:
    """``steps`` steps on rank ``rank``'s data; the coefficients after each."""
    coefs = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step, rank).backward()
        opt.step()
        coefs.append(_coefs(opt))
    return coefs


def ddp(rank: int, world: int, name: str, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = _optimizer(name, model.parameters())
    coefs = _train(model, opt, steps, rank)
    return _result(list(model.module.parameters()), coefs)


def fsdp1(rank: int, world: int, name: str, steps: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    kw = {"process_group": dist.group.WORLD} if name.startswith("anderson") else {}
    opt = _optimizer(name, model.parameters(), **kw)
    coefs = _train(model, opt, steps, rank)
    with FullyShardedDataParallel.summon_full_params(model):
        return _result(list(model.module.parameters()), coefs)


def fsdp2(rank: int, world: int, name: str, steps: int) -> dict:
    """FSDP2 on a CPU mesh: DTensor shards, their masters DTensors sharded alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = _optimizer(name, model.parameters())
    coefs = _train(model, opt, steps, rank)
    master = opt.state[model.weight]["master"]
    out = _result([p.full_tensor() for p in model.parameters()], coefs)
    out["master_type"] = type(master).__name__
    out["masters"] = [opt.state[p]["master"].full_tensor().clone() for p in model.parameters()]
    return out


def suite(rank: int, world: int, cases: list) -> dict:
    """Run ``cases`` (``(name, function, args)``); an error comes back as text."""
    import traceback

    out = {}
    for case, fn, args in cases:
        try:
            out[case] = fn(rank, world, *args)
        except Exception:
            out[case] = {"error": traceback.format_exc()}
    return out
