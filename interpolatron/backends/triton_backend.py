"""The Triton backend: one fused launch per bucket op, whatever the number of
tensors (pointer tables), no host synchronisation (lr, coefs and count are
read on the device), deterministic Gram rows (per-program partials reduced in
float64 in a fixed order, no atomics).

Kernels live in :mod:`interpolatron.triton_kernels`; this module only adapts
the seam of :mod:`interpolatron.backends.base` to them. It imports without
Triton installed, so that dispatch can say why the backend is unavailable.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .base import SUPPORTED_DTYPES, CombineArgs, ExtrapArgs, GramArgs, RecordArgs

try:
    from interpolatron.triton_kernels import combine as _combine
    from interpolatron.triton_kernels import gram_row as _gram_row
    from interpolatron.triton_kernels import rna as _rna
except ImportError as exc:  # triton missing (or broken): reported by unavailable_reason
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


def _kernels_interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter: ``@triton.jit``
    picks its mode when a kernel module is imported, not when it runs."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_combine._combine_kernel, InterpretedFunction)


def _interpret_requested() -> bool:
    """TRITON_INTERPRET as Triton itself parses it ("1", "true", ...)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _on(device: torch.device):
    """Launch on the bucket's device: Triton launches on the current device and
    its current stream, so a bucket on cuda:1 needs cuda:1 current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class TritonBackend:
    name = "triton"

    def combine(self, args: CombineArgs, cache: dict) -> None:
        with _on(args.x_hist.device):
            _combine.combine(args, cache)

    def gram_row(self, args: GramArgs, cache: dict) -> None:
        with _on(args.g_hist.device):
            _gram_row.gram_row(args, cache)

    def rna_record(self, args: RecordArgs, cache: dict) -> None:
        with _on(args.window.device):
            _rna.rna_record(args, cache)

    def rna_extrapolate(self, args: ExtrapArgs, cache: dict) -> None:
        with _on(args.window.device):
            _rna.rna_extrapolate(args, cache)


BACKEND = TritonBackend()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run ``dtype`` tensors on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not installed: pip install triton ({_IMPORT_ERROR})"
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels support {', '.join(map(str, SUPPORTED_DTYPES))}, not {dtype}"
    device = torch.device(device)
    interpreting = _interpret_requested()
    if interpreting != _kernels_interpreted():
        return ("TRITON_INTERPRET changed after interpolatron's Triton kernels were imported; "
                "set it before importing interpolatron")
    if device.type == "cuda":
        if interpreting:
            # The interpreter dereferences the pointer tables on the host.
            return "the Triton CPU interpreter (TRITON_INTERPRET=1) cannot run CUDA tensors; unset it"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu" and interpreting:
        return None
    return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
