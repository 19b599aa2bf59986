"""The Gram row of a new gradient: Anderson's first pass (read-only) and RNA's
gradient record (which also stores the gradient).

One pass over the new gradient (plus the parameter when weight decay is on)
and the stored gradients of ages ``1..k-1``; each program writes its partials
``<g(age 0), g(age j)>`` (float64 products and sums, D3), which
:func:`reduce_partials` sums in float64 in a fixed order. With ``store`` the
ring has ``k`` slots and the gradient goes to slot ``c mod k``; without, the
ring has ``k - 1`` slots holding ages ``1..k-1`` and nothing is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from interpolatron.backends.base import check_master

from . import _launch
from ._helpers import _block_of, _inv_scale, _ld, _ring_ptr, _skip_block, _slot, _st, _tensor_ptr
from .reduce import reduce_partials

if TYPE_CHECKING:
    from interpolatron.backends.base import GramArgs


@triton.jit
def _gram_row_block(ptrs, ntensors, t, start, rem, col, g_hist, g_stride, count, wd, grad_scale, partials,
                    nblocks, master, K: tl.constexpr, SLOTS: tl.constexpr, STORE: tl.constexpr,
                    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SCALED: tl.constexpr,
                    GDT: tl.constexpr, PDT: tl.constexpr, CD: tl.constexpr,
                    RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
                    MASTER: tl.constexpr):
    RH: tl.constexpr = FAST and RING_ALIGNED
    pid = tl.program_id(0)
    c = tl.load(count)
    g = _ld(_tensor_ptr(ptrs, t, start, GDT, FAST), rem, BLOCK, FAST).to(CD)
    # The next ring row is loaded before each reduction (software pipelining):
    # a row's load never waits behind the previous dot's barrier.
    if K > 1:
        gj = _ld(_ring_ptr(g_hist, _slot(c, 1, SLOTS), g_stride, col, RH), rem, BLOCK, FAST)
    if SCALED:
        g = g * _inv_scale(grad_scale, CD)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if MASTER:  # the weight decay of a 16-bit parameter with a master reads the master
            x = _ld(_ring_ptr(master, 0, 0, col, RH), rem, BLOCK, FAST).to(CD)
        else:
            x = _ld(_tensor_ptr(ptrs + ntensors, t, start, PDT, FAST), rem, BLOCK, FAST).to(CD)
        g = g + tl.load(wd).to(CD) * x
    if STORE:
        _st(_ring_ptr(g_hist, _slot(c, 0, SLOTS), g_stride, col, RH), g, rem, BLOCK, FAST)
    # D3: float64 products and sums.
    g64 = g.to(tl.float64)
    tl.store(partials + pid, tl.sum(g64 * g64, axis=0))
    for j in tl.static_range(1, K):
        cur = gj
        if j + 1 < K:
            gj = _ld(_ring_ptr(g_hist, _slot(c, j + 1, SLOTS), g_stride, col, RH), rem, BLOCK, FAST)
        tl.store(partials + j * nblocks + pid, tl.sum(g64 * cur.to(tl.float64), axis=0))


@triton.jit(do_not_specialize=["ntensors", "g_stride", "nblocks"])
def _gram_row_kernel(ptrs, numels, cols, flags, blk_tensor, blk_start, ntensors,
                     g_hist, g_stride, count, wd, grad_scale, found_inf, partials, nblocks, master,
                     K: tl.constexpr, SLOTS: tl.constexpr, STORE: tl.constexpr,
                     MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SCALED: tl.constexpr,
                     SKIPPABLE: tl.constexpr,
                     GDT: tl.constexpr, PDT: tl.constexpr, CD: tl.constexpr,
                     RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MASTER: tl.constexpr):
    t, start, rem, col, fast = _block_of(blk_tensor, blk_start, numels, cols, flags, BLOCK)
    if SKIPPABLE:
        rem, fast = _skip_block(found_inf, rem, fast)
    if fast:
        _gram_row_block(ptrs, ntensors, t, start, rem, col, g_hist, g_stride, count, wd, grad_scale, partials,
                        nblocks, master, K, SLOTS, STORE, MAXIMIZE, HAS_WD, SCALED, GDT, PDT, CD,
                        RING_ALIGNED, BLOCK, True, MASTER)
    else:
        _gram_row_block(ptrs, ntensors, t, start, rem, col, g_hist, g_stride, count, wd, grad_scale, partials,
                        nblocks, master, K, SLOTS, STORE, MAXIMIZE, HAS_WD, SCALED, GDT, PDT, CD,
                        RING_ALIGNED, BLOCK, False, MASTER)


def gram_row(args: GramArgs, cache: dict) -> None:
    """Launch the Gram pass for one bucket (see :meth:`Backend.gram_row`)."""
    params, grads, offsets, g_hist, count = args.params, args.grads, args.offsets, args.g_hist, args.count
    weight_decay, store, out = args.weight_decay, args.store, args.out
    slots = g_hist.shape[0]
    if store and slots < 1:
        raise ValueError("gram_row with store=True needs a g ring with at least one slot")
    k = slots if store else slots + 1
    device = g_hist.device
    _launch.check_device_scalars(device, count=count)
    grad_scale, found_inf = _launch.amp_scalars(device, args.grad_scale, args.found_inf)
    dtype = g_hist.dtype
    cfg = _launch.settings(dtype)
    has_wd = weight_decay != 0
    master = args.master
    check_master(master, g_hist, params)
    # Without weight decay (or with masters) the parameters are not read, so
    # they stay out of the table (and out of its key).
    rows = [grads, params] if has_wd and master is None else [grads]
    mr = g_hist if master is None or not has_wd else master.view(1, -1)
    tabs = _launch.tables(cache, "gram_row", rows, ["r"] * len(rows), offsets, device, cfg.block,
                          g_hist.dtype)
    tabs.check_ring(g_hist, "g_hist")
    if tabs.nblocks == 0:
        reduce_partials(tabs.partials(k, _launch.PARTIAL_DTYPE), out)
        return
    partials = tabs.partials(k, _launch.PARTIAL_DTYPE)
    wd = _launch.f64_scalar(cache, "weight_decay", weight_decay, device) if has_wd else tabs.buf
    tabs.stage_in()
    _launch.launch(
        _gram_row_kernel, tabs.nblocks,
        tabs.ptrs, tabs.numels, tabs.cols, tabs.flags, tabs.blk_tensor, tabs.blk_start, tabs.ntensors,
        g_hist, g_hist.stride(0), count, wd,
        count if grad_scale is None else grad_scale, count if found_inf is None else found_inf,
        partials, tabs.nblocks, mr,
        num_warps=cfg.num_warps,
        K=k, SLOTS=slots, STORE=bool(store), MAXIMIZE=bool(args.maximize), HAS_WD=has_wd,
        SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None,
        GDT=_launch.tl_dtype(grads[0].dtype),
        PDT=_launch.tl_dtype(params[0].dtype if has_wd else grads[0].dtype),
        CD=_launch.compute_dtype(dtype), RING_ALIGNED=tabs.ring_aligned(g_hist, mr), BLOCK=cfg.block,
        MASTER=master is not None and has_wd,
    )
    reduce_partials(partials, out)
