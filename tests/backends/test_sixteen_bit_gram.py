"""The C++ CPU kernels' 16-bit Gram dot products (csrc/cpu/gram_row_impl.h):
exact float32 products of 16-bit values summed in float64 ("exact16", no
weight decay and a power-of-two sign) or widened products otherwise. Held to
a float64 reference at 1e-12 of ||a|| ||b||, through bfloat16's range edges (an overflowing product recomputed
widened, the documented underflow bound), and to layout invariance on 1-4
ranks: the coefficients of a sharded run equal the single-process ones to
float64 rounding, as tests/integration/test_distributed.py holds the float32 kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks
from torch import nn

import interpolatron
from interpolatron.backends import native_backend
from interpolatron.backends.base import GramArgs

_C = native_backend._C
pytestmark = pytest.mark.skipif(
    _C is None, reason=str(native_backend.unavailable_reason(torch.device("cpu"), torch.float32)))

SIXTEEN = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Around the vector widths and the 8192-element chunk, empty and 1-element tensors.
SIZES = (1, 0, 7, 8191, 8193, 16, 31, 17000, 3)
GAPS = (3, 1, 0, 5, 2, 1, 8, 1, 0)


@pytest.fixture(params=_C.available_cpu_kernels() if _C is not None else ["none"])
def cpu_variant(request):
    before = _C.cpu_kernels()
    assert native_backend.select_cpu_kernels(request.param) == request.param
    yield request.param
    native_backend.select_cpu_kernels(before)


def _layout(sizes=SIZES, gaps=GAPS):
    offsets, col = [], 5
    for n, gap in zip(sizes, gaps):
        offsets.append(col)
        col += n + gap
    return offsets, col


def _reference(params, grads, offsets, ring, count, wd, maximize, scale, store):
    """The kernels' g0 (float32 arithmetic: grad * sign, then + wd * param, each
    rounded) and its dots with the ring's rows, products and sums in float64."""
    sign = torch.tensor((-1.0 if maximize else 1.0) / (1.0 if scale is None else scale)).float()
    g0 = torch.cat([g.float().reshape(-1) * sign for g in grads])
    if wd:
        g0 = g0 + torch.tensor(wd).float() * torch.cat([p.float().reshape(-1) for p in params])
    g0 = g0.double()
    slots = ring.shape[0]
    k = slots if store else slots + 1
    rows = [g0]
    for j in range(1, k):
        row = ring[(count - j) % slots]
        rows.append(torch.cat([row[o:o + p.numel()] for o, p in zip(offsets, params)]).double())
    want = torch.stack([(g0 * r).sum() for r in rows])
    scale_ = torch.stack([g0.norm() * r.norm() for r in rows])
    return want, scale_


def _gram(dtype, k, store, wd, maximize, scale, gen, grads=None, sizes=SIZES, gaps=GAPS):
    offsets, ncols = _layout(sizes, gaps)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    if grads is None:
        grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    slots = k if store else k - 1
    ring = torch.randn(slots, ncols, generator=gen).to(dtype)
    count = 3 * k + 1
    want, size = _reference(params, grads, offsets, ring, count, wd, maximize, scale, store)
    out = torch.full((k,), math.nan, dtype=torch.float64)
    gs = None if scale is None else torch.tensor([scale], dtype=torch.float32)
    assert _C.gram_row(GramArgs(params, grads, offsets, ring, torch.tensor(count), wd, maximize, out, store,
                                grad_scale=gs), None)
    return out, want, size


# (weight decay, maximize, grad scale): exact16 needs no weight decay and a power-of-two scale.
MODES = {"exact16": (0.0, False, None), "exact16-scaled": (0.0, True, 1024.0),
         "widened-wd": (0.01, False, None), "widened-scale3": (0.0, False, 3.0)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("store", [False, True], ids=["read-only", "store"])
@pytest.mark.parametrize("dtype", list(SIXTEEN))
def test_dots_match_a_float64_reference(cpu_variant, dtype, store, mode):
    wd, maximize, scale = MODES[mode]
    gen = torch.Generator().manual_seed(7)
    for k in range(1, 11):
        got, want, size = _gram(SIXTEEN[dtype], k, store, wd, maximize, scale, gen)
        err = (got - want).abs()
        assert (err <= 1e-12 * size).all(), (k, got, want, err / size)


# (tensor, element): the 1-element tensor, a 16-lane vector body, the scalar
# tail of a tensor one short of a chunk, the tail of a second chunk.
WHERE = {"single": (0, 0), "body": (3, 16), "tail": (3, 8185), "chunk2-tail": (7, 16999)}


@pytest.mark.parametrize("where", list(WHERE))
def test_bfloat16_overflowing_products_are_recomputed_exactly(cpu_variant, where):
    """A bfloat16 gradient element of 2^80 overflows the scaled float32
    products: that chunk is recomputed widened, and every dot still meets the
    reference (without the recompute they would be Inf)."""
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES]
    t, i = WHERE[where]
    grads[t][i] = 2.0 ** 80
    for k in (1, 2, 3, 9):
        got, want, size = _gram(torch.bfloat16, k, False, 0.0, False, None, gen, grads=grads)
        assert torch.isfinite(got).all(), got
        assert ((got - want).abs() <= 1e-12 * size).all(), (k, got, want)


