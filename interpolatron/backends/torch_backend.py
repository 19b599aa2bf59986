"""The pure-PyTorch backend: the fallback that runs anywhere and the oracle the
fused backends are tested against.

It works on the bucket as one flat vector (one concatenation of the parameters
and gradients per op), so its cost is a handful of full passes per step, but
it never synchronises with the host: ring slots are computed on the device
from ``count`` and used through ``index_select`` / ``index_copy_``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import compute_dtype


def _columns(tensors: Sequence[Tensor], offsets: Sequence[int], ring: Tensor, cache: dict):
    """None when the tensors cover the ring's columns in order (the usual case),
    else a cached device index of the columns they own."""
    numels = tuple(t.numel() for t in tensors)
    key = ("columns", tuple(offsets), numels)
    if key not in cache:
        pos, contiguous = 0, True
        for off, n in zip(offsets, numels):
            contiguous &= off == pos
            pos += n
        contiguous &= pos == ring.shape[1]
        if contiguous:
            cache[key] = None
        else:
            parts = [torch.arange(off, off + n, dtype=torch.long) for off, n in zip(offsets, numels)]
            cols = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            cache[key] = cols.to(ring.device)
    return cache[key]


def _read(ring: Tensor, cols: Tensor | None, dtype: torch.dtype) -> Tensor:
    rows = ring if cols is None else ring.index_select(1, cols)
    return rows.to(dtype)


def _write_slot(ring: Tensor, cols: Tensor | None, slot: Tensor, values: Tensor) -> None:
    values = values.to(ring.dtype)
    if cols is None:
        ring.index_copy_(0, slot.view(1), values.view(1, -1))
    else:
        ring.index_put_((slot.expand(cols.numel()), cols), values)


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def _effective_grad(params, grads, weight_decay, maximize, dtype, device) -> Tensor:
    g = _flat(grads, dtype, device)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * _flat(params, dtype, device)
    return g


def _scatter_back(targets: Sequence[Tensor], flat: Tensor) -> None:
    if not targets:
        return
    pieces = flat.split([t.numel() for t in targets])
    torch._foreach_copy_(list(targets), [v.view_as(t) for v, t in zip(pieces, targets)])


def _age_slots(count: Tensor, ages: Tensor, slots: int) -> Tensor:
    return torch.remainder(count - ages, slots)


def _slot_weights(coefs: Tensor, count: Tensor, slots: int, first_age: int, dtype) -> Tensor:
    """``w[s]`` = the coefficient of the entry stored in slot ``s``, for a ring whose
    ``slots`` entries have ages ``first_age .. first_age + slots - 1``."""
    s = torch.arange(slots, device=coefs.device)
    age = torch.remainder(count - s - first_age, slots) + first_age
    return coefs.index_select(0, age).to(dtype)


def _dots(new: Tensor, others: Tensor) -> Tensor:
    """``<new, others[j]>`` in float64 (the reference is more exact than any kernel)."""
    return others.to(torch.float64) @ new.to(torch.float64)


class TorchBackend:
    name = "torch"

    def combine(self, params, grads, offsets, x_hist, g_hist, coefs, lr, count,
                weight_decay, maximize, gram, cache) -> None:
        k = coefs.numel()
        dtype = params[0].dtype if params else x_hist.dtype
        cd = compute_dtype(dtype)
        device = x_hist.device
        x = _flat(params, cd, device)
        cx = _columns(params, offsets, x_hist, cache)
        lr_c = lr.to(cd)
        a0 = coefs[0].to(cd)
        xs = _slot_weights(coefs, count, k - 1, 1, cd) @ _read(x_hist, cx, cd) if k > 1 else 0.0
        if grads is not None:
            g = _effective_grad(params, grads, weight_decay, maximize, cd, device)
            gh = _read(g_hist, cx, cd) if k > 1 else None
            gs = _slot_weights(coefs, count, k - 1, 1, cd) @ gh if k > 1 else 0.0
            new = a0 * x + xs - lr_c * (a0 * g + gs)
            if gram is not None:
                row = [(g.to(torch.float64) @ g.to(torch.float64)).view(1)]
                if k > 1:
                    ages = torch.arange(1, k, device=device)
                    row.append(_dots(g, gh.index_select(0, _age_slots(count, ages, k - 1))))
                gram.copy_(torch.cat(row))
            if k > 1:
                slot = torch.remainder(count, k - 1)
                _write_slot(x_hist, cx, slot, x)
                _write_slot(g_hist, cx, slot, g)
        else:
            if gram is not None:
                raise ValueError("combine: gram is only produced when grads are given")
            gh = _read(g_hist, cx, cd)
            gs = _slot_weights(coefs, count, k, 0, cd) @ gh
            new = a0 * x + xs - lr_c * gs
            if k > 1:
                _write_slot(x_hist, cx, torch.remainder(count, k - 1), x)
        _scatter_back(params, new.to(dtype))

    def gram_row(self, params, grads, offsets, g_hist, count, weight_decay, maximize,
                 out, cache) -> None:
        k = g_hist.shape[0]
        device = g_hist.device
        cd = compute_dtype(g_hist.dtype)
        cols = _columns(grads, offsets, g_hist, cache)
        g = _effective_grad(params, grads, weight_decay, maximize, cd, device)
        row = [(g.to(torch.float64) @ g.to(torch.float64)).view(1)]
        if k > 1:
            ages = torch.arange(1, k, device=device)
            older = _read(g_hist, cols, cd).index_select(0, _age_slots(count, ages, k))
            row.append(_dots(g, older))
        out.copy_(torch.cat(row))
        _write_slot(g_hist, cols, torch.remainder(count, k), g)

    def rna_record(self, sources, offsets, window, count, out, cache) -> None:
        slots = window.shape[0]
        device = window.device
        cd = compute_dtype(window.dtype)
        cols = _columns(sources, offsets, window, cache)
        y0 = _flat(sources, cd, device)
        if out is not None and slots > 1:
            ages = torch.arange(1, slots, device=device)
            older = _read(window, cols, cd).index_select(0, _age_slots(count, ages, slots))
            snaps = torch.cat([y0.view(1, -1), older])
            r = snaps[:-1] - snaps[1:]
            out.copy_(_dots(r[0], r))
        _write_slot(window, cols, torch.remainder(count, slots), y0)

    def rna_extrapolate(self, window, offsets, count, coefs, outs, cache) -> None:
        slots = window.shape[0]
        m = coefs.numel()
        cd = compute_dtype(window.dtype)
        cols = _columns(outs, offsets, window, cache)
        ages = torch.arange(m, device=window.device)
        snaps = _read(window, cols, cd).index_select(0, _age_slots(count - 1, ages, slots))
        _scatter_back(outs, (coefs.to(cd) @ snaps).to(window.dtype))


BACKEND = TorchBackend()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None
