"""The ring layout: where each tensor of a bucket lives in the bucket's flat
ring rows, and in which element order.

Columns. Every tensor's columns start on a 128-byte boundary (ALGORITHMS.md
section 4), and a row's width is a multiple of 128 bytes, so every ring row of
every tensor is aligned for vector loads whatever the sizes before it. The
gaps (under 128 bytes each) hold zeros and are never part of a result
(:func:`padded_offsets`).

Element order: storage order. A parameter that is dense but not contiguous
(channels_last, a transposed weight) is elementwise the same as a contiguous
one laid out along its strides. Every backend stores such a tensor's ring
columns in its storage order, so the fused kernels stream it as
``data_ptr() + i`` like any other, and a tensor paired with it (its gradient,
a snapshot target) is read in the same order. A tensor that is not dense (a
strided slice with gaps) uses the row-major order of ``reshape(-1)``.

``order`` below is the permutation of the dimensions from the outermost
(largest stride) to the innermost; ``None`` means row-major (the identity).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

ALIGN_BYTES = 128


def align_elems(element_size: int) -> int:
    """Elements per alignment unit."""
    return max(1, ALIGN_BYTES // element_size)


def round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def padded_offsets(numels: Sequence[int], element_size: int) -> tuple[list[int], int]:
    """(first column of each tensor, row width) of the padded layout."""
    a = align_elems(element_size)
    offsets, pos = [], 0
    for n in numels:
        pos = round_up(pos, a)
        offsets.append(pos)
        pos += n
    return offsets, round_up(pos, a)


def _order(t: Tensor) -> tuple[int, ...]:
    # Size-1 dimensions may carry any stride; they do not change the order.
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d) if t.shape[d] != 1 else 0, d)))


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory without gaps or overlap
    (contiguous in some order of its dimensions)."""
    return t.is_contiguous() or t.permute(_order(t)).is_contiguous()


def dim_order(t: Tensor) -> tuple[int, ...] | None:
    """The storage order of a dense tensor, ``None`` when it is row-major or not dense."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    order = _order(t)
    if order == tuple(range(t.dim())) or not t.permute(order).is_contiguous():
        return None
    return order


def _inverse(order: tuple[int, ...]) -> list[int]:
    inv = [0] * len(order)
    for j, d in enumerate(order):
        inv[d] = j
    return inv


def flat(t: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``t`` as a vector in ``order`` (a view when ``t`` is laid out that way)."""
    return t.reshape(-1) if order is None else t.permute(order).reshape(-1)


def unflat(v: Tensor, like: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """The vector ``v`` (in ``order``) as a tensor of ``like``'s shape (a view of ``v``)."""
    if order is None:
        return v.view(like.shape)
    return v.view([like.shape[d] for d in order]).permute(_inverse(order))


def ring_view(cols: Tensor, like: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """The ``(S, n)`` ring columns of one tensor as ``(S, *like.shape)``, each slot
    strided like ``like`` when ``order`` is its storage order."""
    slots = cols.shape[0]
    if order is None:
        return cols.view(slots, *like.shape)
    inv = _inverse(order)
    return cols.view(slots, *[like.shape[d] for d in order]).permute(0, *[1 + i for i in inv])
