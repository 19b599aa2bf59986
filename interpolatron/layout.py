"""Where each tensor of a bucket lives in the bucket's flat ring rows.

Every tensor's columns start on a 128-byte boundary (ALGORITHMS.md section 4),
and a row's width is a multiple of 128 bytes, so every ring row of every
tensor is aligned for vector loads whatever the sizes before it. The gaps
(under 128 bytes each) hold zeros and are never part of a result.
"""

from __future__ import annotations

from typing import Sequence

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
