"""Device helpers shared by the kernels: block map lookup, ring slots, block
loads/stores in a fast variant (full block, aligned: unmasked, hinted, so the
compiler emits 128-bit accesses) and a general one (masked, no hints)."""

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
def _block_of(blk_tensor, blk_start, numels, cols, flags, BLOCK: tl.constexpr):
    """(tensor index, first element, elements left, first ring column, fast) of this
    program. ``fast``: a full block of a tensor whose pointers and ring column are
    16-byte aligned, which may use unmasked, vectorized accesses."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    # Starts are multiples of BLOCK by construction; saying so keeps the
    # alignment of the tensor's base for the block.
    start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)
    rem = tl.load(numels + t) - start
    col = tl.load(cols + t) + start
    fast = (rem >= BLOCK) & (tl.load(flags + t) != 0)
    return t, start, rem, col, fast


@triton.jit
def _tensor_ptr(ptr_row, t, start, DTYPE: tl.constexpr, HINT: tl.constexpr):
    """Element ``start`` of table tensor ``t``, typed as ``DTYPE``."""
    p = tl.load(ptr_row + t).to(tl.pointer_type(DTYPE))
    if HINT:
        # Divisibility of a pointer is in bytes; a hint on the int64 before the
        # cast would not survive it.
        p = tl.multiple_of(p, 16)
    return p + start


@triton.jit
def _ring_ptr(ring, slot, stride, col, HINT: tl.constexpr):
    p = ring + (slot * stride + col)
    if HINT:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(ptr, rem, BLOCK: tl.constexpr, FAST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if FAST:
        v = tl.load(ptr + offs)
    else:
        v = tl.load(ptr + offs, mask=offs < rem, other=0.0)
    return v


@triton.jit
def _st(ptr, value, rem, BLOCK: tl.constexpr, FAST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if FAST:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < rem)


@triton.jit
def _skip_block(found_inf, rem, fast):
    """GradScaler's skipped step: a set ``found_inf`` empties the block (no
    element left, the masked path), so no load or store of the data runs."""
    skip = tl.load(found_inf) != 0
    return tl.where(skip, 0, rem), fast & (skip == 0)


@triton.jit
def _inv_scale(grad_scale, CD: tl.constexpr):
    """``1 / grad_scale`` in the compute dtype (from float64: exact for
    GradScaler's power-of-two scales, as in the other backends)."""
    return (1.0 / tl.load(grad_scale).to(tl.float64)).to(CD)
