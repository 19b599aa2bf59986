"""Host side shared by the Triton kernels: launch settings, pointer tables,
device scalars.

Pointer tables
--------------
One launch serves a whole bucket, whatever its number of tensors. Each op gets
an int64 device buffer holding, back to back::

    ptrs       (rows, T)  data pointers (e.g. row 0 params, row 1 grads)
    numels     (T,)       elements of tensor i
    cols       (T,)       first ring column of tensor i (the bucket offset)
    flags      (T,)       1 when tensor i's pointers and ring column are 16-byte
                          aligned: its full blocks take the vectorized path
    blk_tensor (B,)       tensor served by program b
    blk_start  (B,)       first element of tensor blk_tensor[b] served by program b

with ``B = sum_i ceil(numel_i / BLOCK)`` (zero-size tensors own no program).
Kernels load their row of the map and cast the pointer with
``.to(tl.pointer_type(DTYPE))``. The buffer is cached in the bucket's
``cache`` dict under one key per op, keyed by the data pointers, numels,
offsets and block size, so it is rebuilt (one host-to-device copy) only when a
storage changes, e.g. after ``zero_grad(set_to_none=True)``; one entry per op
keeps the dict from growing.

Dense tensors (contiguous, channels_last, transposed) are addressed as
``base + i``: the ring holds each tensor's columns in its storage order
(interpolatron/ring.py), and a tensor paired with it (a gradient)
streams directly when it is strided the same way. Anything else (a tensor with
gaps, a gradient laid out unlike its parameter) is staged through a cached
buffer laid out like the row-0 tensor (one copy in before the launch and/or
one copy back after it), for those tensors only.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import triton.language as tl
from torch import Tensor

from interpolatron.ring import is_dense

BLOCK_ENV = "INTERPOLATRON_TRITON_BLOCK"
"""Environment override of the elements per program (a power of two). Tests set
a small value so that the CPU interpreter runs many programs per tensor."""

VECTOR_BYTES = 16  # one 128-bit vector load (the ring's columns are padded to 128: ring.ALIGN_BYTES)

RETIRED_TABLES = 4
"""Replaced pointer tables kept alive per bucket (see :func:`tables`)."""

REDUCE_BLOCK = 1024
REDUCE_WARPS = 4

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype) -> Any:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton backend supports {', '.join(map(str, _TL_DTYPES))}, "
                        f"got {dtype}") from None


def compute_dtype(dtype: torch.dtype) -> Any:
    """fp64 math for fp64 data, fp32 for everything narrower (base.compute_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


PARTIAL_DTYPE = torch.float64
"""Per-program dot partials are float64 for every dtype (D3: products of fp32
values are exact in float64, so only float64 rounding depends on the layout)."""


@dataclass(frozen=True)
class LaunchSettings:
    block: int
    num_warps: int


def settings(dtype: torch.dtype, op: str = "") -> LaunchSettings:
    """Elements per program and warps for the streaming kernels.

    8 KiB per stream per program over 8 warps: 32 bytes (two 128-bit loads)
    per thread and stream whatever the dtype (fp32 2048 elements, 16-bit 4096,
    fp64 1024), enough bytes in flight per SM to approach copy bandwidth while
    a k = 4 step still fits the registers (2k streams live at once)."""
    env = os.environ.get(BLOCK_ENV)
    if env:
        block = int(env)
        if block < 1 or block & (block - 1):
            raise ValueError(f"{BLOCK_ENV} must be a power of two, got {env!r}")
    else:
        es = torch.empty(0, dtype=dtype).element_size()
        block = 8192 // es
        if op == "rna_record" and es == 2:
            # Its float64 residual products spill at 16 elements per thread;
            # a record is not a per-step op.
            block //= 2
    return LaunchSettings(block=block, num_warps=max(1, min(8, block // 256)))


def launch(kernel: Any, programs: int, *args: Any, num_warps: int, **constexprs: Any) -> None:
    """Every launch of the package goes through here (tests count them)."""
    kernel[(programs,)](*args, num_warps=num_warps, **constexprs)


@dataclass
class Tables:
    key: tuple
    buf: Tensor
    ptrs: Tensor
    numels: Tensor
    cols: Tensor
    flags: Tensor
    blk_tensor: Tensor
    blk_start: Tensor
    ntensors: int
    nblocks: int
    block: int
    col_end: int
    # (original, contiguous stage, copy in before the launch, copy back after)
    staged: list[tuple[Tensor, Tensor, bool, bool]]
    scratch: dict = field(default_factory=dict)

    def stage_in(self) -> None:
        pairs = [(s, t) for t, s, cin, _ in self.staged if cin]
        if pairs:
            torch._foreach_copy_([s for s, _ in pairs], [t for _, t in pairs])

    def stage_out(self) -> None:
        pairs = [(t, s) for t, s, _, cout in self.staged if cout]
        if pairs:
            torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])

    def partials(self, rows: int, dtype: torch.dtype) -> Tensor:
        """The (rows, nblocks) buffer of per-program dot products; kept so that a
        step allocates nothing (CUDA graphs, allocator churn)."""
        key = (rows, dtype)
        buf = self.scratch.get(key)
        if buf is None:
            buf = torch.empty((rows, self.nblocks), dtype=dtype, device=self.buf.device)
            self.scratch.clear()
            self.scratch[key] = buf
        return buf

    @staticmethod
    def ring_aligned(*rings: Tensor) -> bool:
        """Whether the rings' rows start 16-byte aligned (the columns are checked per
        tensor, in ``flags``). Passed as a constexpr: a step's rings rarely change."""
        return all(r.data_ptr() % VECTOR_BYTES == 0 and (r.stride(0) * r.element_size()) % VECTOR_BYTES == 0
                   for r in rings if r.numel())

    def check_ring(self, ring: Tensor, name: str) -> None:
        if ring.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (slots, N) ring, got shape {tuple(ring.shape)}")
        if ring.shape[1] > 1 and ring.stride(1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == 1)")
        if ring.shape[0] > 0 and ring.shape[1] < self.col_end:
            raise ValueError(f"{name} has {ring.shape[1]} columns but the tensors reach column "
                             f"{self.col_end}")


def _key(op: str, rows: Sequence[Sequence[Tensor]], offsets: Sequence[int], block: int,
         device: torch.device, ring_dtype: torch.dtype) -> tuple:
    parts: list = [op, block, str(device), ring_dtype, tuple(offsets)]
    for row in rows:
        parts.append(tuple(t.data_ptr() for t in row))
        parts.append(tuple(t.numel() for t in row))
    # A staged tensor's copies depend on its layout, which its pointer does not fix.
    parts.append(tuple((t.shape, t.stride()) for row in rows for t in row if not t.is_contiguous()))
    return tuple(parts)


def tables(cache: dict, op: str, rows: Sequence[Sequence[Tensor]], modes: Sequence[str],
           offsets: Sequence[int], device: torch.device, block: int, ring_dtype: torch.dtype) -> Tables:
    """The cached tables of ``op`` for these tensors, rebuilt when a storage changed.

    ``rows`` are parallel lists of tensors (same numels); ``modes[r]`` says how
    the kernel uses row ``r``: ``"r"``, ``"w"`` or ``"rw"`` (only matters for
    staged, non-contiguous tensors)."""
    key = _key(op, rows, offsets, block, device, ring_dtype)
    slot = ("triton", op)
    entry = cache.get(slot)
    if entry is None or entry.key != key:
        if entry is not None:
            # A CUDA graph captured with the old table still holds its address:
            # keep the newest few alive rather than hand them back to the
            # allocator, where a replay would read whatever reused the memory.
            retired = cache.setdefault(("triton", "retired"), collections.deque(maxlen=RETIRED_TABLES))
            retired.append(entry)
        entry = _build(key, rows, modes, offsets, device, block, ring_dtype)
        cache[slot] = entry
    return entry


def _streams_like(t: Tensor, ref: Tensor) -> bool:
    """Whether ``t`` can be streamed as ``data_ptr() + i`` in the ring's column
    order, which is the storage order of ``ref`` (the row-0 tensor, e.g. the
    parameter) when ``ref`` is dense, else row-major."""
    if not is_dense(ref):
        return t.is_contiguous()
    return is_dense(t) and (t.numel() <= 1 or t.stride() == ref.stride())


def _build(key: tuple, rows: Sequence[Sequence[Tensor]], modes: Sequence[str],
           offsets: Sequence[int], device: torch.device, block: int, ring_dtype: torch.dtype) -> Tables:
    ntensors = len(rows[0]) if rows else 0
    if len(offsets) != ntensors:
        raise ValueError(f"got {ntensors} tensors but {len(offsets)} offsets")
    numels = [t.numel() for t in rows[0]] if rows else []
    staged: list[tuple[Tensor, Tensor, bool, bool]] = []
    ptr_rows: list[list[int]] = []
    for row, mode in zip(rows, modes):
        if len(row) != ntensors:
            raise ValueError(f"tensor lists differ in length: {len(row)} vs {ntensors}")
        dtypes = {t.dtype for t in row}
        if len(dtypes) > 1:
            raise TypeError(f"a bucket's tensors must share one dtype, got {sorted(map(str, dtypes))}")
        ptr_row = []
        for t, n in zip(row, numels):
            if t.numel() != n:
                raise ValueError(f"tensor of {t.numel()} elements paired with one of {n}")
            if t.device != device:
                raise ValueError(f"tensor on {t.device} in a bucket on {device}")
            ref = rows[0][len(ptr_row)]
            if n and not _streams_like(t, ref):
                stage = (torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=device)
                         if is_dense(ref) else
                         torch.empty(t.shape, dtype=t.dtype, device=device))
                staged.append((t, stage, "r" in mode, "w" in mode))
                t = stage
            ptr_row.append(t.data_ptr())
        ptr_rows.append(ptr_row)

    ring_es = torch.empty(0, dtype=ring_dtype).element_size()
    sizes = [ring_es] + [row[0].element_size() for row in rows if row]
    # A block must span whole 16-byte vectors of every stream for the hints to hold.
    block_ok = all((block * es) % VECTOR_BYTES == 0 for es in sizes)
    flags = [int(block_ok and (int(off) * ring_es) % VECTOR_BYTES == 0
                 and all(ptr_row[i] % VECTOR_BYTES == 0 for ptr_row in ptr_rows))
             for i, off in enumerate(offsets)]
    col_end = max((int(offsets[i]) + n for i, n in enumerate(numels) if n), default=0)

    per = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    nblocks = int(per.sum()) if ntensors else 0
    blk_tensor = torch.repeat_interleave(torch.arange(ntensors, dtype=torch.int64), per)
    first = torch.cumsum(per, 0) - per
    blk_start = (torch.arange(nblocks, dtype=torch.int64) - torch.repeat_interleave(first, per)) * block
    host = torch.cat([
        torch.tensor(ptr_rows, dtype=torch.int64).reshape(-1),
        torch.tensor(numels, dtype=torch.int64),
        torch.tensor([int(o) for o in offsets], dtype=torch.int64),
        torch.tensor(flags, dtype=torch.int64),
        blk_tensor,
        blk_start,
    ])
    if device.type == "cuda":
        # Pinned + non_blocking: a rebuild (new gradient storages) does not stall
        # the host on the copy; the caching host allocator keeps the pinned
        # buffer alive until the copy has run.
        buf = host.pin_memory().to(device, non_blocking=True)
    else:
        buf = host.to(device)
    nrows = len(rows)
    parts = [nrows * ntensors, ntensors, ntensors, ntensors, nblocks, nblocks]
    ptrs, numel_t, cols, flag_t, bt, bs = buf.split(parts)
    return Tables(key=key, buf=buf, ptrs=ptrs, numels=numel_t, cols=cols, flags=flag_t, blk_tensor=bt,
                  blk_start=bs, ntensors=ntensors, nblocks=nblocks, block=block, col_end=col_end,
                  staged=staged)


def f64_scalar(cache: dict, name: str, value: float, device: torch.device) -> Tensor:
    """A cached float64 device scalar (weight decay). Triton passes Python floats
    as fp32, which would round the fp64 path; loading it from memory keeps the
    exact value, and caching keeps the host-to-device copy off the hot path."""
    slot = ("triton", "scalar", name)
    entry = cache.get(slot)
    if entry is None or entry[1].device != device:
        entry = (value, torch.full((), value, dtype=torch.float64, device=device))
        cache[slot] = entry
    elif entry[0] != value:
        # A fill on the device, not a (synchronous, pageable) host-to-device copy.
        entry[1].fill_(value)
        entry = (value, entry[1])
        cache[slot] = entry
    return entry[1]


def check_device_scalars(device: torch.device, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} must live on the bucket's device {device}, got {t.device}")


def amp_scalars(device: torch.device, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's ``grad_scale`` / ``found_inf`` as the kernels read them: one
    element on the bucket's device, float32 (as GradScaler makes them; a cast
    is a device op, never a host read)."""
    out = []
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            check_device_scalars(device, **{name: t})
            if t.numel() != 1:
                raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
            t = t.reshape(())
            if t.dtype != torch.float32:
                t = t.to(torch.float32)
        out.append(t)
    return out[0], out[1]
