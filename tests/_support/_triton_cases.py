"""Shape cases and state builders for the Triton backend tests.

Each case names a bucket layout; :func:`make_bucket` fills it with fresh random
data (the conftest seeds every test), so the torch backend (the oracle) and the
Triton backend can be run on identical copies and compared.
"""

from __future__ import annotations

import torch
from _bucket_cases import (  # noqa: F401
    CASES,
    Bucket,
    Case,
    assert_dots_close,
    clones,
    device_scalars,
    make_bucket,
    tol,
)
from torch import Tensor


def kernels_interpreted() -> bool:
    """TRITON_INTERPRET as Triton parses it (``triton.knobs`` exists from Triton
    3.4 on; setup.py allows older ones with torch >= 2.4)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        import os

        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_device() -> str | None:
    """Where the Triton kernels can run in this session: the CPU under the
    interpreter, the GPU when compiled natively, else nowhere."""
    if kernels_interpreted():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


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


def nan_like(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.full_like(t, float("nan")) for t in tensors]


def assert_lists_close(got: list[Tensor], want: list[Tensor], dtype: torch.dtype) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, equal_nan=False, msg=lambda m, i=i: f"tensor {i}: {m}",
                                   **tol(dtype))
