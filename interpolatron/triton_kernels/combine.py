"""The fused interpolation step (Interpolatron, and Anderson's second pass).

One launch per bucket. Per element, with ``k`` coefficients::

    x_new = sum_j a_j x(age j) - lr * sum_j a_j g(age j)

reading the parameter (age 0), the gradient (age 0, weight decay and
maximize folded in on the fly), ``k - 1`` stored iterates and ``k - 1`` stored
gradients, and writing the parameter and ring slot ``c mod (k-1)`` of both
rings: 2k reads + 3 writes, the floor of ALGORITHMS.md section 4. The optional
Gram row ``<g(age 0), g(age j)>`` is formed from the registers already loaded.

``lr``, ``coefs`` and ``count`` are read from device memory and the ring slots
are computed from ``count`` in the kernel, so a captured CUDA graph replays
correctly while they change.

With ``sr_seed`` and 16-bit data the specialisation ``SR`` rounds the new
parameter and the stored gradient stochastically (:mod:`.rounding`, after
interpolatron/rounding.py), its random bits drawn from the seed (a runtime
argument: a new seed does not recompile), the ``count`` already loaded and the
element's ring column; the Gram row uses the unrounded gradient.

``MASTER`` (master weights, 16-bit parameters with a float32 ``master`` in the
rings' columns, float32 rings): age 0 of the iterate is read from the master,
the new iterate is written to the master and, rounded (to nearest, or
stochastically with ``SR``), to the parameter, which is not read; the float32
g ring is not rounded. The block is the float32 one, so every per-program dot
partial is the float32 bucket's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from interpolatron.backends.base import check_master

from . import _launch
from ._helpers import _block_of, _inv_scale, _ld, _ring_ptr, _skip_block, _slot, _st, _tensor_ptr
from .reduce import reduce_partials
from .rounding import STREAM_GRAD, STREAM_PARAM, _rne_bf16, _sr_bits, _sr_col_hash, _sr_key, _sr_round

if TYPE_CHECKING:
    from interpolatron.backends.base import CombineArgs


@triton.jit
def _combine_block(ptrs, ntensors, t, start, rem, col, x_hist, g_hist, x_stride, g_stride,
                   coefs, lr, count, wd, grad_scale, partials, nblocks, sr_seed, master,
                   K: tl.constexpr, KP: tl.constexpr, GRAM: tl.constexpr,
                   MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SCALED: tl.constexpr,
                   PDT: tl.constexpr, GDT: tl.constexpr, CD: tl.constexpr,
                   RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
                   SR: tl.constexpr, MASTER: tl.constexpr):
    RH: tl.constexpr = FAST and RING_ALIGNED
    pid = tl.program_id(0)
    c = tl.load(count)
    a = tl.load(coefs).to(CD)
    p = _tensor_ptr(ptrs, t, start, PDT, FAST)
    if MASTER:  # age 0 is the float32 master; the 16-bit parameter is only written
        m = _ring_ptr(master, 0, 0, col, RH)
        x_raw = _ld(m, rem, BLOCK, FAST)
    else:
        x_raw = _ld(p, rem, BLOCK, FAST)
    x = x_raw.to(CD)
    acc_x = a * x
    g = _ld(_tensor_ptr(ptrs + ntensors, t, start, GDT, FAST), rem, BLOCK, FAST).to(CD)
    if SCALED:
        g = g * _inv_scale(grad_scale, CD)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + tl.load(wd).to(CD) * x
    acc_g = a * g
    # D3: products and sums in float64. For k <= 4 every row's products go into
    # one (KP, BLOCK) tile and a single reduction runs after the last load, so
    # no ring load waits behind a reduction's barrier; a longer row (a tile
    # that would not fit the registers) reduces row by row.
    TILE: tl.constexpr = GRAM and KP <= 4
    if GRAM:
        g64 = g.to(tl.float64)
    if TILE:
        rows = tl.arange(0, KP)[:, None]
        tile = tl.where(rows == 0, (g64 * g64)[None, :], 0.0)
    elif GRAM:
        tl.store(partials + pid, tl.sum(g64 * g64, axis=0))
    for j in tl.static_range(1, K):
        aj = tl.load(coefs + j).to(CD)
        xs = _slot(c, j, K - 1)
        acc_x += aj * _ld(_ring_ptr(x_hist, xs, x_stride, col, RH), rem, BLOCK, FAST).to(CD)
        gj = _ld(_ring_ptr(g_hist, xs, g_stride, col, RH), rem, BLOCK, FAST).to(CD)
        acc_g += aj * gj
        if TILE:
            tile += tl.where(rows == j, (g64 * gj.to(tl.float64))[None, :], 0.0)
        elif GRAM:
            tl.store(partials + j * nblocks + pid, tl.sum(g64 * gj.to(tl.float64), axis=0))
    lr_c = tl.load(lr).to(CD)
    x_new = acc_x - lr_c * acc_g
    if MASTER:
        _st(m, x_new, rem, BLOCK, FAST)
        if not SR and PDT == tl.bfloat16:
            # The parameter is the master rounded to nearest even, as the other
            # backends write it; Triton's own cast truncates in its interpreter.
            x_new = _rne_bf16(x_new)
    if SR:
        # The 16-bit writes rounded stochastically (interpolatron/rounding.py):
        # the random bits of the element's ring column, drawn from the seed and
        # the count already loaded. The Gram row above used the unrounded g.
        col_hash = _sr_col_hash(col, BLOCK)
        x_new = _sr_round(x_new, _sr_bits(col_hash, _sr_key(sr_seed, c, STREAM_PARAM)), PDT)
    _st(p, x_new, rem, BLOCK, FAST)
    if K > 1:
        # Slot c mod (k-1) held age k-1, consumed above: the oldest entry is replaced.
        ws = _slot(c, 0, K - 1)
        _st(_ring_ptr(x_hist, ws, x_stride, col, RH), x_raw, rem, BLOCK, FAST)
        if SR and not MASTER:  # a master's g ring is float32: nothing to round
            # Rounded here, after the other stores, not with the parameter: the
            # sm_90 build of k = 4 with GradScaler spilled with both live at once.
            g = _sr_round(g, _sr_bits(col_hash, _sr_key(sr_seed, c, STREAM_GRAD)),
                          g_hist.dtype.element_ty)
        _st(_ring_ptr(g_hist, ws, g_stride, col, RH), g, rem, BLOCK, FAST)
    if TILE:
        r = tl.arange(0, KP)
        tl.store(partials + r * nblocks + pid, tl.sum(tile, axis=1), mask=r < K)


@triton.jit(do_not_specialize=["ntensors", "x_stride", "g_stride", "nblocks", "sr_seed"])
def _combine_kernel(ptrs, numels, cols, flags, blk_tensor, blk_start, ntensors,
                    x_hist, g_hist, x_stride, g_stride, coefs, lr, count, wd, grad_scale, found_inf,
                    partials, nblocks, sr_seed, master,
                    K: tl.constexpr, KP: tl.constexpr, GRAM: tl.constexpr,
                    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, SCALED: tl.constexpr,
                    SKIPPABLE: tl.constexpr,
                    PDT: tl.constexpr, GDT: tl.constexpr, CD: tl.constexpr,
                    RING_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, SR: tl.constexpr,
                    MASTER: tl.constexpr):
    t, start, rem, col, fast = _block_of(blk_tensor, blk_start, numels, cols, flags, BLOCK)
    if SKIPPABLE:
        rem, fast = _skip_block(found_inf, rem, fast)
    if fast:
        _combine_block(ptrs, ntensors, t, start, rem, col, x_hist, g_hist, x_stride, g_stride,
                       coefs, lr, count, wd, grad_scale, partials, nblocks, sr_seed, master, K, KP, GRAM,
                       MAXIMIZE, HAS_WD, SCALED, PDT, GDT, CD, RING_ALIGNED, BLOCK, True, SR, MASTER)
    else:
        _combine_block(ptrs, ntensors, t, start, rem, col, x_hist, g_hist, x_stride, g_stride,
                       coefs, lr, count, wd, grad_scale, partials, nblocks, sr_seed, master, K, KP, GRAM,
                       MAXIMIZE, HAS_WD, SCALED, PDT, GDT, CD, RING_ALIGNED, BLOCK, False, SR, MASTER)


def _sr_seed_arg(seed: int) -> int:
    """The seed mod 2^32 as the int32 of the same bits: every seed passes as one
    argument type, so a new seed neither recompiles nor changes the signature."""
    seed &= 0xFFFFFFFF
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def _ring_arg(ring: Tensor, fallback: Tensor) -> Tensor:
    # A zero-slot ring (k == 1) may have no storage; the kernel never touches it.
    return ring if ring.numel() else fallback


def combine(args: CombineArgs, cache: dict) -> None:
    """Launch the fused step for one bucket (see :meth:`Backend.combine`)."""
    params, grads, offsets, x_hist, g_hist = args.params, args.grads, args.offsets, args.x_hist, args.g_hist
    coefs, lr, count, weight_decay, gram, sr_seed = (args.coefs, args.lr, args.count, args.weight_decay,
                                                     args.gram, args.sr_seed)
    k = coefs.numel()
    if k < 1:
        raise ValueError("combine needs at least one coefficient")
    if x_hist.shape[0] != k - 1 or g_hist.shape[0] != k - 1:
        raise ValueError(f"combine with k={k}: expected {k - 1} x slots and {k - 1} g slots, "
                         f"got {x_hist.shape[0]} and {g_hist.shape[0]}")
    device = x_hist.device
    _launch.check_device_scalars(device, coefs=coefs, lr=lr, count=count)
    grad_scale, found_inf = _launch.amp_scalars(device, args.grad_scale, args.found_inf)
    master = args.master
    check_master(master, x_hist, params)
    dtype = params[0].dtype if params else x_hist.dtype
    # With a master the block is the float32 rings' (the dot partials of a float32 bucket).
    cfg = _launch.settings(dtype if master is None else x_hist.dtype)
    rows = [params, grads]
    modes = ["rw" if master is None else "w", "r"]
    tabs = _launch.tables(cache, "combine", rows, modes, offsets, device, cfg.block, x_hist.dtype)
    tabs.check_ring(x_hist, "x_hist")
    tabs.check_ring(g_hist, "g_hist")
    if tabs.nblocks == 0:
        if gram is not None:
            gram.zero_()
        return
    partials = tabs.partials(k, _launch.PARTIAL_DTYPE) if gram is not None else tabs.buf
    has_wd = weight_decay != 0
    wd = _launch.f64_scalar(cache, "weight_decay", weight_decay, device) if has_wd else lr
    coefs = coefs if coefs.is_contiguous() else coefs.contiguous()
    sr = sr_seed is not None and dtype in (torch.bfloat16, torch.float16)
    xr = _ring_arg(x_hist, tabs.buf)
    gr = _ring_arg(g_hist, xr)
    mr = xr if master is None else master.view(1, -1)
    tabs.stage_in()
    _launch.launch(
        _combine_kernel, tabs.nblocks,
        tabs.ptrs, tabs.numels, tabs.cols, tabs.flags, tabs.blk_tensor, tabs.blk_start, tabs.ntensors,
        xr, gr, x_hist.stride(0), g_hist.stride(0), coefs, lr, count, wd,
        lr if grad_scale is None else grad_scale, lr if found_inf is None else found_inf,
        partials, tabs.nblocks, _sr_seed_arg(sr_seed) if sr else 0, mr,
        num_warps=cfg.num_warps,
        K=k, KP=triton.next_power_of_2(k), GRAM=gram is not None, MAXIMIZE=bool(args.maximize),
        HAS_WD=has_wd, SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None,
        PDT=_launch.tl_dtype(dtype),
        GDT=_launch.tl_dtype(grads[0].dtype if grads else dtype),
        CD=_launch.compute_dtype(dtype),
        RING_ALIGNED=tabs.ring_aligned(x_hist, g_hist, *([] if master is None else [mr])), BLOCK=cfg.block,
        SR=sr, MASTER=master is not None,
    )
    if gram is not None:
        reduce_partials(partials, gram)
    tabs.stage_out()

