"""The Triton stochastic rounding (interpolatron/triton_kernels/rounding.py) against the
definition's reference (interpolatron/rounding.py), bit for bit, on the inputs
the combine tests do not reach: seeds of 2^31 and more (passed as int32 bits),
counts and columns past 2^32 (taken mod 2^32), values at and beyond the
float16 range, subnormals of both formats, signed zeros and non-finite values
(NaN compared as NaN: torch's own NaN bits differ between its CPU paths and
CUDA). Then a whole combine with such a seed and count.
"""

from __future__ import annotations

import pytest
import torch
from _bucket_cases import CASES, clones, make_bucket
from _triton_cases import kernel_device

from interpolatron import rounding
from interpolatron.backends.base import CombineArgs
from interpolatron.backends.torch_backend import BACKEND as ORACLE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from interpolatron.triton_kernels.combine import _sr_seed_arg  # noqa: E402
from interpolatron.triton_kernels.rounding import _sr_bits, _sr_col_hash, _sr_key, _sr_round  # noqa: E402

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "fp16"]
BLOCK = 128


@triton.jit(do_not_specialize=["seed"])
def _round_kernel(x_ptr, out_ptr, bits_ptr, count, seed, col0, n, DT: tl.constexpr, STREAM: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    r = _sr_bits(_sr_col_hash(col0 + pid * BLOCK, BLOCK), _sr_key(seed, tl.load(count), STREAM))
    tl.store(bits_ptr + offs, r.to(tl.int64), mask=m)
    tl.store(out_ptr + offs, _sr_round(x, r, DT), mask=m)


def _device() -> str:
    dev = kernel_device()
    if dev is None:
        pytest.skip("the Triton kernels cannot run in this session")
    return dev


def _values(device: str) -> torch.Tensor:
    n = 20_000
    x = torch.randn(n) * torch.logspace(-46, 38, n)[torch.randperm(n)]
    specials = [float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 65519.0, 65520.0, -65535.0, -7.0e4, 3.0e38,
                1.0e-40, -1.0e-42, 2.0**-25, 3 * 2.0**-26, -1.5 * 2.0**-14, 2.0**-24, -2.0**-24 * 0.75,
                1.0 - 2.0**-24, -(2.0 - 2.0**-23), 3.3895313892515355e38]
    x[:len(specials)] = torch.tensor(specials)
    nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -8388607, 0x7FC00000], dtype=torch.int32)
    x[len(specials):len(specials) + len(nans)] = nans.view(torch.float32)
    return x.to(device)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("seed, count, stream, col0", [
    (0, 0, 1, 0), (77, 9, 2, 13), (2**31, 5, 1, 7), (2**32 - 1, 2**33 + 5, 2, 2**32 - 77),
    (2**31 - 1, 2**32 - 1, 1, 3 * 2**32 + 1)], ids=["zero", "small", "seed_2_31", "wrap", "max_int32"])
def test_round_matches_reference(dtype, seed, count, stream, col0):
    device = _device()
    x = _values(device)
    n = x.numel()
    out = torch.empty(n, dtype=dtype, device=device)
    bits = torch.empty(n, dtype=torch.int64, device=device)
    cnt = torch.tensor(count, device=device)
    _round_kernel[(triton.cdiv(n, BLOCK),)](x, out, bits, cnt, _sr_seed_arg(seed), col0, n,
                                            DT=getattr(tl, {torch.bfloat16: "bfloat16",
                                                            torch.float16: "float16"}[dtype]),
                                            STREAM=stream, BLOCK=BLOCK)
    cols = torch.arange(col0, col0 + n, device=device)
    assert torch.equal(bits, rounding.random_bits(cols, rounding.call_key(seed, cnt, stream)))
    want = rounding.stochastic_round(x, cols, seed, cnt, stream, dtype)
    nan = x.isnan()
    assert out[nan].isnan().all()
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # Not rounding to nearest: a fair share of the (inexact) values went the other way.
    assert (out[~nan] != x[~nan].to(dtype)).float().mean() > 0.1


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_combine_with_wrapping_seed_and_count(dtype):
    """A whole combine (k = 2, single roundings as in test_stochastic_rounding)
    with a seed above 2^31 and a count past 2^32: the reference's bits."""
    device = _device()
    from interpolatron.ops import _backend

    backend = _backend("triton")
    b = make_bucket(next(c for c in CASES if c.name == "odd_sizes"), dtype, device)
    args = (torch.tensor([0.0, 1.0], dtype=torch.float64, device=device),
            torch.tensor(1.0, dtype=torch.float64, device=device), torch.tensor(2**32 + 6, device=device),
            0.5, False, None, {})

    def run(be, seed):
        params = clones(b.params)
        torch.manual_seed(5)
        x_hist, g_hist = b.ring(1), b.ring(1)
        coefs, lr, count, wd, maximize, gram, cache = args
        be.combine(CombineArgs(params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, wd, maximize,
                               gram, sr_seed=seed), cache)
        return params, x_hist, g_hist

    seed = 2**32 - 3
    got, want, other = run(backend, seed), run(ORACLE, seed), run(ORACLE, seed ^ 1)
    for g, w in zip(got[0] + [got[2]], want[0] + [want[2]]):
        assert torch.equal(g.view(torch.int16), w.view(torch.int16))
    assert torch.equal(got[1], want[1])
    assert not torch.equal(want[2], other[2])  # the seed's bits matter


def test_every_seed_passes_as_one_int32():
    """Triton types an int argument by its value (i32, u32 from 2^31, i64): the
    seed goes as the int32 of its low 32 bits, so every seed has one signature
    and a new seed does not recompile the kernel."""
    for seed in (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, -1):
        arg = _sr_seed_arg(seed)
        assert -2**31 <= arg < 2**31 and arg & 0xFFFFFFFF == seed & 0xFFFFFFFF, seed
