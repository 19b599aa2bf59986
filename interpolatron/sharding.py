"""Sharded parameters: what a tensor's shard is, and over which process groups
its dot products are summed (ALGORITHMS.md section 6).

A parameter is either a plain tensor or a DTensor (FSDP2 ``fully_shard``,
``distribute_tensor``). Elementwise work always runs on the local shard. A dot
product over a parameter is complete on one rank only after summing its
partials over the mesh dimensions that *shard* it; a replicated mesh dimension
holds the same values on every rank, so it is not summed over (it counts
once). Plain tensors are complete unless the optimizer was given a
``process_group`` (FSDP1 flat parameters, ZeroRedundancyOptimizer), which then
holds the other shards.

A *reduction key* is the tuple of process groups a partial is summed over,
``()`` for none. The summing itself happens in :mod:`interpolatron.gram`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.dlpack
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment, misc]

# isinstance(t, ()) is False: no DTensor class, no DTensor. (These run per
# parameter per step: one isinstance, no other call.)
_DTENSOR: tuple = (DTensor,) if DTensor is not None else ()

ReductionKey = tuple


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _DTENSOR)


def local(t: Tensor) -> Tensor:
    """The rank's own elements of ``t`` (``t`` itself for a plain tensor); writes
    into the result land in ``t``."""
    return t._local_tensor if isinstance(t, _DTENSOR) else t


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def reduction_key(p: Tensor, process_group: Any = None) -> ReductionKey:
    """The process groups over which ``p``'s partial dot products are summed."""
    if is_dtensor(p):
        mesh = p.device_mesh
        groups = []
        for dim, placement in enumerate(p.placements):
            if placement.is_partial():
                raise ValueError("interpolatron cannot optimise a parameter with a Partial placement "
                                 "(its local values are not its shard); redistribute it to Shard or "
                                 "Replicate")
            if placement.is_replicate():
                continue
            group = mesh.get_group(dim)
            if _group_size(group) > 1:
                groups.append(group)
        return tuple(groups)
    return group_key(process_group)


# ``process_group="local"``: each rank's parameters are its whole model (no
# sum over ranks, and no check that the ranks hold the same parameters).
LOCAL = "local"


def group_key(process_group: Any) -> ReductionKey:
    """The reduction key of a plain-tensor shard held with others in ``process_group``."""
    if process_group is not None and not isinstance(process_group, str) and _group_size(process_group) > 1:
        return (process_group,)
    return ()


def check_grad_layout(p: Tensor) -> None:
    """A DTensor parameter needs a DTensor gradient laid out like it (its local
    values are then the gradient of the local shard)."""
    g = p.grad
    if not (isinstance(p, _DTENSOR) or isinstance(g, _DTENSOR)):
        return
    if is_dtensor(p) != is_dtensor(g):
        kind = lambda t: "a DTensor" if is_dtensor(t) else "a plain tensor"
        raise RuntimeError(f"the parameter is {kind(p)} but its gradient {kind(g)}")
    if is_dtensor(p) and (g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements)):
        raise RuntimeError(f"the gradient's placements {tuple(g.placements)} on {g.device_mesh} differ "
                           f"from the parameter's {tuple(p.placements)} on {p.device_mesh}; "
                           f"redistribute the gradient first")


def _shifted(placement):
    """The placement of a history ``(S, *shape)`` whose entries are laid out as ``placement``."""
    if placement.is_replicate():
        return placement
    split = getattr(placement, "split_factor", None)
    if split is not None:
        return type(placement)(placement.dim + 1, split_factor=split)
    return type(placement)(placement.dim + 1)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def history_placements(p: Tensor) -> list:
    """The placements of a DTensor parameter's history ``(S, *p.shape)``."""
    return [_shifted(pl) for pl in p.placements]


def as_history(view: Tensor, p: Tensor) -> Tensor:
    """A history view ``(S, *local_shape)`` as the parameter's state: for a
    DTensor parameter a DTensor ``(S, *p.shape)`` on its mesh, sharded like
    it (sharing ``view``'s memory), so ``state_dict()`` and DCP see the shards."""
    if not is_dtensor(p):
        return view
    shape = (view.shape[0],) + tuple(p.shape)
    # A DTensor takes its local tensor's storage offset, and torch cannot
    # deep-copy a DTensor with one (copy.deepcopy(opt.state_dict()) failed:
    # "invalid python storage"): the local tensor is an alias of the view
    # that starts its own storage (DLPack shares the memory, offset 0).
    alias = view
    if view.storage_offset():
        alias = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(view))
    with torch.no_grad():
        return DTensor.from_local(alias, p.device_mesh, history_placements(p),
                                  run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape))


