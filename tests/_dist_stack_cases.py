"""What each rank runs in tests/test_stack_distributed.py (module-level, so
spawned ranks can import it): compiled steps on DTensor shards from the first
step, the process group taken or checked when none is given, and bitwise
resumes on the same layout. Every case is compared with a single-process run
or an uninterrupted one."""

from __future__ import annotations

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
