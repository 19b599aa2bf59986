"""The one place where per-bucket Gram partials become the optimizer's Gram.

Every backend returns a bucket's partial dot products; the optimizer's ``x``
is the concatenation of all buckets, so the Gram row is their sum. Sharded
(distributed) parameters will all-reduce the summed row here, and only here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def reduce_gram(partials: Sequence[Tensor], device: torch.device) -> Tensor:
    """Sum of the buckets' float64 partials, in bucket order, on ``device``."""
    total = partials[0].to(device, torch.float64, copy=True)
    for part in partials[1:]:
        total += part.to(device, torch.float64)
    return total


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
