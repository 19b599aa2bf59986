"""RNA's window ops: record a snapshot (with the Gram row of snapshot
differences) and extrapolate the weighted sum of the newest snapshots.

Record reads the sources and the ``S - 1`` older snapshots, takes the
differences ``r_j = y(age j) - y(age j + 1)`` elementwise in registers BEFORE
any product (no Gram of raw snapshots: catastrophic cancellation), writes the
per-program partials ``<r_0, r_j>`` (float64 products and sums, D3) and the sources into slot ``c mod S``:
``S + 1`` accesses per element. Slot ``c mod S`` is never read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from . import _launch
from ._helpers import _block_of, _ld, _ring_ptr, _slot, _st, _tensor_ptr
from .reduce import reduce_partials

if TYPE_CHECKING:
    from interpolatron.backends.base import ExtrapArgs, RecordArgs


@triton.jit
def _rna_record_block(ptrs, t, start, rem, col, window, w_stride, count, partials, nblocks,
                      S: tl.constexpr, DIFFS: tl.constexpr, SDT: tl.constexpr, CD: tl.constexpr,
                      RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    RH: tl.constexpr = FAST and RING_ALIGNED
    pid = tl.program_id(0)
    c = tl.load(count)
    y_raw = _ld(_tensor_ptr(ptrs, t, start, SDT, FAST), rem, BLOCK, FAST)
    y0 = y_raw.to(CD)
    if DIFFS:
        prev = _ld(_ring_ptr(window, _slot(c, 1, S), w_stride, col, RH), rem, BLOCK, FAST).to(CD)
        if S > 2:
            nxt = _ld(_ring_ptr(window, _slot(c, 2, S), w_stride, col, RH), rem, BLOCK, FAST)
    _st(_ring_ptr(window, _slot(c, 0, S), w_stride, col, RH), y_raw, rem, BLOCK, FAST)
    if DIFFS:
        # D3: float64 products and sums; the next snapshot is loaded before
        # each reduction (software pipelining), so no load waits on a barrier.
        # r0 stays in the compute dtype and widens per product (a float64 copy
        # of it would spill at the 16-bit block size).
        r0 = y0 - prev
        tl.store(partials + pid, tl.sum(r0.to(tl.float64) * r0.to(tl.float64), axis=0))
        for a in tl.static_range(2, S):
            ya = nxt.to(CD)
            if a + 1 < S:
                nxt = _ld(_ring_ptr(window, _slot(c, a + 1, S), w_stride, col, RH), rem, BLOCK, FAST)
            tl.store(partials + (a - 1) * nblocks + pid,
                     tl.sum(r0.to(tl.float64) * (prev - ya).to(tl.float64), axis=0))
            prev = ya


@triton.jit(do_not_specialize=["w_stride", "nblocks"])
def _rna_record_kernel(ptrs, numels, cols, flags, blk_tensor, blk_start,
                       window, w_stride, count, partials, nblocks,
                       S: tl.constexpr, DIFFS: tl.constexpr, SDT: tl.constexpr, CD: tl.constexpr,
                       RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, rem, col, fast = _block_of(blk_tensor, blk_start, numels, cols, flags, BLOCK)
    if fast:
        _rna_record_block(ptrs, t, start, rem, col, window, w_stride, count, partials, nblocks,
                          S, DIFFS, SDT, CD, RING_ALIGNED, BLOCK, True)
    else:
        _rna_record_block(ptrs, t, start, rem, col, window, w_stride, count, partials, nblocks,
                          S, DIFFS, SDT, CD, RING_ALIGNED, BLOCK, False)


@triton.jit
def _rna_extrapolate_block(ptrs, t, start, rem, col, window, w_stride, count, coefs, m,
                           S: tl.constexpr, ODT: tl.constexpr, CD: tl.constexpr,
                           RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    RH: tl.constexpr = FAST and RING_ALIGNED
    # ``count`` records are done: the newest (age 0) is in slot count - 1.
    # ``m`` (how many snapshots) is a run-time value: the window fills up
    # without a recompilation per size; ages past it are not loaded.
    newest = tl.load(count) - 1
    y0 = _ld(_ring_ptr(window, _slot(newest, 0, S), w_stride, col, RH), rem, BLOCK, FAST)
    acc = tl.load(coefs).to(CD) * y0.to(CD)
    for a in tl.static_range(1, S):
        if a < m:
            ya = _ld(_ring_ptr(window, _slot(newest, a, S), w_stride, col, RH), rem, BLOCK, FAST)
            acc += tl.load(coefs + a).to(CD) * ya.to(CD)
    _st(_tensor_ptr(ptrs, t, start, ODT, FAST), acc, rem, BLOCK, FAST)


@triton.jit(do_not_specialize=["w_stride", "m"])
def _rna_extrapolate_kernel(ptrs, numels, cols, flags, blk_tensor, blk_start,
                            window, w_stride, count, coefs, m,
                            S: tl.constexpr, ODT: tl.constexpr, CD: tl.constexpr,
                            RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, rem, col, fast = _block_of(blk_tensor, blk_start, numels, cols, flags, BLOCK)
    if fast:
        _rna_extrapolate_block(ptrs, t, start, rem, col, window, w_stride, count, coefs, m,
                               S, ODT, CD, RING_ALIGNED, BLOCK, True)
    else:
        _rna_extrapolate_block(ptrs, t, start, rem, col, window, w_stride, count, coefs, m,
                               S, ODT, CD, RING_ALIGNED, BLOCK, False)


def rna_record(args: RecordArgs, cache: dict) -> None:
    """Launch the record pass for one bucket (see :meth:`Backend.rna_record`)."""
    sources, offsets, window, count, out = args.sources, args.offsets, args.window, args.count, args.out
    slots = window.shape[0]
    if slots < 1:
        raise ValueError("rna_record needs a window with at least one slot")
    device = window.device
    _launch.check_device_scalars(device, count=count)
    cfg = _launch.settings(window.dtype, "rna_record")
    tabs = _launch.tables(cache, "rna_record", [sources], ["r"], offsets, device, cfg.block,
                          window.dtype)
    tabs.check_ring(window, "window")
    pdt = _launch.PARTIAL_DTYPE
    if tabs.nblocks == 0:
        if out is not None:
            reduce_partials(tabs.partials(slots - 1, pdt), out)
        return
    diffs = out is not None and slots > 1
    # With one slot there are no differences: the (0, nblocks) buffer only checks ``out``.
    partials = tabs.partials(slots - 1, pdt) if out is not None else tabs.buf
    tabs.stage_in()
    _launch.launch(
        _rna_record_kernel, tabs.nblocks,
        tabs.ptrs, tabs.numels, tabs.cols, tabs.flags, tabs.blk_tensor, tabs.blk_start,
        window, window.stride(0), count, partials, tabs.nblocks,
        num_warps=cfg.num_warps,
        S=slots, DIFFS=diffs, SDT=_launch.tl_dtype(sources[0].dtype),
        CD=_launch.compute_dtype(window.dtype), RING_ALIGNED=tabs.ring_aligned(window),
        BLOCK=cfg.block,
    )
    if out is not None:
        reduce_partials(partials, out)


def rna_extrapolate(args: ExtrapArgs, cache: dict) -> None:
    """Launch the extrapolation for one bucket (see :meth:`Backend.rna_extrapolate`)."""
    window, offsets, count, coefs, outs = args.window, args.offsets, args.count, args.coefs, args.outs
    slots = window.shape[0]
    m = coefs.numel()
    if not 1 <= m <= slots:
        raise ValueError(f"rna_extrapolate needs 1..{slots} coefficients, got {m}")
    device = window.device
    _launch.check_device_scalars(device, count=count, coefs=coefs)
    cfg = _launch.settings(window.dtype)
    tabs = _launch.tables(cache, "rna_extrapolate", [outs], ["w"], offsets, device, cfg.block,
                          window.dtype)
    tabs.check_ring(window, "window")
    if tabs.nblocks == 0:
        return
    coefs = coefs if coefs.is_contiguous() else coefs.contiguous()
    _launch.launch(
        _rna_extrapolate_kernel, tabs.nblocks,
        tabs.ptrs, tabs.numels, tabs.cols, tabs.flags, tabs.blk_tensor, tabs.blk_start,
        window, window.stride(0), count, coefs, m,
        num_warps=cfg.num_warps,
        S=slots, ODT=_launch.tl_dtype(outs[0].dtype),
        CD=_launch.compute_dtype(window.dtype), RING_ALIGNED=tabs.ring_aligned(window),
        BLOCK=cfg.block,
    )
    tabs.stage_out()
