"""Device helpers shared by the kernels: block map lookup, ring slots, block
loads/stores split into unmasked (full) and masked (tail) variants."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slot(count, age, SLOTS: tl.constexpr):
    """Ring slot of the entry of ``age`` while ``count`` entries exist: (count - age) mod SLOTS.
    Written to be non-negative under both C (GPU) and floor (interpreter) modulo."""
    r = (count - age) % SLOTS
    return tl.where(r < 0, r + SLOTS, r)


@triton.jit
def _block_of(blk_tensor, blk_start, numels, cols, BLOCK: tl.constexpr):
    """(tensor index, first element, elements left, first ring column) of this program."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    # Starts are multiples of BLOCK by construction; saying so lets full blocks vectorize.
    start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)
    rem = tl.load(numels + t) - start
    col = tl.load(cols + t) + start
    return t, start, rem, col


@triton.jit
def _tensor_ptr(ptr_row, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Element ``start`` of table tensor ``t``, typed as ``DTYPE``."""
    raw = tl.load(ptr_row + t)
    if ALIGNED:
        raw = tl.multiple_of(raw, 16)
    return raw.to(tl.pointer_type(DTYPE)) + start


@triton.jit
def _ring_ptr(ring, slot, stride, col, ALIGNED: tl.constexpr):
    p = ring + (slot * stride + col)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(ptr, rem, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        v = tl.load(ptr + offs, mask=offs < rem, other=0.0)
    else:
        v = tl.load(ptr + offs)
    return v


@triton.jit
def _st(ptr, value, rem, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < rem)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
