"""The pure-PyTorch backend: the fallback that runs anywhere and the oracle the
fused backends are tested against.

It works on the bucket as one flat vector (one concatenation of the parameters
and gradients per op, into work buffers kept in the bucket's cache), so its
cost is a handful of full passes per step, but it never synchronises with the
host: ring slots are computed on the device from ``count`` and used through
per-slot weights, ``index_select`` and ``index_copy_``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from .. import rounding
from ..ring import align_elems, dim_order, flat, round_up, unflat
from .base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs, check_master, compute_dtype

# How many column sets a bucket's cache keeps (least recently used dropped):
# a mixture of experts changes the set of parameters with gradients every step,
# and an unbounded cache grew by one index per distinct set.
COLUMN_CACHE_ENTRIES = 4


def _column_layout(tensors: Sequence[Tensor], offsets: Sequence[int], ring: Tensor,
                   cache: dict) -> tuple[Tensor | None, tuple | None]:
    """(columns, splits) of these tensors in the ring, from an LRU of a few sets.

    ``columns`` is None when the tensors cover the ring's columns in order (the
    usual case), else a device index of the columns they own. "In order" allows
    the padding of the bucket layout (:mod:`interpolatron.ring`): each tensor
    starting at the next 128-byte boundary after the previous one, the row
    ending at the next boundary after the last. The flat work buffers then take
    the ring's layout, gaps included: ``splits`` are the sizes of
    ``[gap, tensor, gap, tensor, ..., tail]`` (None without any gap). The gaps
    hold zeros there and in the rings, so they add nothing to a dot and are
    never scattered back."""
    numels = tuple(t.numel() for t in tensors)
    key = (tuple(offsets), numels, ring.shape[1], ring.element_size())
    lru = cache.get("columns")
    if lru is None:
        lru = cache["columns"] = OrderedDict()
    if key in lru:
        lru.move_to_end(key)
        return lru[key]
    a = align_elems(ring.element_size())
    pos, contiguous, pieces = 0, True, []
    for off, n in zip(offsets, numels):
        if off != pos:
            contiguous &= off == round_up(pos, a)
            pieces.append(off - pos)  # a gap
        else:
            pieces.append(0)
        pieces.append(n)
        pos = off + n
    width = ring.shape[1]
    contiguous &= width == pos or width == round_up(pos, a)
    pieces.append(width - pos)
    if contiguous:
        entry = (None, tuple(pieces) if any(pieces[0::2]) else None)
    else:
        parts = [torch.arange(off, off + n, dtype=torch.long) for off, n in zip(offsets, numels)]
        cols = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        entry = (cols.to(ring.device), None)
    lru[key] = entry
    while len(lru) > COLUMN_CACHE_ENTRIES:
        lru.popitem(last=False)
    return entry


def _columns(tensors: Sequence[Tensor], offsets: Sequence[int], ring: Tensor, cache: dict):
    """The column index of :func:`_column_layout` (None: in order)."""
    return _column_layout(tensors, offsets, ring, cache)[0]


def _splits(tensors: Sequence[Tensor], offsets: Sequence[int], ring: Tensor, cache: dict):
    """The gap layout of :func:`_column_layout` (None: no gaps, or an index)."""
    return _column_layout(tensors, offsets, ring, cache)[1]


def _read(ring: Tensor, cols: Tensor | None, dtype: torch.dtype) -> Tensor:
    rows = ring if cols is None else ring.index_select(1, cols)
    return rows.to(dtype)


def _write_slot(ring: Tensor, cols: Tensor | None, slot: Tensor, values: Tensor,
                skip: Tensor | None = None) -> None:
    values = values.to(ring.dtype)
    if skip is not None:  # GradScaler's skipped step: the slot keeps its entry (decided on the device)
        values = torch.where(skip, _read(ring.index_select(0, slot.view(1)), cols, ring.dtype)[0], values)
    if cols is None:
        ring.index_copy_(0, slot.view(1), values.view(1, -1))
    else:
        ring.index_put_((slot.expand(cols.numel()), cols), values)


def _buffer(cache: dict, name: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat work buffer. On the CPU it persists in the bucket's cache: fresh
    allocations of this size page-fault on every step and would dominate the
    step's time. On a GPU the caching allocator makes a transient one free and
    hands the memory back between steps, so nothing is kept."""
    if device.type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    key = ("scratch", name)
    buf = cache.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _zeros(cache: dict | None, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = ("zeros", dtype, device)
    z = cache.get(key) if cache is not None else None
    if z is None or z.numel() < n:
        z = torch.zeros(max(n, 64), dtype=dtype, device=device)
        if cache is not None:
            cache[key] = z
    return z[:n]


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device,
          cache: dict | None = None, name: str = "", splits: tuple | None = None,
          like: Sequence[Tensor] | None = None) -> Tensor:
    """The tensors back to back, or laid out as the ring with zero gaps (``splits``),
    each in the storage order of its ``like`` counterpart (itself by default):
    the ring's column order."""
    n = sum(splits) if splits else sum(t.numel() for t in tensors)
    out = (_buffer(cache, name, n, dtype, device) if cache is not None
           else torch.empty(n, dtype=dtype, device=device))
    if tensors:
        refs = tensors if like is None else like
        pieces = [flat(t, dim_order(r)) for t, r in zip(tensors, refs)]
        if splits:
            zeros = _zeros(cache, max(splits[0::2]), tensors[0].dtype, device)
            gaps = [zeros[:g] for g in splits[0::2]]
            pieces = [piece for pair in zip(gaps, pieces) for piece in pair] + [gaps[-1]]
        if tensors[0].dtype == dtype:
            torch.cat(pieces, out=out)
        else:
            out.copy_(torch.cat(pieces))
    return out


