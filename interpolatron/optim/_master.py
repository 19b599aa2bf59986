"""Float32 master weights of 16-bit parameters (``master_weights=True``).

The master is optimizer state: a bucket of 16-bit parameters with master
copies holds float32 rings and a flat float32 master buffer in the rings'
columns (:class:`~interpolatron.optim._buckets.Bucket`), and
``state[p]["master"]`` is a view into it (the checkpoint key is unchanged).
The combine kernel of every backend reads the master and the 16-bit gradient
and writes, in its one pass, the new master, the rings and the rounded 16-bit
parameter (:mod:`interpolatron.backends.base`). The parameter's storage is
never swapped: the parameter object, its ``grad_fn``/AccumulateGrad node and
the hooks DDP and FSDP put there stay, and a compiled step sees plain
tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sharding import is_dtensor, local

LOW_PRECISION = (torch.bfloat16, torch.float16)


def has_master(dtype: torch.dtype, master_weights: bool) -> bool:
    """Whether parameters of ``dtype`` keep a float32 master copy."""
    return master_weights and dtype in LOW_PRECISION


def state_dtype(p: Tensor, master_weights: bool) -> torch.dtype:
    """The dtype of ``p``'s rings (float32 for a 16-bit parameter with a master copy)."""
    return torch.float32 if has_master(p.dtype, master_weights) else p.dtype


def local_master(saved: Tensor, p: Tensor) -> Tensor:
    """The local part of a kept or loaded master for ``p``'s shard (a DTensor
    is first laid out like ``p``: a checkpoint may come from another layout)."""
    if not is_dtensor(p):
        return saved.full_tensor() if is_dtensor(saved) else saved
    if not is_dtensor(saved):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved, p.device_mesh, p.placements).to_local()
    if saved.device_mesh != p.device_mesh or tuple(saved.placements) != tuple(p.placements):
        saved = saved.redistribute(p.device_mesh, p.placements)
    return local(saved)


def as_master(view: Tensor, p: Tensor) -> Tensor:
    """A master view (``p``'s local shape) as the parameter's state: for a
    DTensor parameter a DTensor of ``p``'s shape on its mesh, sharded like it
    (sharing ``view``'s memory), so ``state_dict()`` and DCP see the shards."""
    if not is_dtensor(p):
        return view
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
