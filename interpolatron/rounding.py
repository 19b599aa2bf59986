"""Stochastic rounding of float32 values to bfloat16 / float16: the definition
every backend implements bit for bit (this module is its reference).

A 16-bit value written by ``combine`` with ``sr_seed`` set is one of the two
16-bit neighbours of its float32 value ``x``, the one away from zero with
probability ``(|x| - |t|) / (|n| - |t|)`` (``t`` the neighbour toward zero,
``n`` the next one out), so its expectation is ``x``: updates under half an
ulp survive on average (ALGORITHMS.md section 7). Non-finite values round to
nearest. The random bits are a counter-based hash, no generator state:

.. code-block:: text

    h(v)   = lowbias32(v)     # uint32: v ^= v >> 16; v *= 0x7feb352d; v ^= v >> 15;
                              #         v *= 0x846ca68b; v ^= v >> 16
    key    = h(h(seed ^ stream) + count)     # per op call; count = the bucket's step count
    r(col) = h(h(col) ^ key)                 # col = the element's column in the bucket's rings

all in uint32 arithmetic (``seed``, ``count`` and ``col`` taken mod 2^32),
``stream`` 1 for the parameter and 2 for the gradient ring. Then

* bfloat16: ``bits(x) + (r >> 16)``, its upper 16 bits (a carry out of the
  low half is a round away from zero with exactly that probability);
* float16: away from zero iff ``(r >> 8) * 2^-24 * (|n| - |t|) < |x| - |t|``
  (both sides exact in float32: the neighbours' gap is a power of two).

The same inputs give the same bits on every backend and every run, and a
resumed run draws what the uninterrupted one drew (the count is in the
checkpoint). Every rank of a replicated (DDP) model draws the same bits, so
replicas stay identical; the seed is a setting, 0 unless chosen.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
STREAM_PARAM = 1
STREAM_GRAD = 2
# Elements per chunk of the reference: its int64 temporaries stay a few MiB.
_CHUNK = 1 << 20


def lowbias32_int(v: int) -> int:
    """The hash on a Python int (host side)."""
    v &= MASK32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & MASK32
    return v ^ (v >> 16)


def _mul32(v: Tensor, c: int) -> Tensor:
    # (v * c) mod 2^32 without leaving int64: v < 2^32 times 16-bit halves of c.
    return (v * (c & 0xFFFF) + (((v * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def lowbias32(v: Tensor) -> Tensor:
    """The hash on an int64 tensor of uint32 values."""
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def call_key(seed: int, count: Tensor, stream: int) -> Tensor:
    """``key`` of one op call, a 0-dim int64 tensor on ``count``'s device (no host sync)."""
    salt = lowbias32_int((seed & MASK32) ^ stream)
    return lowbias32(((count.reshape(()).to(torch.int64) & MASK32) + salt) & MASK32)


def random_bits(cols: Tensor, key: Tensor) -> Tensor:
    """``r(col)`` for int64 columns."""
    return lowbias32(lowbias32(cols & MASK32) ^ key)


def _round_bf16(x: Tensor, r: Tensor) -> Tensor:
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    up = (((bits + (r >> 16)) & MASK32) >> 16)
    out = (up - ((up >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # uint16 -> int16 bits
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def _round_fp16(x: Tensor, r: Tensor) -> Tensor:
    nearest = x.to(torch.float16)
    bits = nearest.view(torch.int16)
    ax = x.abs()
    # t: the neighbour toward zero (one magnitude step in from a nearest that rounded out).
    toward = torch.where(nearest.float().abs() > ax, bits - 1, bits)
    away = toward + 1  # the next magnitude out (sign-magnitude bits: +1 on either sign)
    t = toward.view(torch.float16).float().abs()
    gap = away.view(torch.float16).float().abs() - t
    u = (r >> 8).to(torch.float32) * 2.0**-24
    pick = torch.where(u * gap < ax - t, away, toward).view(torch.float16)
    return torch.where(torch.isfinite(x), pick, nearest)


def stochastic_round(values: Tensor, cols: Tensor | None, seed: int, count: Tensor, stream: int,
                     dtype: torch.dtype) -> Tensor:
    """``values`` (float32, flat) rounded stochastically to ``dtype`` (bfloat16 or
    float16). ``cols``: the column of each value (None: ``0, 1, 2, ...``)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stochastic rounding writes bfloat16 or float16, not {dtype}")
    values = values.to(torch.float32)
    out = torch.empty(values.numel(), dtype=dtype, device=values.device)
    key = call_key(seed, count.to(values.device), stream)
    rnd = _round_bf16 if dtype == torch.bfloat16 else _round_fp16
    for start in range(0, values.numel(), _CHUNK):
        stop = min(start + _CHUNK, values.numel())
        c = (torch.arange(start, stop, dtype=torch.int64, device=values.device) if cols is None
             else cols[start:stop])
        out[start:stop] = rnd(values[start:stop], random_bits(c, key))
    return out
