"""The seam ops as torch custom ops, so that ``torch.compile`` sees them.

Each op of :mod:`interpolatron.backends.base` is registered once with
``torch.library.custom_op`` (namespace ``interpolatron``) and dispatches to
the backend named by its ``backend`` argument; the pybind and Triton kernels
inside stay opaque to the compiler, which only needs the schema (what each op
writes: ``mutates_args``) and a fake kernel (the ops return nothing, so the
fake kernels do nothing). The Triton kernels are wrapped like the others: they
address tensors through device pointer tables built on the host, which
``triton_op``/``wrap_triton`` cannot trace (the writes would be invisible to
its mutation analysis).

Caches. A backend keeps per-bucket host state (pointer tables, column indices,
work buffers) in a dict, which cannot cross an op boundary. The owner (a
bucket) takes an integer handle with :func:`new_cache` instead and passes it;
the dict lives in a module registry and is dropped when the owner is garbage
collected. A new bucket (after ``load_state_dict``, a rebuild, a copy) takes a
new handle, so its caches start empty exactly as a new dict did. Handle 0 is a
throwaway dict (opcheck, one-off calls).

Arguments. Each op builds its frozen argument object
(:class:`~interpolatron.backends.base.CombineArgs`, ``GramArgs``,
``RecordArgs``, ``ExtrapArgs``) once and hands it to the backend: the schema
is spelled out here and in that object only. ``combine`` and ``gram_row`` end
with GradScaler's ``grad_scale`` and ``found_inf``, optional tensors
defaulting to None (read-only: not in ``mutates_args``; custom ops do not
allow keyword-only tensors, callers pass them by keyword); None keeps the
unscaled behaviour. ``combine`` then takes ``sr_seed`` (None: round to
nearest), a plain int: a constant of the graph, and ``master`` (None: no
master weights), the bucket's flat float32 master copies, which ``combine``
rewrites (in ``mutates_args``) and ``gram_row`` reads for the weight decay.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from .backends import BACKEND_NAMES
from .backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs

_CACHES: dict[int, dict] = {}
_HANDLES = itertools.count(1)


def new_cache(owner: object) -> int:
    """A fresh cache handle that lives as long as ``owner``."""
    handle = next(_HANDLES)
    _CACHES[handle] = {}
    weakref.finalize(owner, _CACHES.pop, handle, None)
    return handle


def cache_of(handle: int) -> dict:
    """The backend cache of ``handle`` (a fresh dict for 0 or a freed handle)."""
    return _CACHES.get(handle, {}) if handle else {}


def _backend(name: str):
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; one of {BACKEND_NAMES}")
    from .backends import _load

    module, why = _load(name)
    if module is None:
        raise RuntimeError(why)
    return module.BACKEND


@torch.library.custom_op("interpolatron::combine",
                         mutates_args=("params", "x_hist", "g_hist", "gram", "master"))
def combine(params: list[Tensor], grads: list[Tensor], offsets: list[int], x_hist: Tensor, g_hist: Tensor,
            coefs: Tensor, lr: Tensor, count: Tensor, weight_decay: float, maximize: bool,
            gram: Optional[Tensor], backend: str, cache: int,  # noqa: UP045 (the schema)
            grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,  # noqa: UP045
            sr_seed: Optional[int] = None, master: Optional[Tensor] = None) -> None:  # noqa: UP045
    """:meth:`Backend.combine` of ``backend`` (``grad_scale`` / ``found_inf``:
    GradScaler's fused contract, read on the device; ``sr_seed``: stochastic
    rounding of the 16-bit writes; ``master``: the float32 master weights of
    16-bit parameters, read and rewritten)."""
    args = CombineArgs(params, grads, offsets, x_hist, g_hist, coefs, lr, count, weight_decay, maximize, gram,
                       grad_scale, found_inf, sr_seed, master)
    _backend(backend).combine(args, cache_of(cache))


@torch.library.custom_op("interpolatron::gram_row", mutates_args=("out",))
def gram_row(params: list[Tensor], grads: list[Tensor], offsets: list[int], g_hist: Tensor, count: Tensor,
             weight_decay: float, maximize: bool, out: Tensor, backend: str, cache: int,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,  # noqa: UP045
             master: Optional[Tensor] = None) -> None:  # noqa: UP045
    """:meth:`Backend.gram_row` with ``store=False`` (read-only: Anderson's Gram pass;
    ``master``: the weight decay reads the float32 masters of 16-bit parameters)."""
    args = GramArgs(params, grads, offsets, g_hist, count, weight_decay, maximize, out, False, grad_scale,
                    found_inf, master)
    _backend(backend).gram_row(args, cache_of(cache))


@torch.library.custom_op("interpolatron::gram_row_store", mutates_args=("g_hist", "out"))
def gram_row_store(params: list[Tensor], grads: list[Tensor], offsets: list[int], g_hist: Tensor,
                   count: Tensor, weight_decay: float, maximize: bool, out: Tensor, backend: str,
                   cache: int) -> None:
    """:meth:`Backend.gram_row` with ``store=True`` (RNA's gradient record)."""
    args = GramArgs(params, grads, offsets, g_hist, count, weight_decay, maximize, out, True)
    _backend(backend).gram_row(args, cache_of(cache))


@torch.library.custom_op("interpolatron::rna_record", mutates_args=("window", "out"))
def rna_record(sources: list[Tensor], offsets: list[int], window: Tensor, count: Tensor,
               out: Optional[Tensor], backend: str, cache: int) -> None:  # noqa: UP045 (the schema)
    """:meth:`Backend.rna_record` of ``backend``."""
    _backend(backend).rna_record(RecordArgs(sources, offsets, window, count, out), cache_of(cache))


@torch.library.custom_op("interpolatron::rna_extrapolate", mutates_args=("outs",))
def rna_extrapolate(window: Tensor, offsets: list[int], count: Tensor, coefs: Tensor, outs: list[Tensor],
                    backend: str, cache: int) -> None:
    """:meth:`Backend.rna_extrapolate` of ``backend``."""
    _backend(backend).rna_extrapolate(ExtrapArgs(window, offsets, count, coefs, outs), cache_of(cache))


def _no_output(*args, **kwargs) -> None:
    """The fake kernel of every op: they return nothing and only write into
    their arguments, so under fake tensors there is nothing to compute."""
    return None


for _op in (combine, gram_row, gram_row_store, rna_record, rna_extrapolate):
    _op.register_fake(_no_output)


OPS = {"combine": combine, "gram_row": gram_row, "gram_row_store": gram_row_store,
       "rna_record": rna_record, "rna_extrapolate": rna_extrapolate}
