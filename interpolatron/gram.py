"""The one place where per-bucket Gram partials become the optimizer's Gram.

Every backend returns a bucket's partial dot products; the optimizer's ``x``
is the concatenation of all buckets, so the Gram row is their sum. Sharded
parameters (:mod:`interpolatron.sharding`) hold only part of ``x`` on each
rank: their partials are summed over the ranks here, and only here, by one
all-reduce (float64, SUM) per reduction key and step, on device tensors
(no host synchronisation).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .sharding import ReductionKey


def all_reduce_sum(t: Tensor, key: ReductionKey) -> Tensor:
    """``t`` summed in place over the ranks of every process group in ``key``."""
    if key:
        import torch.distributed as dist

        for group in key:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def reduce_sharded(parts: dict[ReductionKey, Tensor], reductions: Sequence[ReductionKey],
                   like: Tensor) -> Tensor:
    """The sum over ranks of float64 partials grouped by reduction key.

    ``parts[key]`` is this rank's partial over the parameters with that key
    (the parameters with key ``()`` are complete on every rank and summed
    locally). Every key of ``reductions`` (the same list, in the same order,
    on every rank) is all-reduced once, with zeros where this rank has no
    partial, so every rank issues the same collectives. ``parts`` must be
    float64 tensors shaped like ``like`` and are summed into a new tensor."""
    total = parts[()].clone() if () in parts else torch.zeros_like(like, dtype=torch.float64)
    for key in reductions:
        part = parts.get(key)
        part = part.clone() if part is not None else torch.zeros_like(total)
        total += all_reduce_sum(part, key)
    return total


def reduce_gram(partials: Sequence[Tensor], device: torch.device,
                keys: Sequence[ReductionKey] | None = None,
                reductions: Sequence[ReductionKey] = (), length: int | None = None) -> Tensor:
    """Sum of the buckets' float64 partials, in bucket order, on ``device``.

    With ``keys`` (each partial's reduction key) and ``reductions`` (every key
    of the optimizer, the same on every rank), the partials of sharded
    parameters are also summed over the ranks (:func:`reduce_sharded`); a rank
    without partials passes ``partials=[]`` and the row ``length``, and adds
    zeros. The sum over ranks is the whole model's whatever the layout, to
    float64 rounding."""
    if not reductions:
        total = partials[0].to(device, torch.float64, copy=True)
        for part in partials[1:]:
            total += part.to(device, torch.float64)
        return total
    parts: dict[ReductionKey, Tensor] = {}
    for part, key in zip(partials, keys if keys is not None else [()] * len(partials)):
        part = part.to(device, torch.float64)
        parts[key] = parts[key] + part if key in parts else part.clone()
    like = (next(iter(parts.values())) if parts
            else torch.zeros(length, dtype=torch.float64, device=device))
    return reduce_sharded(parts, reductions, like)


def shift_in_row(gram: Tensor, row: Tensor) -> Tensor:
    """The ``k x k`` Gram of ages ``0..k-1`` after one step: ``row`` (the new
    gradient against ages ``0..k-1``) becomes row/column 0 and the old
    matrix moves one age down (the oldest age drops out)."""
    k = gram.shape[0]
    new = torch.empty_like(gram)
    new[1:, 1:] = gram[: k - 1, : k - 1]
    new[0, :] = row
    new[:, 0] = row
    return new


# Columns per block of the Gram rebuild: its only temporaries are one block
# of the ring in float64 (slots x RING_GRAM_CHUNK x 8 bytes, 1 MiB at 2 slots).
RING_GRAM_CHUNK = 1 << 16


def _merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in spans:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((off, n))
    return out


def ring_gram(rings: Sequence[tuple[Tensor, ...]], ages: int, device: torch.device) -> Tensor:
    """The full Gram of ages ``0..ages-1`` (``ages <= `` the ring's slots)
    recomputed from rings.

    ``rings`` holds ``(ring, count)`` pairs whose age-0 entry is in slot
    ``count mod S``, or ``(ring, count, spans)`` triples where ``spans`` (a
    list of ``(offset, numel)`` column ranges, or None for all) selects the
    columns that count. Used when the set of parameters changes, which makes
    the incrementally kept matrix stale. Works through fixed-size column
    blocks (products exact in float64, sums in float64, a fixed order): no
    ring-sized or gathered temporary, whatever the model's size.
    """
    gram = torch.zeros(ages, ages, dtype=torch.float64, device=device)
    for ring, count, *rest in rings:
        slots = ring.shape[0]
        if slots == 0 or ages == 0:
            continue
        spans = _merged(rest[0] if rest and rest[0] is not None else [(0, ring.shape[1])])
        by_slot = torch.zeros(slots, slots, dtype=torch.float64, device=ring.device)
        for off, n in spans:
            for start in range(off, off + n, RING_GRAM_CHUNK):
                block = ring[:, start:min(start + RING_GRAM_CHUNK, off + n)].to(torch.float64)
                by_slot.addmm_(block, block.T)
        by_slot = by_slot.triu() + by_slot.triu(1).T  # exactly symmetric (a product's halves may round apart)
        order = torch.remainder(count - torch.arange(ages, device=ring.device), slots)
        gram += by_slot.index_select(0, order).index_select(1, order).to(device)
    return gram
