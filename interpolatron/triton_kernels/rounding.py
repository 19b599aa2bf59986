"""Stochastic rounding on the device: the definition of
:mod:`interpolatron.rounding` (its docstring is the specification, its torch
code the reference these helpers match bit for bit), in uint32 arithmetic.

The 16-bit results are built from integer bits and bitcast, never taken from a
float-to-16-bit cast: the rounding mode of that cast is not ours to choose
(round to nearest on the GPU, truncation in Triton's CPU interpreter for
bfloat16). Non-finite values round to nearest: an infinity stays one, a NaN
becomes the quiet NaN with its sign (bfloat16 0x7FC0, float16 0x7E00); the
reference's NaN bits are those of torch's casts, which differ between its CPU
paths and CUDA, so only NaN-ness is common to the backends.
"""

from __future__ import annotations

import triton
import triton.language as tl

STREAM_PARAM: tl.constexpr = tl.constexpr(1)
STREAM_GRAD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _lowbias32(v):
    """The hash of interpolatron.rounding.lowbias32 on uint32 values (wrapping products)."""
    v = v ^ (v >> 16)
    v = v * tl.full(v.shape, 0x7FEB352D, tl.uint32)
    v = v ^ (v >> 15)
    v = v * tl.full(v.shape, 0x846CA68B, tl.uint32)
    return v ^ (v >> 16)


@triton.jit
def _sr_key(seed, count, STREAM: tl.constexpr):
    """``key = h(h(seed ^ stream) + count)`` of one op call. ``seed``: the seed mod
    2^32 passed as its int32 bit pattern; ``count``: the step count loaded on the
    device (int64, taken mod 2^32)."""
    s = seed.to(tl.uint32, bitcast=True) ^ STREAM
    return _lowbias32(_lowbias32(s) + count.to(tl.int64).to(tl.uint32))


@triton.jit
def _sr_col_hash(col, BLOCK: tl.constexpr):
    """``h(col)`` of the block's columns ``col, col + 1, ...`` (int64 ``col``); the
    part of ``r(col)`` the parameter and gradient streams share."""
    cols = col + tl.arange(0, BLOCK).to(tl.int64)
    return _lowbias32(cols.to(tl.uint32))


@triton.jit
def _sr_bits(col_hash, key):
    """``r(col) = h(h(col) ^ key)``."""
    return _lowbias32(col_hash ^ key)


@triton.jit
def _sr_bf16(x, r):
    # bits(x) + (r >> 16), upper half: a carry out of the low half rounds away from zero.
    bits = x.to(tl.uint32, bitcast=True)
    up = (bits + (r >> 16)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(nan, ((bits >> 16) & 0x8000) | 0x7FC0, up)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rne_bf16(x):
    """float32 ``x`` rounded to the NEAREST bfloat16 (ties to even) from its bits,
    as torch's cast: Triton's cast truncates in the CPU interpreter."""
    bits = x.to(tl.uint32, bitcast=True)
    up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(nan, 0x7FC0, up)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _sr_fp16(x, r):
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    e = mag >> 23
    # t: |x| truncated to float16 (the neighbour toward zero), as magnitude bits.
    # Subnormal float16: the significand in units of 2^-24 (a shift of 32 or more
    # would be undefined: clamped, the result is 0 all the same).
    shift = tl.minimum(tl.maximum(126 - e.to(tl.int32), 0), 31).to(tl.uint32)
    sub = ((mag & 0x7FFFFF) | 0x800000) >> shift
    normal = (mag >> 13) - 0x1C000
    t = tl.where(e >= 113, normal, tl.where(e >= 103, sub, 0))
    t = tl.minimum(t, 0x7BFF)  # a finite value beyond the largest float16 saturates (as the reference)
    tf = t.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    nf = (t + 1).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    ax = mag.to(tl.float32, bitcast=True)
    pick = tl.where(u * (nf - tf) < ax - tf, t + 1, t)
    special = tl.where(mag > 0x7F800000, 0x7E00, 0x7C00)
    out = sign | tl.where(e == 255, special, pick)
    return out.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _sr_round(x, r, DT: tl.constexpr):
    """float32 ``x`` rounded stochastically to ``DT`` (bfloat16 or float16) with the
    random bits ``r`` (uint32)."""
    if DT == tl.bfloat16:
        out = _sr_bf16(x.to(tl.float32), r)
    else:
        tl.static_assert(DT == tl.float16, "stochastic rounding writes bfloat16 or float16")
        out = _sr_fp16(x.to(tl.float32), r)
    return out
