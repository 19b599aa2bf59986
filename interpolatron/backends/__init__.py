"""Backend dispatch: ``"auto" | "torch" | "triton" | "native"`` (``"cuda"``, the
old name of ``"native"``, still works with a FutureWarning).

Each backend lives in a module of this package exposing ``BACKEND`` (an object
implementing :class:`~interpolatron.backends.base.Backend`) and
``unavailable_reason(device, dtype) -> str | None``. A new backend plugs in
by being listed in ``_MODULES``; the optimizers never name one.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from ._simulated import NATIVE_CUDA_VERIFIED
from .base import SUPPORTED_DTYPES, Backend, compute_dtype

__all__ = ["Backend", "BackendUnavailable", "BACKEND_NAMES", "availability", "resolve", "canonical_name",
           "compute_dtype", "SUPPORTED_DTYPES"]

_MODULES = {
    "torch": "interpolatron.backends.torch_backend",
    "triton": "interpolatron.backends.triton_backend",
    "native": "interpolatron.backends.native_backend",
}
BACKEND_NAMES = tuple(_MODULES)
# "auto" tries these in order; the first one that can serve the bucket wins.
_AUTO_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


# Old backend names and what they are called now.
_RENAMED = {"cuda": "native"}


def canonical_name(name: str) -> str:
    """``name`` with a renamed backend replaced by its new name (FutureWarning)."""
    new = _RENAMED.get(name)
    if new is None:
        return name
    warnings.warn(f"backend={name!r} is now named {new!r} (the C++ extension serves CPU and CUDA tensors); "
                  f"use backend={new!r}", FutureWarning, stacklevel=3)
    return new


class BackendUnavailable(RuntimeError):
    """A requested backend cannot serve a bucket; the message says why and what to do."""


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as exc:  # an optional dependency or the extension is missing
        return None, f"cannot import {_MODULES[name]}: {exc}"


def _reason(name: str, device: torch.device, dtype: torch.dtype) -> tuple[object, str | None]:
    module, why = _load(name)
    if module is None:
        return None, why
    why = module.unavailable_reason(torch.device(device), dtype)
    return (module.BACKEND if why is None else None), why


def availability(device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """For each backend, None if it can serve (device, dtype), else why not."""
    return {name: _reason(name, torch.device(device), dtype)[1] for name in BACKEND_NAMES}


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend object that will run a bucket of ``dtype`` tensors on ``device``."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"interpolatron supports {', '.join(map(str, SUPPORTED_DTYPES))} "
                        f"parameters, got {dtype}")
    device = torch.device(device)
    name = canonical_name(name)
    if name == "auto":
        order = _AUTO_ORDER.get(device.type, ("torch",))
        if device.type == "cuda" and str(dtype).removeprefix("torch.") not in NATIVE_CUDA_VERIFIED:
            # No GPU has run these kernels: only the simulated GPU vouches for them.
            order = ("triton", "native", "torch")
        for candidate in order:
            backend, _ = _reason(candidate, device, dtype)
            if backend is not None:
                return backend
        raise BackendUnavailable(f"no backend can run {dtype} tensors on {device}")
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    backend, why = _reason(name, device, dtype)
    if backend is None:
        raise BackendUnavailable(
            f"backend={name!r} cannot run {dtype} tensors on {device}: {why}. "
            f"Use backend='auto' to fall back to what is available "
            f"(`python -m interpolatron info` lists the backends and why each is missing).")
    return backend
