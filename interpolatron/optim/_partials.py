"""Each rank's partial Gram of sharded Anderson, carried in its checkpoint.

A rank of sharded Anderson keeps, per reduction key, the partial Gram of its
shards (the running sums; the whole model's is their all-reduced sum). A
checkpoint holds the rings, and a partial rebuilt from them equals the
running sums bitwise for float32 and float64 rings; a 16-bit ring without
master weights holds the gradient rounded to 16 bits (to nearest or
stochastically) while the running sums took the float32 effective gradient
the step formed, so its rebuild differs. ``Anderson.state_dict()`` therefore
also writes each rank's partials, with the layout they belong to, as the
top-level entry ``state_dict["anderson_partials"]``: a list of

    {"layout": <this rank's shard layout for the key>,
     "active": <the set of parameters with gradients the partial is for>,
     "gram": <the k x k float64 partial>}

The first step after ``load_state_dict`` uses an entry only where the
layout (rank, process group sizes and ranks, each member's index, shapes,
strides and placement) and the set of parameters with gradients are this
run's, exactly where the uninterrupted run would have kept its own partial;
elsewhere (another layout, a changed set, a checkpoint without the entry)
the partial is rebuilt from the rings as before. So a same-layout resume is
bitwise for every ring dtype, and nothing changes across layouts.

It is a top-level entry, not per-parameter state, because its values differ
from rank to rank: ``torch.distributed.checkpoint`` keeps one copy of a
non-DTensor value for all ranks, and a DTensor (one block per rank) would
have a shape that depends on the rank count, which its planner refuses to
load on another layout ("Size mismatch"), as it refuses a template key that a
checkpoint lacks (every earlier checkpoint). ``get_optimizer_state_dict``
keeps only ``state`` and ``param_groups``, so distributed checkpoints never see
the entry: they reshard as before, and rebuild the partials from the rings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sharding import is_dtensor, local
from ._checkpoint import CheckpointError, load_tensor

PARTIALS_KEY = "anderson_partials"
ENTRY_KEYS = ("layout", "active", "gram")


def _member(p: Tensor, index: int) -> tuple:
    """What fixes which elements of parameter ``index`` this rank holds, and in
    which column order its ring stores them."""
    t = local(p)
    out = (index, str(p.device), str(p.dtype), tuple(p.shape), tuple(t.shape), tuple(t.stride()))
    if is_dtensor(p):
        mesh = p.device_mesh
        coordinate = mesh.get_coordinate()
        out += (tuple(mesh.shape), tuple(coordinate) if coordinate is not None else None,
                tuple(str(pl) for pl in p.placements))
    return out


def layouts(groups: list[dict], state: Mapping, key_of, reductions: list[tuple],
            master_weights: bool) -> dict[tuple, tuple]:
    """Per reduction key (and ``()``, the parameters complete on every rank, when
    some other key exists), this rank's layout of the parameters that have a
    history: what a carried partial must match to be used."""
    import torch.distributed as dist

    members: dict[tuple, list] = {}
    index = 0
    for gi, group in enumerate(groups):
        for p in group["params"]:
            if "x_hist" in state.get(p, {}):
                members.setdefault(key_of(p), []).append((gi,) + _member(p, index))
            index += 1
    out = {}
    # Key (): the parameters complete on every rank (replicated DTensors), summed locally.
    for position, key in enumerate([(), *reductions]):
        if key in members:
            ranks = tuple((dist.get_world_size(g), dist.get_rank(g)) for g in key)
            out[key] = (dist.get_rank(), dist.get_world_size(), position, ranks, master_weights,
                        tuple(members[key]))
    return out


def entry(layout: tuple, active: tuple, gram: Tensor) -> dict[str, Any]:
    return {"layout": layout, "active": active, "gram": gram.detach().clone()}


def _frozen(value: Any, what: str) -> Any:
    """A layout or signature as nested tuples (a serialiser may have made lists),
    or a CheckpointError if it holds anything but numbers, strings and None."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v, what) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"{what} must hold numbers, strings and tuples only, got {type(value).__name__}")


def plan_partials(value: Any, k: int, device: torch.device) -> list[dict] | None:
    """The checkpoint's partials, validated and copied to ``device`` (None: it
    has none). A malformed entry raises CheckpointError before anything changes."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"state_dict[{PARTIALS_KEY!r}] must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        what = f"state_dict[{PARTIALS_KEY!r}][{i}]"
        if not isinstance(item, Mapping) or set(item) != set(ENTRY_KEYS):
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise CheckpointError(f"{what} must be a dict with keys {list(ENTRY_KEYS)}, got {keys}")
        gram = load_tensor(item["gram"], f"{what}['gram']", dtype=torch.float64, device=device, shape=(k, k))
        if not torch.equal(gram, gram.T):
            raise CheckpointError(f"{what}['gram'] is not symmetric")
        out.append({"layout": _frozen(item["layout"], f"{what}['layout']"),
                    "active": _frozen(item["active"], f"{what}['active']"), "gram": gram})
    return out


def take(carried: list[dict], layout: tuple | None, active: tuple) -> Tensor | None:
    """The carried partial for this layout and set of parameters with gradients, if any."""
    if layout is None:
        return None
    for item in carried:
        if item["layout"] == layout and item["active"] == active:
            return item["gram"]
    return None
