"""The bucket layout pads each tensor's ring columns to a 128-byte boundary
(ALGORITHMS.md section 4): offsets and widths, and every backend's ops on the
padded layout give the numbers of the compact layout with the gaps untouched
(zero) and never part of a result."""

from __future__ import annotations

import pytest
import torch
from optimizers import backend_params

import interpolatron
from interpolatron.backends import resolve
from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs
from interpolatron.ring import ALIGN_BYTES, padded_offsets

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
SHAPES = [(37,), (5, 3), (0,), (1,), (64,), (19, 2)]


def test_padded_offsets():
    offsets, width = padded_offsets([37, 15, 0, 1, 64], 4)
    assert offsets == [0, 64, 96, 96, 128]
    assert width == 192
    offsets, width = padded_offsets([3, 3], 2)
    assert offsets == [0, 64] and width == 128
    assert padded_offsets([], 4) == ([], 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_buckets_are_aligned(dtype):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    opt = interpolatron.Interpolatron(params, lr=0.1, alphas=(0.5, 0.5), backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (bucket,) = opt._plan.buckets.values()
    es = dtype.itemsize
    for off in bucket.offsets:
        assert (off * es) % ALIGN_BYTES == 0
    assert (bucket.x_hist.shape[1] * es) % ALIGN_BYTES == 0
    assert bucket.x_hist.data_ptr() % 16 == 0


def _compact(numels):
    return [sum(numels[:i]) for i in range(len(numels))], sum(numels)


def _gap_mask(offsets, numels, width):
    mask = torch.ones(width, dtype=torch.bool)
    for off, n in zip(offsets, numels):
        mask[off:off + n] = False
    return mask


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_ops_on_padded_layout_match_compact(backend, dtype):
    """combine (with its Gram row), gram_row, rna_record and rna_extrapolate on
    the padded and the compact layout: the same parameters, the same ring
    entries, the same dots; the gaps stay zero."""
    be = resolve(backend, torch.device("cpu"), dtype)
    torch.manual_seed(0)
    tensors = [torch.randn(s, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, dtype=dtype) for s in SHAPES]
    numels = [t.numel() for t in tensors]
    k = 3
    coefs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    count = torch.tensor(4)
    results = {}
    for name, (offsets, width) in {"padded": padded_offsets(numels, dtype.itemsize),
                                   "compact": _compact(numels)}.items():
        gen = torch.Generator().manual_seed(1)
        rings = []
        for _ in range(3):
            ring = torch.zeros(k - 1, width, dtype=dtype)
            for off, n in zip(offsets, numels):
                ring[:, off:off + n] = torch.randn(k - 1, n, generator=gen).to(dtype)
            rings.append(ring)
        x_hist, g_hist, window = rings
        ps = [t.clone() for t in tensors]
        gram = torch.zeros(k, dtype=torch.float64)
        be.combine(CombineArgs(ps, grads, offsets, x_hist, g_hist, coefs, lr, count, 0.01, False, gram), {})
        row = torch.zeros(k, dtype=torch.float64)
        be.gram_row(GramArgs(ps, grads, offsets, g_hist, count, 0.0, False, row, store=False), {})
        win = torch.zeros(3, width, dtype=dtype)
        win[:2] = window
        res = torch.zeros(2, dtype=torch.float64)
        be.rna_record(RecordArgs(ps, offsets, win, count, res), {})
        outs = [torch.empty_like(t) for t in tensors]
        extrap = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
        be.rna_extrapolate(ExtrapArgs(win, offsets, count + 1, extrap, outs), {})
        gaps = _gap_mask(offsets, numels, width)
        for ring in (x_hist, g_hist, win):
            assert not ring[:, gaps].any(), f"{name}: a gap was written"

        def cols(ring, offsets=offsets):
            return [ring[:, off:off + n] for off, n in zip(offsets, numels)]

        results[name] = (ps, cols(x_hist), cols(g_hist), cols(win), gram, row, res, outs)
    a, b = results["padded"], results["compact"]
    for got, want in zip(a, b):
        if isinstance(got, torch.Tensor):
            # Dots: the partial sums are cut at other places (float rounding only).
            torch.testing.assert_close(got, want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
        else:
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
