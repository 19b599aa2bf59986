"""The ``native`` backend (formerly ``cuda``): the C++/CUDA extension ``interpolatron._C`` (built from
``csrc/``), which serves CPU tensors too (multi-threaded, vectorized kernels).

One pass over memory per op, one kernel launch per bucket on CUDA whatever the
number of tensors, no host synchronisation (``lr``, ``coefs`` and ``count`` are
read by the kernels, so a CUDA step can be captured in a graph), and dot
products that are bitwise reproducible run to run (and, on the CPU, whatever
``torch.set_num_threads``).

This module imports without the extension, so that dispatch can say why the
backend is unavailable.
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import SUPPORTED_DTYPES, CombineArgs, ExtrapArgs, GramArgs, RecordArgs
from .torch_backend import BACKEND as _REFERENCE

# The interface version of csrc/bindings.cpp this module speaks.
_API_VERSION = 7

try:
    from interpolatron import _C
except ImportError as exc:  # not built (or built against another torch)
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None
    if getattr(_C, "API_VERSION", None) != _API_VERSION:
        _IMPORT_ERROR = ImportError(f"{_C.__file__} is a stale build (interface version "
                                    f"{getattr(_C, 'API_VERSION', None)}, this package needs {_API_VERSION})")
        _C = None

__all__ = ["BACKEND", "NativeBackend", "unavailable_reason", "extension_status", "select_cpu_kernels"]

_BUILD_HINT = "run `pip install --no-build-isolation -e .`"

# Why the CUDA kernels are missing from a build; the codes are set by setup.py.
_CUDA_SKIPPED = {
    1: "the build ran with INTERPOLATRON_SKIP_CUDA=1",
    2: "the torch it was built against has no CUDA (a CPU-only wheel)",
    3: "nvcc was not found at build time (set CUDA_HOME or put nvcc on PATH)",
    4: "compiling the CUDA kernels failed (rebuild with INTERPOLATRON_FORCE_CUDA=1 to see the error)",
}


def _cuda_missing_reason() -> str:
    code = _C.cuda_skipped_code()
    why = _CUDA_SKIPPED.get(code, f"unknown reason (code {code})")
    return (f"interpolatron._C was built without CUDA kernels: {why}. Rebuild with a CUDA build of "
            f"torch and nvcc available: {_BUILD_HINT}")


def _follow_torch_cpu_capability() -> None:
    """Use the CPU kernel variant torch itself uses (it honours ATEN_CPU_CAPABILITY),
    but AVX2 where torch uses AVX-512: these kernels are bound by memory bandwidth
    and their 512-bit variant measured slower. INTERPOLATRON_CPU_CAPABILITY
    (DEFAULT, AVX2, AVX512) overrides the choice for this extension alone."""
    wanted = os.environ.get("INTERPOLATRON_CPU_CAPABILITY")
    if not wanted:
        wanted = torch.backends.cpu.get_cpu_capability()
        wanted = "AVX2" if wanted.upper() == "AVX512" else wanted
    _C.select_cpu_kernels(wanted.upper())


if _C is not None:
    _follow_torch_cpu_capability()


def select_cpu_kernels(name: str) -> str:
    """Switch the CPU kernels to the variant ``name`` ("AVX512", "AVX2", "DEFAULT";
    an unavailable one falls back to the next lower). Returns the variant in use."""
    if _C is None:
        raise RuntimeError(unavailable_reason(torch.device("cpu"), torch.float32))
    return _C.select_cpu_kernels(name.upper())


def extension_status() -> dict:
    """What ``python -m interpolatron info`` reports about the extension."""
    if _C is None:
        return {
            "loaded": False,
            "cpu_kernels": False,
            "cuda_kernels": False,
            "cpu_variant": None,
            "reason": f"the C++ extension interpolatron._C is not built: {_BUILD_HINT} ({_IMPORT_ERROR})",
            "cuda_reason": "the extension is not built",
        }
    has_cuda = bool(_C.has_cuda())
    return {
        "loaded": True,
        "cpu_kernels": True,
        "cuda_kernels": has_cuda,
        "cpu_variant": _C.cpu_kernels(),
        "cpu_variants_available": list(_C.available_cpu_kernels()),
        "reason": None,
        "cuda_reason": None if has_cuda else _cuda_missing_reason(),
    }


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the extension can run ``dtype`` tensors on ``device``, else why not."""
    if _C is None:
        return (f"the C++ extension interpolatron._C is not built: {_BUILD_HINT} "
                f"(import error: {_IMPORT_ERROR})")
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        return f"the C++/CUDA kernels support {names}, not {dtype}"
    if device.type == "cuda":
        if not _C.has_cuda():
            return _cuda_missing_reason()
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no GPU or driver)"
        return None
    if device.type != "cpu":
        return f"the C++/CUDA kernels run on CPU and CUDA tensors, not on {device.type}"
    return None


_warned_fallback = False


def _fallback(op: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"interpolatron native backend: {op} got a non-contiguous tensor (channels_last?); "
                      "such calls run on the torch backend", RuntimeWarning, stacklevel=3)


def _tables(cache: dict, op: str, device: torch.device):
    """The extension's device-table cache of ``op`` for this bucket (CUDA only)."""
    if device.type != "cuda":
        return None
    key = ("native_backend.tables", op)
    tables = cache.get(key)
    if tables is None:
        tables = cache[key] = _C.TableCache()
    return tables


class NativeBackend:
    """The seam on ``_C``, whose functions take the op's argument object as is
    (the extension reads its fields by name) and the bucket's device-table
    cache. A call the extension declines (it returns False: a non-contiguous
    tensor) runs on the torch backend."""

    name = "native"

    def combine(self, args: CombineArgs, cache: dict) -> None:
        if not _C.combine(args, _tables(cache, "combine", args.x_hist.device)):
            _fallback("combine")
            _REFERENCE.combine(args, cache)

    def gram_row(self, args: GramArgs, cache: dict) -> None:
        if not _C.gram_row(args, _tables(cache, "gram_row", args.g_hist.device)):
            _fallback("gram_row")
            _REFERENCE.gram_row(args, cache)

    def rna_record(self, args: RecordArgs, cache: dict) -> None:
        if not _C.rna_record(args, _tables(cache, "rna_record", args.window.device)):
            _fallback("rna_record")
            _REFERENCE.rna_record(args, cache)

    def rna_extrapolate(self, args: ExtrapArgs, cache: dict) -> None:
        if not _C.rna_extrapolate(args, _tables(cache, "rna_extrapolate", args.window.device)):
            _fallback("rna_extrapolate")
            _REFERENCE.rna_extrapolate(args, cache)


BACKEND = NativeBackend()
