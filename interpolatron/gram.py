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


def ring_gram(rings: Sequence[tuple[Tensor, ...]], ages: int, device: torch.device) -> Tensor:
    """The full Gram of ages ``0..ages-1`` recomputed from rings.

    ``rings`` holds ``(ring, count)`` pairs whose age-0 entry is in slot
    ``count mod S``, or ``(ring, count, columns)`` triples where ``columns``
    (a device index, or None for all) selects the columns that count. Used
    when the set of parameters changes, which makes the incrementally kept
    matrix stale.
    """
    gram = torch.zeros(ages, ages, dtype=torch.float64, device=device)
    for ring, count, *rest in rings:
        columns = rest[0] if rest else None
        slots = torch.remainder(count - torch.arange(ages, device=ring.device), ring.shape[0])
        rows = ring.index_select(0, slots)
        if columns is not None:
            rows = rows.index_select(1, columns)
        rows = rows.to(torch.float64)
        gram += (rows @ rows.T).to(device)
    return gram
