"""Deterministic reduction of per-program dot-product partials.

The streaming kernels write one partial per (Gram entry, program) into a
fixed-shape buffer; this kernel sums each row in float64 in a fixed order (one
program per row, a fixed-stride loop, then a fixed tree inside the block), so
the Gram row is bitwise identical run to run. No atomics anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch


@triton.jit
def _reduce_partials_kernel(partials, out, out_stride, nblocks, RBLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    row = partials + j * nblocks
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for s in range(0, nblocks, RBLOCK):
        idx = s + tl.arange(0, RBLOCK)
        acc += tl.load(row + idx, mask=idx < nblocks, other=0.0).to(tl.float64)
    tl.store(out + j * out_stride, tl.sum(acc, axis=0))


def reduce_partials(partials: Tensor, out: Tensor) -> None:
    """``out[j] = sum_b partials[j, b]`` in float64 (``out`` may be strided)."""
    rows, nblocks = partials.shape
    if out.dtype != torch.float64 or out.shape != (rows,):
        raise ValueError(f"the Gram output must be float64 of shape ({rows},), "
                         f"got {out.dtype} {tuple(out.shape)}")
    if rows == 0:
        return
    if nblocks == 0:
        out.zero_()
        return
    _launch.launch(_reduce_partials_kernel, rows, partials, out, out.stride(0), nblocks,
                   num_warps=_launch.REDUCE_WARPS, RBLOCK=_launch.REDUCE_BLOCK)
