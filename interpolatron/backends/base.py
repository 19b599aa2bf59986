"""The backend seam: four bucket ops that every backend implements identically.

A *bucket* is the set of parameters of one param group that share a device and
a dtype. Its optimizer history is stored flat: a ring buffer of shape
``(S, N)`` where ``N`` is the bucket's total element count and parameter ``i``
owns the columns ``[offsets[i], offsets[i] + params[i].numel())``. The ops
receive the *active* parameters only (those with a gradient this step) with
their offsets, so the offsets need not be contiguous. A tensor's columns hold
its elements in storage order when it is dense (channels_last included), else
in row-major order (:mod:`interpolatron.ring`); a gradient is read in its
parameter's order.

Ring convention (shared by every op and every backend)
------------------------------------------------------
``count`` is a 0-dim int64 tensor on the bucket's device: the number of
completed steps (or records). The entry written while ``count == c`` goes to
slot ``c mod S``. Hence, while ``count == c``, the entry of *age* ``j``
(``j = 0`` the newest, written now) lives in slot ``(c - j) mod S``.
Backends read ``count`` from device memory (never ``.item()``), so a step can
be captured in a CUDA graph; the caller increments ``count`` after the op.

Coefficients ``coefs`` are in age order (``coefs[0]`` weights the newest
iterate/gradient, ALGORITHMS.md's ``a_1``). ``coefs`` and ``lr`` are float64
device tensors; a backend computes the update in float32 for 16/32-bit data
and in float64 for float64 data. Dot products (the Gram rows) are float64
whatever the data (ALGORITHMS.md section 6, D3): each product is taken in
float64 (exact for float32 and 16-bit values) and summed in float64 per
block, and the block partials are reduced in float64 in a fixed order (no
atomics: run to run bitwise identical). A dot then depends on how the
elements are cut into blocks (the layout, the shards, the rank count) only at
float64 rounding.

The effective gradient is ``g = sign * grad + weight_decay * param`` with
``sign = -1`` when ``maximize`` else ``+1`` (weight decay is coupled: it
enters the history, ALGORITHMS.md section 1).

GradScaler's fused contract (ALGORITHMS.md section 7): ``combine`` and
``gram_row`` take ``grad_scale`` and ``found_inf``, one-element
float32 tensors on the bucket's device (or None). The gradient is
``grad * (1 / grad_scale)`` before the sign and the weight decay (the
reciprocal formed in float64 and rounded to the compute dtype, as
``GradScaler.unscale_`` does: exact for its power-of-two scales). A nonzero
``found_inf`` makes the op write nothing at all (params, rings); it is read on
the device, never on the host. ``gram`` / ``out`` are then undefined: the
caller discards them.

Stochastic rounding: ``combine`` takes ``sr_seed`` (an int,
or None to round to nearest). With a seed, every bfloat16/float16 value it
computes (the new parameter and the effective gradient stored in the ring;
the old iterate is a 16-bit value already) is rounded stochastically, with
the random bits of :mod:`interpolatron.rounding` drawn from the seed, the
``count`` read on the device and the element's ring column: every backend
writes the same bits for the same float32 values. Other dtypes ignore it.

Master weights: ``combine`` and ``gram_row`` take ``master`` (or None), a
flat contiguous float32 tensor of shape ``(N,)`` with the rings' columns (a
member's master in its columns, the gaps zero), given when the bucket's
parameters are 16-bit (bfloat16/float16) with float32 master copies. Then
``params`` and ``grads`` are 16-bit, the rings float32, and age 0 of the
iterate is the MASTER, not the parameter: ``combine`` reads the master and the
16-bit gradient, forms the effective gradient with the weight decay on the
master, and writes in its one pass the new master (float32), the rings and the
16-bit parameter, the new master rounded to nearest even (stochastically with
``sr_seed``, stream 1, the element's ring column: the rule above; the float32
g ring is not rounded). ``params`` are written, never read. The float32 math
is the same operations in the same order as a float32 bucket holding the
masters and the upcast gradients, so the master, the rings and the dots are
bitwise those of that bucket. ``gram_row`` takes the weight decay on the master.

``cache`` is a dict owned by the bucket and private to the backend (pointer
tables, column indices); the optimizers reach the backends through the custom
ops of :mod:`interpolatron.ops`, which look it up by the bucket's handle. A
backend must tolerate the tensors' storages changing between calls
(``zero_grad(set_to_none=True)``, ``load_state_dict``) and must rebuild what
it cached when they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

# One frozen object per op call, built once by the custom op in
# interpolatron/ops.py (the one place that unpacks the op's schema) and handed
# to every backend and launcher as is (the C++ extension too: ``_C.combine``
# reads the fields by name). The field names are the schema's argument names
# (without ``backend`` and ``cache``): a new argument is one field here, one
# parameter of the op, and the kernels that read it; a float, bool or optional
# int that the C++ kernels read is also one line of its op's field list in
# csrc/ops.h, which the bindings, the CPU and CUDA launch paths and the
# simulator harness all walk.


@dataclass(frozen=True, slots=True)
class CombineArgs:
    """The arguments of :meth:`Backend.combine`."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    offsets: Sequence[int]
    x_hist: Tensor
    g_hist: Tensor
    coefs: Tensor
    lr: Tensor
    count: Tensor
    weight_decay: float
    maximize: bool
    gram: Tensor | None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    sr_seed: int | None = None
    master: Tensor | None = None


