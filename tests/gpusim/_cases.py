"""Cases for the simulated GPU: each is one bucket op with its inputs, run on
the CPU kernels (the ``native`` backend on CPU tensors: the reference) and
serialised for ``tools/gpusim/harness.cpp``, which runs the same op through
the CUDA launch layer on the simulated GPU and writes every buffer back.

Comparison rules (``check``):

* every elementwise output (parameters, ring rows, windows, extrapolations)
  bitwise: the CUDA kernels are compiled with ``--fmad=false`` and so round
  each multiply and add exactly as the CPU kernels (``-ffp-contract=off``) do,
  in the same order; stochastic rounding draws the same bits on both;
* dot products (the Gram row, gram_row, RNA's residual dots) within
  ``4 (n + 1) u sum_i |a_i b_i|`` (u = 2^-53): both sides form each product
  exactly (fp32 data) or with one rounding (fp64 data) and sum the n products
  in float64 in different orders (CPU: 8192-element chunks, vector lanes;
  CUDA: per-thread strides, a warp butterfly, per-block partials), each within
  ``2 n u sum |a_i b_i|`` of the exact sum;
* buffers outside the op's reach bitwise unchanged; a GradScaler-skipped step
  (``found_inf`` set) leaves everything but the undefined Gram bitwise as it
  was.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import torch

from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs
from interpolatron.backends.native_backend import _C
from interpolatron.backends.native_backend import BACKEND as NATIVE

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
OPS = {"combine": 0, "gram_row": 1, "rna_record": 2, "rna_extrapolate": 3}
# Which optional tensors a case carries (tools/gpusim/harness.cpp Flag).
F_OUT, F_SCALE, F_FOUND_INF, F_MASTER = 2, 8, 16, 64
U64 = 2.0 ** -53
THREADS = 256  # csrc/cuda/kernels.h kThreads


def chunk_elems(dtype: torch.dtype) -> int:
    """Elements of one block (csrc/cuda/kernels.h chunk_elems): kThreads x
    kChunkFrags 16-byte fragments, kChunkFrags 1 for 16-bit data, else 2."""
    frags = 1 if torch.empty(0, dtype=dtype).element_size() == 2 else 2
    return THREADS * frags * vec_elems(dtype)


def vec_elems(dtype: torch.dtype) -> int:
    return 16 // torch.empty(0, dtype=dtype).element_size()


@dataclass
class Buf:
    name: str
    before: torch.Tensor  # contiguous, the harness input
    after: torch.Tensor | None = None  # reference output (None: must be unchanged)
    misalign: int = 0  # elements past a 256-byte boundary
    dots: torch.Tensor | None = None  # float64 per entry: sum_i |a_i b_i| (a dot-product output)
    n_terms: int = 0
    undefined: bool = False  # contents undefined (a skipped step's Gram)

    def raw(self) -> bytes:
        return self.before.contiguous().view(torch.uint8).numpy().tobytes() if self.before.numel() else b""


@dataclass
class Case:
    name: str
    op: str
    dtype: torch.dtype
    numels: list[int]
    cols: list[int]
    row_elems: int
    slots: int  # k for combine, S otherwise
    flags: int = 0
    m: int = 0
    scalars: dict = field(default_factory=dict)  # the op's scalars by name (scalars_of)
    bufs: list[Buf] = field(default_factory=list)

    def serialise(self, out: io.BufferedIOBase) -> None:
        w = out.write
        w(struct.pack("<7q", OPS[self.op], DTYPE_CODE[self.dtype], len(self.numels), self.row_elems,
                      self.slots, self.flags, self.m))
        text = "\n".join(f"{name}={_scalar_text(v)}" for name, v in self.scalars.items()).encode()
        w(struct.pack("<q", len(text)))
        w(text)
        w(struct.pack(f"<{len(self.numels)}q", *self.numels))
        w(struct.pack(f"<{len(self.cols)}q", *self.cols))
        w(struct.pack("<q", len(self.bufs)))
        for b in self.bufs:
            raw = b.raw()
            w(struct.pack("<qq", len(raw), b.misalign * b.before.element_size()))
            w(raw)

    def elements(self) -> int:
        return sum(self.numels)


def scalars_of(op: str, args) -> dict:
    """The scalars the harness fills ``op``'s struct with: the attributes of its
    argument object that the extension reads (csrc/ops.h's field lists, as
    ``_C.SCALARS``), so a case carries whatever the op takes."""
    return {name: getattr(args, name) for name in _C.SCALARS[op]}


def _scalar_text(v) -> str:
    """One scalar as the harness parses it: a float exactly (hex), a bool 0/1,
    an int in decimal (a seed; the harness takes it mod 2^32), None "none"."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, int):
        return str(v)
    raise TypeError(f"no harness form for the scalar {v!r}")


