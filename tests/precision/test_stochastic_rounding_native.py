"""Stochastic rounding inside the native kernels (``csrc/stochastic_rounding.h``):
every CPU instruction-set variant, and the CUDA kernels where a GPU is present,
write BITWISE the bits of the torch reference (:mod:`interpolatron.rounding`).

The float32 values are made by single roundings of exact products (one
coefficient 1, the others 0, lr 1, weight decay 0.5, a power-of-two loss
scale), so any two correct kernels agree on them whatever their contraction or
summation order, and the stochastic bits must then agree exactly. The layout
has several chunks per tensor (chunk boundaries inside a tensor), a short
tensor (the scalar tail), gaps between tensors (ring columns that are not
element indices), values that overflow float16, subnormals, infinities and NaN,
a step count past 2**32 and the largest seed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from interpolatron import rounding
from interpolatron.backends import native_backend
from interpolatron.backends.base import CombineArgs
from interpolatron.backends.native_backend import BACKEND as NATIVE
from interpolatron.backends.torch_backend import BACKEND as ORACLE

_C = native_backend._C
pytestmark = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "fp16"]
# (numel, ring offset): two CPU chunks and a bit (8192 elements each), a tail
# shorter than one vector step, and a tensor after a gap; the columns of the
# second and third tensors are not their element indices.
LAYOUT = ((8192 * 2 + 1000, 64), (45, 8192 * 2 + 1100), (300, 8192 * 2 + 1200))
WIDTH = 8192 * 2 + 1600


@contextlib.contextmanager
def cpu_kernels(name: str):
    before = _C.cpu_kernels()
    assert native_backend.select_cpu_kernels(name) == name
    try:
        yield
    finally:
        native_backend.select_cpu_kernels(before)


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _wide(shape, dtype: torch.dtype, limit: float) -> torch.Tensor:
    """Random values over many binades (subnormals of both 16-bit formats
    included), below ``limit`` in magnitude."""
    mag = torch.pow(10.0, torch.empty(shape).uniform_(-9.5, 4.6))
    return (torch.randn(shape) * mag).clamp(-limit, limit).to(dtype)


def _bucket(dtype: torch.dtype, k: int, special: bool):
    # float16 inputs stay finite (an infinite parameter makes 0 * x a NaN
    # everywhere); their differences still overflow float16's largest value.
    limit = 4.0e4 if dtype == torch.float16 else 1.0e6
    params = [_wide((n,), dtype, limit) for n, _ in LAYOUT]
    grads = [_wide((n,), dtype, limit) for n, _ in LAYOUT]
    rings = [_wide((max(k - 1, 0), WIDTH), dtype, limit) for _ in range(2)]
    if special and k > 1:
        x_hist, g_hist = rings
        off = LAYOUT[0][1]
        x_hist[:, off:off + 4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
        g_hist[:, off + 4:off + 8] = torch.tensor([float("inf"), float("nan"), -0.0, 1.0])
        grads[1][:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    return params, grads, [off for _, off in LAYOUT], rings


def _run(backend, bucket, k: int, age: int, count: int, seed: int, gram: bool, device: str = "cpu"):
    params, grads, offsets, (x_hist, g_hist) = bucket
    params = [p.clone().to(device) for p in params]
    grads = [g.to(device) for g in grads]
    x_hist, g_hist = x_hist.clone().to(device), g_hist.clone().to(device)
    coefs = torch.zeros(k, dtype=torch.float64, device=device)
    coefs[age] = 1.0
    out = torch.empty(k, dtype=torch.float64, device=device) if gram else None
    backend.combine(CombineArgs(params, grads, offsets, x_hist, g_hist, coefs,
                                torch.tensor(1.0, dtype=torch.float64, device=device),
                                torch.tensor(count, device=device), 0.5, False, out,
                                grad_scale=torch.tensor([4.0], device=device), sr_seed=seed), {})
    return [t.cpu() for t in params + [x_hist, g_hist]]


def _assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        nan = w.isnan()
        assert torch.equal(g.isnan(), nan), i
        gb, wb = g.view(torch.int16), w.view(torch.int16)
        bad = (gb != wb) & ~nan
        assert not bad.any(), (i, int(bad.sum()), g[bad][:5].tolist(), w[bad][:5].tolist())


CASES = [  # (k, age of the coefficient 1, gram)
    (1, 0, False), (1, 0, True),      # SGD: no ring, the parameter stream only
    (2, 1, False), (2, 0, True),      # k fixed at compile time, with and without the fused Gram row
    (3, 2, True),
    (5, 3, False), (5, 4, True),      # k at run time
    (10, 6, True),                    # a Gram row longer than one register group: a separate dot pass
]
CASE_IDS = [f"k{k}-age{a}-{'gram' if g else 'nogram'}" for k, a, g in CASES]


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("k,age,gram", CASES, ids=CASE_IDS)
def test_every_cpu_variant_writes_the_reference_bits(dtype, k, age, gram):
    bucket = _bucket(dtype, k, special=True)
    args = (k, age, 2**32 + 9, 2**32 - 1, gram)
    want = _run(ORACLE, bucket, *args)
    # Stochastic, not nearest: a fair share of the parameters went the other way.
    nearest = _run(ORACLE, bucket, k, age, 2**32 + 9, None, gram)
    assert (want[0] != nearest[0]).float().mean() > 0.05
    for name in _C.available_cpu_kernels():
        with cpu_kernels(name):
            _assert_same_bits(_run(NATIVE, bucket, *args), want)
            with num_threads(1):  # the bits depend on the column, never on the thread split
                _assert_same_bits(_run(NATIVE, bucket, *args), want)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_count_seed_and_stream_select_the_bits(dtype):
    """The kernels take the count (mod 2**32, read from the tensor), the seed and
    the stream exactly as the definition does: each changes the bits, and
    count + 2**32 does not."""
    bucket = _bucket(dtype, 2, special=False)
    base = _run(NATIVE, bucket, 2, 1, 5, 3, False)
    _assert_same_bits(_run(NATIVE, bucket, 2, 1, 5 + 2**32, 3, False), base)
    _assert_same_bits(_run(NATIVE, bucket, 2, 1, 5, 3 + 2**32, False), base)  # the seed mod 2**32 as well
    for other in (_run(NATIVE, bucket, 2, 1, 6, 3, False), _run(NATIVE, bucket, 2, 1, 5, 4, False)):
        assert not torch.equal(other[0].view(torch.int16), base[0].view(torch.int16))
    # The gradient slot draws from stream 2: its bits are the definition's for
    # the effective gradient at the ring columns.
    params, grads, offsets, _ = bucket
    slot = 5 % 1
    for (n, off), grad, param in zip(LAYOUT, grads, params):
        g = grad.float() * 0.25 + 0.5 * param.float()
        cols = torch.arange(off, off + n)
        want = rounding.stochastic_round(g, cols, 3, torch.tensor(5), rounding.STREAM_GRAD, dtype)
        assert torch.equal(base[-1][slot, off:off + n].view(torch.int16), want.view(torch.int16))


def test_wide_dtypes_and_no_seed_keep_the_nearest_kernels():
    """sr_seed=None writes exactly the round-to-nearest bits (the kernels without
    rounding), and float32 ignores a seed."""
    bucket = _bucket(torch.bfloat16, 2, special=False)
    _assert_same_bits(_run(NATIVE, bucket, 2, 1, 3, None, True), _run(ORACLE, bucket, 2, 1, 3, None, True))
    bucket = _bucket(torch.float32, 2, special=False)
    for g, w in zip(_run(NATIVE, bucket, 2, 1, 3, 7, True), _run(NATIVE, bucket, 2, 1, 3, None, True)):
        assert torch.equal(g, w)


def test_the_extension_takes_any_int_seed_mod_2_32():
    """The extension reads ``sr_seed`` off the argument object and takes it mod
    2^32, as interpolatron.rounding does: a negative seed or one past 32 bits
    writes the bits of its residue, and those of the reference."""
    bucket = _bucket(torch.bfloat16, 2, special=False)
    for seed, residue in ((-1, 2**32 - 1), (2**64 + 5, 5)):
        got = _run(NATIVE, bucket, 2, 1, 3, seed, True)
        _assert_same_bits(got, _run(NATIVE, bucket, 2, 1, 3, residue, True))
        _assert_same_bits(got, _run(ORACLE, bucket, 2, 1, 3, seed, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("k,age,gram", CASES, ids=CASE_IDS)
def test_cuda_writes_the_reference_bits(dtype, k, age, gram):
    """The CUDA combine kernels (vector and tail paths, k fixed and at run
    time) against the reference computed on the CPU; the count is read by the
    kernel on the device."""
    why = native_backend.unavailable_reason(torch.device("cuda"), dtype)
    if why:
        pytest.skip(why)
    bucket = _bucket(dtype, k, special=True)
    args = (k, age, 2**32 + 9, 2**32 - 1, gram)
    want = _run(ORACLE, bucket, *args)
    _assert_same_bits(_run(NATIVE, bucket, *args, device="cuda"), want)
    # Misaligned starts (odd ring offsets) take the element path of the kernel.
    params, grads, offsets, rings = bucket
    shifted = (params, grads, [o + 1 for o in offsets], rings)
    _assert_same_bits(_run(NATIVE, shifted, *args, device="cuda"), _run(ORACLE, shifted, *args))