def collective_device(process_group: Any) -> torch.device:
    """Where a rank without parameters puts its zeros for a collective."""
    import torch.distributed as dist

    backend = dist.get_backend(process_group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ReductionKeys:
    """One optimizer's reduction keys: each parameter's, and the list of every
    key a step sums over.

    They are worked out eagerly, on the host: when parameters are added
    (:meth:`add`), after a copy, and by :meth:`refresh` in a step's eager host
    setup when the parameters changed. What the traced part of a compiled step
    reads (:meth:`of`, :meth:`all`) only looks them up: a cache filled while
    Dynamo traces takes another path when its analysis restarts
    (SpeculationLogDivergence: Anderson could not compile its first step).

    A plain parameter's key is the ``process_group``'s, else the ``found``
    group's (a ``ZeroRedundancyOptimizer`` building the optimizer), else, per
    parameter, the group found for it (FSDP1 flat parameters, :meth:`add`).
    Without a DTensor or a parameter whose group was found (``per_param``
    False, the fast path) every parameter shares that one key."""

    def __init__(self, process_group: Any = None, found: Any = None):
        self.process_group = process_group
        self.found = found
        self.per_param = False
        # id(p) -> (p, key): plain parameters whose group was found (FSDP1).
        self.found_keys: dict[int, tuple[Tensor, ReductionKey]] = {}
        self._derive()

    def _derive(self) -> None:
        group = self.process_group if self.process_group is not None else self.found
        self._plain = group_key(group)
        # id(p) -> (p, its key): computed once per parameter, not per parameter per step.
        self._of: dict[int, tuple[Tensor, ReductionKey]] = {}
        self._list: tuple[tuple | None, list[ReductionKey]] = (None, [])

    def add(self, params: list[Tensor], found: dict[int, Any]) -> None:
        """Parameters just added (``reduction_key`` accepted them); ``found``:
        ``id(p) -> the process group found for a plain p``."""
        by_id = {id(p): p for p in params}
        for i, group in found.items():
            self.found_keys[i] = (by_id[i], group_key(group))
        if found or any(is_dtensor(p) for p in params):
            self.per_param = True

    def plain(self) -> ReductionKey:
        """The key of a plain-tensor parameter whose group was not found per parameter."""
        return self._plain

    def of(self, p: Tensor) -> ReductionKey:
        """The process groups ``p``'s dot products are summed over."""
        if not self.per_param:
            return self._plain
        entry = self._of.get(id(p))
        if entry is None or entry[0] is not p:
            found = self.found_keys.get(id(p))
            key = found[1] if found is not None and found[0] is p else (
                reduction_key(p) if is_dtensor(p) else self._plain)
            entry = self._of[id(p)] = (p, key)
        return entry[1]

    def refresh(self, groups: list[dict]) -> None:
        """Work out the keys again if the parameters of ``groups`` changed (host only)."""
        params = tuple(id(p) for g in groups for p in g["params"])
        if self._list[0] == params:
            return
        if not self.per_param:
            keys = [self._plain]
        else:
            # Every parameter's key in parameter order (the same on every rank:
            # collectives are issued in this order), plus the plain key (a ZeRO
            # rank may own no parameter, yet it must join the sum).
            keys = [self.of(p) for g in groups for p in g["params"]] + [self._plain]
        self._list = (params, [k for k in dict.fromkeys(keys) if k])

    def all(self) -> list[ReductionKey]:
        """Every key a step sums over, as of the last :meth:`refresh` (read only)."""
        return self._list[1]

    def live_groups(self) -> list:
        """The process groups referred to: live connections between processes,
        not data (a copy shares them; pickle cannot carry them)."""
        groups = [g for g in (self.process_group, self.found) if g is not None and not isinstance(g, str)]
        for _, key in self.found_keys.values():
            groups.extend(key)
        return groups

    # A copy keeps the settings and the groups found; the keys of its
    # parameters (new objects) are worked out again (:meth:`refresh`).
    def __getstate__(self) -> dict[str, Any]:
        return {"process_group": self.process_group, "found": self.found, "per_param": self.per_param,
                "found_keys": list(self.found_keys.values())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.process_group, self.found = state["process_group"], state["found"]
        self.per_param = state["per_param"]
        self.found_keys = {id(p): (p, key) for p, key in state["found_keys"]}
        self._derive()