def _inv_scale(grad_scale: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``1 / grad_scale`` formed in float64, in the compute dtype (as GradScaler.unscale_)."""
    if grad_scale is None:
        return None
    return grad_scale.reshape(()).to(torch.float64).reciprocal().to(dtype)


def _skip(found_inf: Tensor | None) -> Tensor | None:
    return None if found_inf is None else found_inf.reshape(()) != 0


def _effective_grad(params, grads, weight_decay, maximize, dtype, device, cache=None, x=None,
                    splits=None, inv_scale=None) -> Tensor:
    """``sign * grad / scale + weight_decay * param``, flat (in a scratch buffer if ``cache``)."""
    g = _flat(grads, dtype, device, cache, "g", splits, like=params if params else None)
    if inv_scale is not None:
        g.mul_(inv_scale)
    if maximize:
        g.neg_()
    if weight_decay != 0:
        g.add_(x if x is not None else _flat(params, dtype, device, splits=splits), alpha=weight_decay)
    return g


# Elements per float64 chunk: on the CPU two chunks (2 MiB) stay in cache
# between their conversion and the dot; on a GPU fewer, larger chunks save launches.
_DOT_CHUNK = {"cpu": 1 << 17}
_DOT_CHUNK_DEVICE = 1 << 22


def _dot64(a: Tensor, b: Tensor, cache: dict | None = None) -> Tensor:
    """``<a, b>`` as a float64 0-dim tensor, accumulated in float64 per element
    (ALGORITHMS.md section 6, decision D3): the product of two float32 (or
    16-bit) values is exact in float64, so the result depends on the order of
    the elements (the layout of shards, the rank count) only at float64
    rounding. The data are converted a chunk at a time into float64 work
    buffers, never copied whole."""
    if a.dtype == torch.float64:
        return torch.dot(a, b)
    n = a.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    chunk = min(n, _DOT_CHUNK.get(a.device.type, _DOT_CHUNK_DEVICE))
    if cache is not None:
        a64 = _buffer(cache, "dot_a", chunk, torch.float64, a.device)
        b64 = _buffer(cache, "dot_b", chunk, torch.float64, a.device)
    else:
        a64 = torch.empty(chunk, dtype=torch.float64, device=a.device)
        b64 = torch.empty(chunk, dtype=torch.float64, device=a.device)
    partials = torch.empty((n + chunk - 1) // chunk, dtype=torch.float64, device=a.device)
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x, y = a64[:m], b64[:m]
        x.copy_(a[start:start + m])
        y.copy_(b[start:start + m])
        torch.dot(x, y, out=partials[i])
    return partials.sum()


def _slot_dots(new: Tensor, ring: Tensor, cache: dict) -> Tensor:
    """``<new, ring[s]>`` for every slot ``s`` (float64, shape ``(S,)``)."""
    if ring.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=new.device)
    return torch.stack([_dot64(new, ring[s], cache) for s in range(ring.shape[0])])


def _scatter_back(targets: Sequence[Tensor], values: Tensor, splits: tuple | None = None) -> None:
    if not targets:
        return
    pieces = values.split(list(splits))[1::2] if splits else values.split([t.numel() for t in targets])
    torch._foreach_copy_(list(targets), [unflat(v, t, dim_order(t))
                                         for v, t in zip(pieces, targets)])


def _age_slots(count: Tensor, ages: Tensor, slots: int) -> Tensor:
    return torch.remainder(count - ages, slots)


def _slot_weights(coefs: Tensor, count: Tensor, slots: int, first_age: int, dtype) -> Tensor:
    """``w[s]`` = the coefficient of the entry stored in slot ``s``, for a ring whose
    ``slots`` entries have ages ``first_age .. first_age + slots - 1``."""
    s = torch.arange(slots, device=coefs.device)
    age = torch.remainder(count - s - first_age, slots) + first_age
    return coefs.index_select(0, age).to(dtype)


class TorchBackend:
    name = "torch"

    def combine(self, args: CombineArgs, cache: dict) -> None:
        params, grads, offsets, coefs, count = args.params, args.grads, args.offsets, args.coefs, args.count
        x_hist, g_hist, gram, sr_seed, master = args.x_hist, args.g_hist, args.gram, args.sr_seed, args.master
        check_master(master, x_hist, params)
        k = coefs.numel()
        dtype = params[0].dtype if params else x_hist.dtype
        cd = compute_dtype(dtype)
        device = x_hist.device
        cx = _columns(params, offsets, x_hist, cache)
        sp = _splits(params, offsets, x_hist, cache)
        if master is None:
            x = _flat(params, cd, device, cache, "x", sp)
        else:  # age 0 is the master (its gaps are zero, as _flat's); the parameters are only written
            x = master if cx is None else master.index_select(0, cx)
        lr_c, a0 = args.lr.to(cd), coefs[0].to(cd)
        new = _buffer(cache, "new", x.numel(), cd, device)
        torch.mul(x, a0, out=new)
        if k > 1:  # + sum over the stored iterates, weighted per slot
            new.addmv_(_read(x_hist, cx, cd).t(), _slot_weights(coefs, count, k - 1, 1, cd))
        step = _buffer(cache, "step", x.numel(), cd, device)
        g = _effective_grad(params, grads, args.weight_decay, args.maximize, cd, device, cache, x, sp,
                            _inv_scale(args.grad_scale, cd))
        skip = _skip(args.found_inf)
        gh = _read(g_hist, cx, cd) if k > 1 else None
        torch.mul(g, a0, out=step)
        if k > 1:
            step.addmv_(gh.t(), _slot_weights(coefs, count, k - 1, 1, cd))
        if gram is not None:
            row = [_dot64(g, g, cache).view(1)]
            if k > 1:
                by_age = _age_slots(count, torch.arange(1, k, device=device), k - 1)
                row.append(_slot_dots(g, gh, cache).index_select(0, by_age))
            gram.copy_(torch.cat(row))
        new.sub_(step.mul_(lr_c))
        if skip is not None:
            torch.where(skip, x, new, out=new)
        stochastic = sr_seed is not None and dtype in (torch.bfloat16, torch.float16)
        if k > 1:  # the oldest slots take the old iterate and gradient, read above
            slot = torch.remainder(count, k - 1)
            _write_slot(x_hist, cx, slot, x, skip)  # x is a value of the ring's dtype already: exact
            if stochastic and master is None:  # a master's g ring is float32: nothing to round
                g = rounding.stochastic_round(g, cx, sr_seed, count, rounding.STREAM_GRAD, dtype)
            _write_slot(g_hist, cx, slot, g, skip)
        if master is not None:
            if cx is None:
                master.copy_(new)
            else:
                master.index_copy_(0, cx, new)
        if stochastic:
            new = rounding.stochastic_round(new, cx, sr_seed, count, rounding.STREAM_PARAM, dtype)
        elif dtype != cd:
            new = new.to(dtype)
        if master is not None and skip is not None:  # a skipped step leaves the parameters as they are
            new = torch.where(skip, _flat(params, dtype, device, splits=sp), new)
        _scatter_back(params, new, sp)

    def gram_row(self, args: GramArgs, cache: dict) -> None:
        params, grads, offsets, g_hist, count, store = (args.params, args.grads, args.offsets, args.g_hist,
                                                         args.count, args.store)
        slots = g_hist.shape[0]
        if store and slots < 1:
            raise ValueError("gram_row with store=True needs a g ring with at least one slot")
        k = slots if store else slots + 1
        device = g_hist.device
        cd = compute_dtype(g_hist.dtype)
        cols = _columns(grads, offsets, g_hist, cache)
        master = args.master
        check_master(master, g_hist, params)
        x = None  # the weight decay reads the parameters, or their masters
        if master is not None and args.weight_decay != 0:
            x = master if cols is None else master.index_select(0, cols)
        g = _effective_grad(params, grads, args.weight_decay, args.maximize, cd, device, cache, x,
                            splits=_splits(grads, offsets, g_hist, cache),
                            inv_scale=_inv_scale(args.grad_scale, cd))
        row = [_dot64(g, g, cache).view(1)]
        if k > 1:
            by_age = _age_slots(count, torch.arange(1, k, device=device), slots)
            row.append(_slot_dots(g, _read(g_hist, cols, cd), cache).index_select(0, by_age))
        args.out.copy_(torch.cat(row))
        if store:
            _write_slot(g_hist, cols, torch.remainder(count, slots), g, _skip(args.found_inf))

    def rna_record(self, args: RecordArgs, cache: dict) -> None:
        sources, offsets, window, count, out = args.sources, args.offsets, args.window, args.count, args.out
        slots = window.shape[0]
        device = window.device
        cd = compute_dtype(window.dtype)
        cols = _columns(sources, offsets, window, cache)
        y0 = _flat(sources, cd, device, cache, "x", _splits(sources, offsets, window, cache))
        if out is not None and slots > 1:
            # One residual at a time (two snapshot rows live), not the whole window.
            def snapshot(age: int) -> Tensor:
                row = window.index_select(0, _age_slots(count, torch.tensor([age], device=device), slots))
                return _read(row, cols, cd)[0]

            older = snapshot(1)
            r0 = y0 - older
            dots = [_dot64(r0, r0, cache)]
            for age in range(1, slots - 1):
                nxt = snapshot(age + 1)
                dots.append(_dot64(r0, older - nxt, cache))
                older = nxt
            out.copy_(torch.stack(dots))
        _write_slot(window, cols, torch.remainder(count, slots), y0)

    def rna_extrapolate(self, args: ExtrapArgs, cache: dict) -> None:
        window, offsets, count, coefs, outs = args.window, args.offsets, args.count, args.coefs, args.outs
        slots = window.shape[0]
        m = coefs.numel()
        cd = compute_dtype(window.dtype)
        cols = _columns(outs, offsets, window, cache)
        ages = torch.arange(m, device=window.device)
        snaps = _read(window, cols, cd).index_select(0, _age_slots(count - 1, ages, slots))
        _scatter_back(outs, (coefs.to(cd) @ snaps).to(window.dtype), _splits(outs, offsets, window, cache))


BACKEND = TorchBackend()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None