@dataclass(frozen=True, slots=True)
class GramArgs:
    """The arguments of :meth:`Backend.gram_row`."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    offsets: Sequence[int]
    g_hist: Tensor
    count: Tensor
    weight_decay: float
    maximize: bool
    out: Tensor
    store: bool
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    master: Tensor | None = None


@dataclass(frozen=True, slots=True)
class RecordArgs:
    """The arguments of :meth:`Backend.rna_record`."""

    sources: Sequence[Tensor]
    offsets: Sequence[int]
    window: Tensor
    count: Tensor
    out: Tensor | None


@dataclass(frozen=True, slots=True)
class ExtrapArgs:
    """The arguments of :meth:`Backend.rna_extrapolate`."""

    window: Tensor
    offsets: Sequence[int]
    count: Tensor
    coefs: Tensor
    outs: Sequence[Tensor]


class Backend(Protocol):
    """What a backend provides. See the module docstring for the conventions.
    Each op takes its argument object and the bucket's ``cache``."""

    name: str

    def combine(self, args: CombineArgs, cache: dict) -> None:
        """The interpolation step ``x = sum_j a_j x(age j) - lr * sum_j a_j g(age j)``.

        ``k = coefs.numel()``; ``x_hist`` has ``k - 1`` slots holding the
        iterates of ages ``1..k-1``; ``params`` hold age 0 and are overwritten
        with the new iterate.

        ``g_hist`` has ``k - 1`` slots holding gradients of ages ``1..k-1``; age
        0 is the effective gradient of ``grads``. The op writes the OLD param and
        the effective gradient into slot ``c mod (k-1)`` of ``x_hist`` /
        ``g_hist`` (the oldest entries, read before they are overwritten).
        ``gram``, if given, receives (overwritten, not accumulated) this
        bucket's partial ``<g(age 0), g(age j)>`` for ``j = 0..k-1``, from the
        values loaded for the update (float64 products and sums, as
        :meth:`gram_row`): Interpolatron's diagnostics and one-pass Anderson
        (ALGORITHMS.md 2b) use it. Exact Anderson calls ``combine`` without it,
        after its read-only :meth:`gram_row`, with the solved coefficients.

        ``k == 1`` is SGD: the rings have zero slots and nothing is stored.
        """
        ...

    def gram_row(self, args: GramArgs, cache: dict) -> None:
        """Write into ``out`` (float64, shape ``(k,)``) this bucket's partial
        ``<g(age 0), g(age j)>`` for ``j = 0..k-1`` (``out[0] = ||g||^2``), where
        age 0 is the effective gradient of ``grads``.

        * ``store`` (RNA's gradient record): ``g_hist`` has ``k`` slots, ages
          ``1..k-1`` stored, and the op writes the effective gradient into slot
          ``c mod k`` (the oldest entry, never read).
        * ``store=False`` (Anderson's Gram pass, read-only): ``g_hist`` has
          ``k - 1`` slots holding ages ``1..k-1`` (Interpolatron's layout; the
          following :meth:`combine` with ``grads`` stores the gradient), and
          nothing but ``out`` is written. ``k == 1`` is an empty ring.

        ``params`` are read only when ``weight_decay != 0``."""
        ...

    def rna_record(self, args: RecordArgs, cache: dict) -> None:
        """Copy ``sources`` into slot ``c mod S`` of ``window`` (``S`` slots).

        If ``out`` (float64, shape ``(S - 1,)``) is given, also write this
        bucket's partial ``<r_0, r_j>`` for ``j = 0..S-2`` where
        ``r_j = y(age j) - y(age j + 1)`` are snapshot differences taken
        elementwise BEFORE the product (``y(age 0)`` is ``sources``,
        ``y(age a)`` is slot ``(c - a) mod S`` for ``a >= 1``; slot ``c mod S``
        itself is never read). Slots never written hold zeros; the caller
        masks the entries that are not yet meaningful."""
        ...

    def rna_extrapolate(self, args: ExtrapArgs, cache: dict) -> None:
        """``outs[i] = sum_a coefs[a] * y(age a)`` over ``a = 0..coefs.numel()-1``,
        with ``y(age a)`` in slot ``(count - 1 - a) mod S`` (``count`` is the
        number of records done; the newest record has age 0). ``outs`` have
        the shapes of the recorded sources and the window's dtype; they may be
        the very tensors that were recorded (online mode, swapping)."""
        ...


def check_master(master: Tensor | None, ring: Tensor, params: Sequence[Tensor]) -> None:
    """A ``master`` argument fits its bucket (see the module docstring): float32,
    flat, contiguous, one column per ring column, on the ring's device, with
    float32 rings and 16-bit parameters. Raises ValueError (nothing written)."""
    if master is None:
        return
    if master.dtype != torch.float32 or master.dim() != 1 or not master.is_contiguous():
        raise ValueError(f"master must be a contiguous 1-d float32 tensor, got {master.dtype} of shape "
                         f"{tuple(master.shape)}")
    if master.device != ring.device or master.numel() != ring.shape[1]:
        raise ValueError(f"master ({master.numel()} columns on {master.device}) must match the rings "
                         f"({ring.shape[1]} columns on {ring.device})")
    if ring.dtype != torch.float32:
        raise ValueError(f"with master weights the rings are float32, got {ring.dtype}")
    for i, p in enumerate(params):
        if p.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"master weights are for 16-bit parameters; params[{i}] is {p.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype backends compute in for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
