"""Which process group holds the rest of the model when a plain-tensor
parameter may be a slice of it and the user passed no ``process_group=``
(ALGORITHMS.md section 6: Anderson's Gram is over the whole model).

* Found where it is knowable: an optimizer built by ``ZeroRedundancyOptimizer``
  (its ``process_group``), FSDP1's flat parameters and their
  ``use_orig_params`` views (the group their ``FlatParamHandle`` shards over).
* Checked where it is not: when a process group with more than one rank is
  initialised, the first step that needs a whole-model dot product checks,
  with one all-reduce, that every rank holds the same parameters (DDP, or a
  single process per model). If they differ, the parameters are slices of one
  model (or different models) and a per-rank Gram would be silently wrong: it
  raises, naming the fix.

``process_group="local"`` says each rank's parameters are its whole model
(independent models per rank): no sum and no check.
"""

from __future__ import annotations

import gc
import math
import sys
from typing import Any

import torch
from torch import Tensor

from ..sharding import LOCAL, collective_device, is_dtensor


def check_process_group(value: Any) -> None:
    if isinstance(value, str) and value != LOCAL:
        raise ValueError(f"process_group must be a ProcessGroup, None (find or check it) or {LOCAL!r} "
                         f"(each rank's parameters are its whole model), got {value!r}")


def zero_group() -> Any:
    """The process group of the ``ZeroRedundancyOptimizer`` that is constructing
    this optimizer (it calls ``optimizer_class(params, **defaults)`` from one of
    its methods), else None."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None:  # never imported: no ZeRO can be calling
        return None
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, module.ZeroRedundancyOptimizer):
            return owner.process_group
        frame = frame.f_back
    return None


def fsdp1_groups(params: list[Tensor]) -> dict[int, Any]:
    """``id(p) -> the process group FSDP1 shards p over`` for the parameters
    FSDP1 flattened (its ``FlatParameter``, or with ``use_orig_params=True`` the
    views of it). A parameter does not point to its handle, so the handles are
    found among the live objects: one scan, when such a parameter is added."""
    wanted = {id(p) for p in params if getattr(p, "_fsdp_flattened", False) and not is_dtensor(p)}
    if not wanted:
        return {}
    try:
        from torch.distributed.fsdp._flat_param import FlatParamHandle
    except ImportError:  # pragma: no cover (a torch without FSDP1)
        return {}
    found: dict[int, Any] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), FlatParamHandle):  # (isinstance fails on dead weak proxies)
            continue
        flat = getattr(obj, "flat_param", None)
        for member in [flat, *(getattr(flat, "_params", None) or ())]:
            if member is not None and id(member) in wanted:
                found[id(member)] = obj.process_group
    return found


def _fingerprint(params: list[Tensor], device: torch.device) -> Tensor:
    """What identical replicas agree on: counts, and float64 sums of the values
    and gradients (non-finite values mapped to finite ones, so that equal
    replicas compare equal)."""
    f64 = torch.float64
    sums = torch.zeros(4, dtype=f64, device=device)
    with torch.no_grad():
        for p in params:
            for i, t in ((0, p), (2, p.grad)):
                if t is None:
                    continue
                v = torch.nan_to_num(t.detach(), nan=0.0, posinf=1.0, neginf=-1.0)
                sums[i] += v.sum(dtype=f64).to(device)
                sums[i + 1] += v.abs().sum(dtype=f64).to(device)
    counts = torch.tensor([len(params), sum(p.numel() for p in params),
                           sum(p.grad is not None for p in params)], dtype=f64, device=device)
    return torch.cat([counts, sums])


def check_same_parameters(name: str, params: list[Tensor]) -> None:
    """Raise unless every rank of the default process group holds the same
    ``params`` (shapes, values and gradients): one all-reduce of a few float64
    values and one host read, once. Every rank sees the same reduced values,
    so all raise or none does."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    device = collective_device(None)
    mine = _fingerprint(params, device)
    both = torch.cat([mine, -mine])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = mine.numel()
    high, low = both[:n].tolist(), (-both[n:]).tolist()
    same = all(h == lo or abs(h - lo) <= 1e-9 * max(abs(h), abs(lo)) for h, lo in zip(high, low))
    if same and all(math.isfinite(v) for v in high + low):
        return
    raise RuntimeError(
        f"{name}: the {dist.get_world_size()} ranks of the default process group hold different "
        f"parameters (per rank: {int(low[0])}-{int(high[0])} tensors, {int(low[1])}-{int(high[1])} "
        f"elements, or different values), and no process_group was given. Anderson's Gram is over the "
        f"whole model, so a per-rank Gram would be wrong. If each rank holds a slice of one model "
        f"(ZeroRedundancyOptimizer, FSDP1 flat parameters, tensor or pipeline parallelism, a hand "
        f"partition), pass process_group=<the group whose ranks hold the other slices>; if each rank "
        f"trains a model of its own, pass process_group={LOCAL!r}. (DTensor/FSDP2 parameters need "
        f"nothing; DDP replicas pass this check.)")
