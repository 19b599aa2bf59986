"""Bucket layouts shared by the kernel-backend tests (Triton, C++/CUDA).

Each case names a layout of tensors in a flat ring; :func:`make_bucket` fills
it with fresh random data (the conftest seeds every test), so the torch
backend (the oracle) and a fused backend run on identical copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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


@dataclass
class Bucket:
    params: list[Tensor]  # the active tensors
    grads: list[Tensor]
    offsets: list[int]
    n: int  # ring columns (all tensors of the layout, active or not)
    dtype: torch.dtype
    device: str

    def ring(self, slots: int, poison_slot: int | None = None) -> Tensor:
        r = torch.randn(slots, self.n, device=self.device).to(self.dtype)
        if poison_slot is not None:
            self.poison(r, poison_slot)
        return r

    def poison(self, ring: Tensor, slot: int) -> None:
        """NaN in the columns the op owns in ``slot`` (which the op must
        overwrite); the other columns must keep their values."""
        for p, off in zip(self.params, self.offsets):
            ring[slot, off:off + p.numel()] = float("nan")

    def owned(self) -> Tensor:
        """Mask of the ring columns that belong to the active tensors."""
        m = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        for p, off in zip(self.params, self.offsets):
            m[off:off + p.numel()] = True
        return m


def make_bucket(case: Case, dtype: torch.dtype, device: str = "cpu") -> Bucket:
    offsets, pos = [], 0
    for shape in case.shapes:
        offsets.append(pos)
        pos += math.prod(shape) + case.gap
    active = case.active if case.active is not None else range(len(case.shapes))
    params = [torch.randn(case.shapes[i], device=device).to(dtype) for i in active]
    grads = [torch.randn(case.shapes[i], device=device).to(dtype) for i in active]
    return Bucket(params, grads, [offsets[i] for i in active], pos, dtype, device)


def clones(tensors: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


def device_scalars(k: int, count: int, device: str = "cpu", lr: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Random positive coefficients summing to one, lr and count, as the seam
    has them: on the device."""
    coefs = torch.rand(k, dtype=torch.float64, device=device) + 0.05
    coefs /= coefs.sum()
    return (coefs, torch.tensor(lr, dtype=torch.float64, device=device),
            torch.tensor(count, dtype=torch.int64, device=device))


def tol(dtype: torch.dtype) -> dict:
    """Elementwise tolerance of a fused backend against the oracle. 16-bit
    results may land one ulp apart: the summation order differs, and Triton's
    interpreter truncates fp32 to bf16 where torch rounds to nearest even."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


DOT_EPS = 1e-12
"""Dot products agree to this fraction of their scale on every backend and for
every data dtype: each backend multiplies and sums in float64 (ALGORITHMS.md
section 6, D3), so from the same inputs two of them differ only where float64
rounds (measured: under 2e-15 of the scale on the native and Triton kernels).
A float32 accumulation errs by 1e-10 to 1e-7 of it."""


def assert_dots_close(got: Tensor, want: Tensor, scale: Tensor, dtype: torch.dtype, *,
                      weight_decay: float = 0.0) -> None:
    """Dot products (a Gram row) against the oracle's, relative to ``scale[j] =
    ||a|| ||b_j||`` (the size of the products summed: cancellation makes a
    relative error meaningless): at most :data:`DOT_EPS` of it.

    With ``weight_decay`` the inputs themselves may differ: the effective
    gradient ``sign * grad + weight_decay * param`` is formed in the compute
    dtype, where a backend may round it differently (one fused multiply-add or
    two roundings), by at most one ulp per element, which moves a dot by at
    most that ulp times ``sum |g_i o_i| <= scale``. Tests hold D3 with their
    cases without weight decay."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.isfinite(got).all(), got
    err = (got.cpu() - want.cpu()).abs()
    scale = scale.cpu().to(torch.float64)
    eps = DOT_EPS
    if weight_decay:
        eps += torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    worst = (err / (scale + 1e-300)).max().item() if err.numel() else 0.0
    assert (err <= eps * scale + 1e-300).all(), (
        f"{dtype} dots differ by {worst:.3g} of their scale (bound {eps:.3g}): "
        f"got {got.tolist()}, want {want.tolist()}")