def write_cases(cases: list[Case], path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<q", len(cases)))
        for c in cases:
            c.serialise(fh)


def read_outputs(cases: list[Case], path: str) -> list[list[torch.Tensor]]:
    """The harness's buffers after each case, as tensors shaped like the inputs."""
    data = open(path, "rb").read()
    pos = 0
    outs = []
    for c in cases:
        got = []
        for b in c.bufs:
            n = b.before.numel() * b.before.element_size()
            if pos + n > len(data):
                raise AssertionError(f"{c.name}: the harness wrote {len(data)} bytes, "
                                     "fewer than the cases need")
            raw = bytearray(data[pos:pos + n])
            pos += n
            t = torch.frombuffer(raw, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
            got.append(t.view(b.before.dtype).reshape(b.before.shape))
        outs.append(got)
    if pos != len(data):
        raise AssertionError(f"the harness wrote {len(data)} bytes, the cases hold {pos}")
    return outs


def check(case: Case, got: list[torch.Tensor]) -> list[str]:
    """What differs between the simulated GPU's buffers and the reference ([] when all holds)."""
    problems = []
    if case.elements() and not any(b.after is not None and not torch.equal(b.after, b.before)
                                   for b in case.bufs):
        skipped = any(b.name == "found_inf" and float(b.before) != 0 for b in case.bufs)
        if not skipped:
            problems.append("the reference changed no buffer: the case tests nothing")
    for b, g in zip(case.bufs, got):
        want = b.before if b.after is None else b.after
        if b.undefined:
            continue
        if b.dots is not None:
            bound = 4.0 * (b.n_terms + 1) * U64 * b.dots + 1e-300
            err = (g.double() - want.double()).abs()
            bad = ~(err <= bound)
            if bad.any():
                i = int(bad.nonzero()[0])
                problems.append(f"{b.name}[{i}]: simulated {g[i].item()!r}, CPU {want[i].item()!r}, "
                                f"|diff| {err[i].item():.3g} > bound {bound[i].item():.3g}")
            continue
        ib = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
        gi, wi = g.contiguous().view(ib).reshape(-1), want.contiguous().view(ib).reshape(-1)
        diff = (gi != wi).nonzero()
        if diff.numel():
            first = int(diff[0])
            problems.append(f"{b.name}: {diff.numel()} of {want.numel()} elements differ; first at {first}: "
                            f"simulated {g.reshape(-1)[first].item()!r}, "
                            f"CPU {want.reshape(-1)[first].item()!r}"
                            + (" (unchanged expected)" if b.after is None else ""))
    return problems


# ---------------------------------------------------------------------------
# Building cases: random data, the reference on the CPU kernels.

def _rand(n: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _layout(numels: list[int], dtype: torch.dtype, odd_cols: tuple[int, ...],
            gap: int) -> tuple[list[int], int]:
    """Ring columns: each tensor at the next 16-byte column boundary, one column
    further for the tensors in odd_cols (their ring fragments are then never
    16-byte aligned), `gap` unused columns after each."""
    v = vec_elems(dtype)
    cols, c = [], 0
    for i, n in enumerate(numels):
        c = -(-c // v) * v + (1 if i in odd_cols else 0)
        cols.append(c)
        c += n + gap
    return cols, max(c, 1)


def _scaler_bufs(bufs: list, scale_t, inf_t) -> int:
    """GradScaler's inputs appended to ``bufs``; returns their flags."""
    flags = 0
    if scale_t is not None:
        flags |= F_SCALE
        bufs.append(Buf("grad_scale", scale_t))
    if inf_t is not None:
        flags |= F_FOUND_INF
        bufs.append(Buf("found_inf", inf_t))
    return flags


def combine_case(name: str, dtype: torch.dtype, k: int, numels: list[int], *, gen: torch.Generator,
                 weight_decay: float = 0.0, maximize: bool = False, gram: bool = False,
                 grad_scale: float | None = None, found_inf: float | None = None, sr_seed: int | None = None,
                 count: int = 7, misalign: list[int] | None = None, odd_cols: tuple[int, ...] = (),
                 gap: int = 0,
                 row_pad: int = 0, master: bool = False) -> Case:
    """``master``: 16-bit ``dtype`` parameters and gradients with float32 master
    weights and rings (the case's dtype is then the rings', float32, and ``m``
    carries the parameters' dtype code)."""
    ring_dtype = torch.float32 if master else dtype
    cols, n_cols = _layout(numels, ring_dtype, odd_cols, gap)
    row = n_cols + row_pad
    params = [_rand(n, dtype, gen) for n in numels]
    grads = [_rand(n, dtype, gen, 0.1) for n in numels]
    x_hist = _rand((k - 1) * row, ring_dtype, gen).reshape(k - 1, row)
    g_hist = _rand((k - 1) * row, ring_dtype, gen, 0.1).reshape(k - 1, row)
    # The masters: near the parameters (a master rounds to its parameter), the gaps random too.
    masters = _rand(row, torch.float32, gen) if master else None
    if master:
        for p, c in zip(params, cols):
            masters[c:c + p.numel()] = p.float() + _rand(p.numel(), torch.float32, gen, 1e-3)
    coefs = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    lr = torch.tensor([0.05], dtype=torch.float64)
    cnt = torch.tensor(count, dtype=torch.int64)
    scale_t = None if grad_scale is None else torch.tensor([grad_scale], dtype=torch.float32)
    inf_t = None if found_inf is None else torch.tensor([found_inf], dtype=torch.float32)
    gram_t = torch.full((k,), float("nan"), dtype=torch.float64) if gram else None

    ref_p = [p.clone() for p in params]
    ref_x, ref_g = x_hist.clone(), g_hist.clone()
    ref_m = masters.clone() if master else None
    args = CombineArgs(ref_p, [g.clone() for g in grads], cols, ref_x, ref_g, coefs, lr.reshape(()), cnt,
                       weight_decay, maximize, gram_t, scale_t, inf_t, sr_seed, ref_m)
    NATIVE.combine(args, {})
    skipped = found_inf is not None and found_inf != 0
    mis = misalign or [0] * len(numels)
    bufs = [Buf(f"param{i}", p, None if skipped else rp, misalign=mis[i]) for i, (p, rp) in
            enumerate(zip(params, ref_p))]
    bufs += [Buf(f"grad{i}", g) for i, g in enumerate(grads)]
    bufs += [Buf("x_hist", x_hist, None if skipped else ref_x),
             Buf("g_hist", g_hist, None if skipped else ref_g),
             Buf("coefs", coefs), Buf("lr", lr), Buf("count", cnt.reshape(1))]
    flags = 0
    if master:
        flags |= F_MASTER
        bufs.append(Buf("master", masters, None if skipped else ref_m))
    if gram:
        flags |= F_OUT
        mag = _gram_magnitudes(params, grads, g_hist, cols, count, k, weight_decay, maximize, grad_scale,
                               ring_slots=k - 1, masters=masters)
        bufs.append(Buf("gram", torch.zeros(k, dtype=torch.float64), gram_t, dots=mag, n_terms=sum(numels),
                        undefined=skipped))
    flags |= _scaler_bufs(bufs, scale_t, inf_t)
    return Case(name, "combine", ring_dtype, numels, cols, row, k, flags,
                m=DTYPE_CODE[dtype] if master else 0, scalars=scalars_of("combine", args), bufs=bufs)


def _effective(params, grads, weight_decay, maximize, grad_scale) -> list[torch.Tensor]:
    sign = -1.0 if maximize else 1.0
    inv = 1.0 / grad_scale if grad_scale else 1.0
    return [g.double() * inv * sign + (weight_decay * p.double() if weight_decay else 0.0)
            for p, g in zip(params, grads)]


def _gram_magnitudes(params, grads, g_hist, cols, count, ndots, weight_decay, maximize, grad_scale,
                     ring_slots, masters=None) -> torch.Tensor:
    """sum_i |g0_i g(age j)_i| per dot j (float64, from the inputs; the weight
    decay on the masters when given)."""
    if masters is not None:
        params = [masters[c:c + p.numel()] for p, c in zip(params, cols)]
    g0 = _effective(params, grads, weight_decay, maximize, grad_scale)
    mags = torch.zeros(ndots, dtype=torch.float64)
    for j in range(ndots):
        for t, c in zip(g0, cols):
            if j == 0:
                h = t
            else:
                slot = (count - j) % ring_slots
                h = g_hist[slot, c:c + t.numel()].double()
            mags[j] += (t.abs() * h.abs()).sum()
    return mags


def gram_case(name: str, dtype: torch.dtype, slots: int, store: bool, numels: list[int], *,
              gen: torch.Generator, weight_decay: float = 0.0, maximize: bool = False,
              grad_scale: float | None = None, found_inf: float | None = None, count: int = 7,
              misalign: list[int] | None = None, odd_cols: tuple[int, ...] = (), gap: int = 0,
              row_pad: int = 0, master: bool = False) -> Case:
    """``master``: 16-bit ``dtype`` gradients, a float32 ring and masters (the
    weight decay's operand; read-only only)."""
    ring_dtype = torch.float32 if master else dtype
    cols, n_cols = _layout(numels, ring_dtype, odd_cols, gap)
    row = n_cols + row_pad
    params = [_rand(n, dtype, gen) for n in numels]
    grads = [_rand(n, dtype, gen, 0.1) for n in numels]
    g_hist = _rand(slots * row, ring_dtype, gen, 0.1).reshape(slots, row)
    masters = _rand(row, torch.float32, gen) if master else None
    ndots = slots if store else slots + 1
    cnt = torch.tensor(count, dtype=torch.int64)
    scale_t = None if grad_scale is None else torch.tensor([grad_scale], dtype=torch.float32)
    inf_t = None if found_inf is None else torch.tensor([found_inf], dtype=torch.float32)
    out = torch.full((ndots,), float("nan"), dtype=torch.float64)
    ref_g = g_hist.clone()
    args = GramArgs(params, grads, cols, ref_g, cnt, weight_decay, maximize, out, store, scale_t, inf_t,
                    masters)
    NATIVE.gram_row(args, {})
    skipped = found_inf is not None and found_inf != 0
    mis = misalign or [0] * len(numels)
    bufs = [Buf(f"param{i}", p, misalign=mis[i]) for i, p in enumerate(params)]
    bufs += [Buf(f"grad{i}", g, misalign=mis[i]) for i, g in enumerate(grads)]
    mag = _gram_magnitudes(params, grads, g_hist, cols, count, ndots, weight_decay, maximize, grad_scale,
                           ring_slots=max(slots, 1), masters=masters)
    bufs += [Buf("g_hist", g_hist, None if skipped else ref_g), Buf("count", cnt.reshape(1)),
             Buf("out", torch.zeros(ndots, dtype=torch.float64), out, dots=mag, n_terms=sum(numels),
                 undefined=skipped)]
    flags = 0
    if master:
        flags |= F_MASTER
        bufs.append(Buf("master", masters))
    flags |= _scaler_bufs(bufs, scale_t, inf_t)
    return Case(name, "gram_row", ring_dtype, numels, cols, row, slots, flags,
                m=DTYPE_CODE[dtype] if master else 0, scalars=scalars_of("gram_row", args), bufs=bufs)


def record_case(name: str, dtype: torch.dtype, slots: int, numels: list[int], *, gen: torch.Generator,
                dots: bool = True, count: int = 7, misalign: list[int] | None = None,
                odd_cols: tuple[int, ...] = (),
                gap: int = 0, row_pad: int = 0) -> Case:
    cols, n_cols = _layout(numels, dtype, odd_cols, gap)
    row = n_cols + row_pad
    sources = [_rand(n, dtype, gen) for n in numels]
    window = _rand(slots * row, dtype, gen).reshape(slots, row)
    cnt = torch.tensor(count, dtype=torch.int64)
    out = torch.full((slots - 1,), float("nan"), dtype=torch.float64) if dots else None
    ref_w = window.clone()
    args = RecordArgs(sources, cols, ref_w, cnt, out)
    NATIVE.rna_record(args, {})
    mis = misalign or [0] * len(numels)
    bufs = [Buf(f"source{i}", s, misalign=mis[i]) for i, s in enumerate(sources)]
    bufs += [Buf("window", window, ref_w), Buf("count", cnt.reshape(1))]
    flags = 0
    if dots:
        flags |= F_OUT
        # r_j = y(age j) - y(age j + 1); y(age 0) the sources, y(age a) slot (count - a) mod S
        def y(a: int, t: torch.Tensor, c: int) -> torch.Tensor:
            return t.double() if a == 0 else window[(count - a) % slots, c:c + t.numel()].double()
        mags = torch.zeros(slots - 1, dtype=torch.float64)
        for t, c in zip(sources, cols):
            r0 = y(0, t, c) - y(1, t, c)
            for j in range(slots - 1):
                mags[j] += (r0.abs() * (y(j, t, c) - y(j + 1, t, c)).abs()).sum()
        bufs.append(Buf("out", torch.zeros(slots - 1, dtype=torch.float64), out, dots=mags,
                        n_terms=sum(numels)))
    return Case(name, "rna_record", dtype, numels, cols, row, slots, flags,
                scalars=scalars_of("rna_record", args), bufs=bufs)


def extrapolate_case(name: str, dtype: torch.dtype, slots: int, m: int, numels: list[int], *,
                     gen: torch.Generator, count: int = 7, misalign: list[int] | None = None,
                     odd_cols: tuple[int, ...] = (), gap: int = 0, row_pad: int = 0) -> Case:
    cols, n_cols = _layout(numels, dtype, odd_cols, gap)
    row = n_cols + row_pad
    outs = [_rand(n, dtype, gen) for n in numels]
    window = _rand(slots * row, dtype, gen).reshape(slots, row)
    cnt = torch.tensor(count, dtype=torch.int64)
    coefs = torch.softmax(torch.randn(m, generator=gen, dtype=torch.float64), 0)
    ref_o = [o.clone() for o in outs]
    args = ExtrapArgs(window, cols, cnt, coefs, ref_o)
    NATIVE.rna_extrapolate(args, {})
    mis = misalign or [0] * len(numels)
    bufs = [Buf(f"out{i}", o, r, misalign=mis[i]) for i, (o, r) in enumerate(zip(outs, ref_o))]
    bufs += [Buf("window", window), Buf("count", cnt.reshape(1)), Buf("coefs", coefs)]
    return Case(name, "rna_extrapolate", dtype, numels, cols, row, slots, 0, m=m,
                scalars=scalars_of("rna_extrapolate", args), bufs=bufs)