def test_bfloat16_tiny_products_stay_within_the_documented_bound(cpu_variant):
    """Products below 2^-190 are rounded to float32's subnormal grid after the
    2^64 scaling: at most 2^-214 each (csrc/cpu/gram_row_impl.h)."""
    gen = torch.Generator().manual_seed(5)
    tiny = [(torch.randn(n, generator=gen) * 2.0 ** -100).to(torch.bfloat16) for n in SIZES]
    got, want, size = _gram(torch.bfloat16, 2, False, 0.0, False, None, gen, grads=tiny)
    n = sum(SIZES)
    assert ((got - want).abs() <= n * 2.0 ** -214 + 1e-12 * size).all(), (got, want)


def test_nonfinite_gradients_give_what_the_widened_products_give(cpu_variant):
    """An Inf or NaN gradient still makes the dots non-finite (the caller then
    falls back), whichever products the chunk took."""
    gen = torch.Generator().manual_seed(2)
    for bad in (math.inf, math.nan):
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SIZES]
        grads[4][100] = bad
        got, _, _ = _gram(torch.bfloat16, 2, False, 0.0, False, None, gen, grads=grads)
        assert not torch.isfinite(got).any(), got


# --------------------------------------------------------------------------- layout invariance

# Large enough for vector bodies, chunk boundaries (9000 > 8192) and uneven shards.
SHAPES = [(40, 41), (17,), (300, 3), (1,), (9000,)]
STEPS = 5
SCALE = 8.0


def _data(dtype):
    gen = torch.Generator().manual_seed(0)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
             for _ in range(STEPS)]
    return x0, grads


def _run(params, grads, wd, amp, to_grad):
    opt = interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=wd, backend="native")
    coefs = []
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = to_grad(gi * SCALE if amp else gi)
        kw = {"grad_scale": torch.tensor([SCALE]), "found_inf": torch.tensor([0.0])} if amp else {}
        opt.step(**kw)
        coefs.append(opt.coefficients.detach().clone())
    return torch.stack(coefs)


def plain(dtype, wd, amp):
    x0, grads = _data(dtype)
    params = [x.clone().requires_grad_() for x in x0]
    coefs = _run(params, grads, wd, amp, lambda g: g.clone())
    return {"coefs": coefs, "params": [p.detach().clone() for p in params]}


def sharded(rank, world, cases):
    """Every case on DTensor shards over ``world`` ranks (Shard(0); the 1-element one replicated)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    place = [[Replicate()] if s == (1,) else [Shard(0)] for s in SHAPES]

    def shard(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, mesh, place[SHAPES.index(tuple(t.shape))], src_data_rank=None)

    out = {}
    for name, (dtype, wd, amp) in cases.items():
        x0, grads = _data(dtype)
        params = [nn.Parameter(shard(x)) for x in x0]
        coefs = _run(params, grads, wd, amp, shard)
        out[name] = {"coefs": coefs, "params": [p.detach().full_tensor() for p in params]}
    return out


CASES = {"bf16-exact16": (torch.bfloat16, 0.0, False), "fp16-exact16-amp": (torch.float16, 0.0, True),
         "bf16-widened": (torch.bfloat16, 0.01, False)}


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sixteen_bit_coefficients_are_layout_invariant(world):
    """The coefficients on 1-4 ranks equal the single-process ones to float64
    rounding (1e-14, as test_distributed.py holds the float32 kernels; a
    float32 accumulation differs by ~1e-7), and so do the parameters to
    their last bit but one."""
    results = run_ranks(sharded, world, CASES, timeout=300)
    for name, args in CASES.items():
        ref = plain(*args)
        eps = torch.finfo(args[0]).eps
        for rank, res in enumerate(results):
            dc = (res[name]["coefs"] - ref["coefs"]).abs().max().item()
            assert dc <= 1e-14, (name, world, rank, dc)
            for got, want in zip(res[name]["params"], ref["params"]):
                diff = (got.double() - want.double()).abs().max().item()
                assert diff <= eps * want.double().abs().max().item(), (name, world, rank, diff)
