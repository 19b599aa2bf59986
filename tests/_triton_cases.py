"""Shape cases and state builders for the Triton backend tests.

Each case names a bucket layout; :func:`make_bucket` fills it with fresh random
data (the conftest seeds every test), so the torch backend (the oracle) and the
Triton backend can be run on identical copies and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def kernels_interpreted() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def kernel_device() -> str | None:
    """Where the Triton kernels can run in this session: the CPU under the
    interpreter, the GPU when compiled natively, else nowhere."""
    if kernels_interpreted():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    # Indices of the tensors that take part in the op (None: all). A subset
    # leaves holes in the ring's columns: the offsets are not contiguous.
    active: tuple[int, ...] | None = None
    # Extra columns left between consecutive tensors in the ring.
    gap: int = 0

    def __str__(self) -> str:
        return self.name


CASES = (
    Case("odd_sizes", ((37,), (5, 3), (1,), (19,))),
    Case("zero_size", ((0,), (21,), (0, 4), (3,))),
    Case("many_small", tuple((1 + (5 * i) % 9,) for i in range(56))),
    Case("mixed_shapes", ((2, 3, 4), (16,), (7, 1), (33,), (2, 2))),
    Case("subset", ((9,), (20,), (4, 4), (11,), (6,)), active=(1, 3, 4)),
    Case("gaps", ((13,), (32,), (3,)), gap=5),
)
QUICK_CASES = tuple(c for c in CASES if c.name in ("odd_sizes", "subset"))
QUICK_IDS = [c.name for c in QUICK_CASES]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def case_dtype_params() -> list:
    """(case, dtype) pairs for the per-op sweeps. The many-tensor case exercises
    the pointer tables, which do not depend on the dtype: it runs for fp32 and
    bf16 only (it is the slowest case under the interpreter)."""
    import pytest

    return [pytest.param(c, d, id=f"{c.name}-{i}") for c in CASES for d, i in zip(DTYPES, DTYPE_IDS)
            if c.name != "many_small" or d in (torch.float32, torch.bfloat16)]


@dataclass
class Bucket:
    params: list[Tensor]
    grads: list[Tensor]
    offsets: list[int]
    n: int  # ring columns (all tensors of the layout, active or not)
    dtype: torch.dtype
    device: str

    def ring(self, slots: int, poison_slot: int | None = None) -> Tensor:
        r = torch.randn(slots, self.n, device=self.device).to(self.dtype)
        if poison_slot is not None:
            # Only the columns the op owns: the others must keep their values.
            for p, off in zip(self.params, self.offsets):
                r[poison_slot, off:off + p.numel()] = float("nan")
        return r


def make_bucket(case: Case, dtype: torch.dtype, device: str) -> Bucket:
    offsets, pos = [], 0
    for shape in case.shapes:
        offsets.append(pos)
        pos += _numel(shape) + case.gap
    active = case.active if case.active is not None else range(len(case.shapes))
    params = [torch.randn(case.shapes[i], device=device).to(dtype) for i in active]
    grads = [torch.randn(case.shapes[i], device=device).to(dtype) for i in active]
    return Bucket(params, grads, [offsets[i] for i in active], pos, dtype, device)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def clones(tensors: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


def nan_like(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.full_like(t, float("nan")) for t in tensors]


def device_scalars(k: int, count: int, device: str, lr: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Random coefficients summing to one, lr and count as the seam has them: on the device."""
    coefs = torch.rand(k, dtype=torch.float64, device=device) + 0.05
    coefs /= coefs.sum()
    return (coefs, torch.tensor(lr, dtype=torch.float64, device=device),
            torch.tensor(count, dtype=torch.int64, device=device))


def tol(dtype: torch.dtype) -> dict:
    """Elementwise tolerance against the oracle. 16-bit results may differ by one
    ulp: summation order differs, and Triton's interpreter truncates fp32 to
    bf16 where torch rounds to nearest even."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


def assert_lists_close(got: list[Tensor], want: list[Tensor], dtype: torch.dtype) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, equal_nan=False, msg=lambda m, i=i: f"tensor {i}: {m}",
                                   **tol(dtype))


def assert_gram_close(got: Tensor, want: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
    """Dot products are compared relative to ``scale[j] = ||a|| ||b_j||`` (the size
    of the products summed), since cancellation makes relative error meaningless."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.isfinite(got).all(), got
    eps = 1e-13 if dtype == torch.float64 else 1e-5
    err = (got - want).abs()
    bound = eps * scale + 1e-30
    assert (err <= bound).all(), (got, want, err / (scale + 1e-30))

