"""The ``native`` backend (the C++/CUDA extension interpolatron._C) against the
torch backend (the oracle), op by op, then whole optimizers.

The CPU kernels run everywhere the extension is built; the tests marked
``gpu`` run the CUDA kernels (skipped without a CUDA device). If the extension
is not built every test here skips with the reason.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _bucket_cases import CASES, Bucket, Case, assert_dots_close, clones, device_scalars, make_bucket, tol
from torch import Tensor

from interpolatron.backends import native_backend
from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs
from interpolatron.backends.torch_backend import BACKEND as ORACLE

_C = native_backend._C
pytestmark = pytest.mark.skipif(
    _C is None, reason=str(native_backend.unavailable_reason(torch.device("cpu"), torch.float32)))
EXT = native_backend.BACKEND

NAN = float("nan")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "fp64", "bf16", "fp16")
KS = (1, 2, 3, 4)
CPU_CHUNK = _C.CPU_CHUNK if _C is not None else 8192
needs_cuda_kernels = pytest.mark.skipif(
    _C is None or not _C.has_cuda(),
    reason=str(native_backend.extension_status()["cuda_reason"]))


# --------------------------------------------------------------------------- bucket layouts


CASES = CASES + (
    # Several chunks per tensor, vector bodies and scalar tails, and a tensor
    # whose ring columns start at an odd offset (unaligned vector loads).
    Case("multi_chunk", ((CPU_CHUNK * 2 + 37,), (3,), (CPU_CHUNK + 1,)), gap=1),
)
CASE_IDS = [c.name for c in CASES]


scalars = device_scalars


def assert_close(got, want, dtype: torch.dtype) -> None:
    if isinstance(got, Tensor):
        got, want = [got], [want]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"tensor {i}: {m}", **tol(dtype))


def flat(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.reshape(-1).double().cpu() for t in tensors])


def cols(ring_row: Tensor, b: Bucket) -> Tensor:
    """The active columns of one ring row, in float64."""
    return flat([ring_row[off:off + p.numel()] for p, off in zip(b.params, b.offsets)])


def scale_for(new: Tensor, others: list[Tensor]) -> Tensor:
    n0 = new.norm()
    return torch.stack([n0 * o.norm() for o in others]) if others else torch.zeros(0, dtype=torch.float64)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=_C.available_cpu_kernels() if _C is not None else ["none"])
def cpu_variant(request):
    """Runs a test with each instruction-set variant of the CPU kernels this
    machine can run, then restores the default choice."""
    before = _C.cpu_kernels()
    assert native_backend.select_cpu_kernels(request.param) == request.param
    yield request.param
    native_backend.select_cpu_kernels(before)


# Each combination exercises maximize, weight decay, gram given / None and a
# count that wraps the ring (large counts included).
OPTIONS = (
    dict(maximize=False, weight_decay=0.0, gram=True, count=0),
    dict(maximize=True, weight_decay=0.01, gram=False, count=7),
    dict(maximize=False, weight_decay=0.1, gram=True, count=2**33 + 5),
)


# --------------------------------------------------------------------------- combine


def run_combine(backend, b: Bucket, x_hist, g_hist, coefs, lr, count, wd, maximize, gram):
    params, xh, gh = clones(b.params), x_hist.clone(), g_hist.clone()
    out = torch.full((coefs.numel(),), NAN, dtype=torch.float64, device=b.device) if gram else None
    backend.combine(CombineArgs(params, b.grads, b.offsets, xh, gh, coefs, lr, count, wd, maximize, out), {})
    return params, xh, gh, out


def check_interpolatron(b: Bucket, k: int, opts: dict) -> None:
    coefs, lr, count = scalars(k, opts["count"], b.device)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    args = (b, x_hist, g_hist, coefs, lr, count, opts["weight_decay"], opts["maximize"], opts["gram"])
    got = run_combine(EXT, *args)
    want = run_combine(ORACLE, *args)
    assert_close(got[0], want[0], b.dtype)
    # The old params land in slot count mod (k-1) unchanged (a copy), the
    # effective gradients rounded once; every other column keeps its value.
    assert torch.equal(got[1], want[1])
    assert_close(got[2], want[2], b.dtype)
    untouched = ~b.owned()
    assert torch.equal(got[1][:, untouched], x_hist[:, untouched])
    assert torch.equal(got[2][:, untouched], g_hist[:, untouched])
    if opts["gram"]:
        g0 = flat(b.grads) * (-1 if opts["maximize"] else 1) + opts["weight_decay"] * flat(b.params)
        others = [g0] + [cols(g_hist[(opts["count"] - j) % (k - 1)], b) for j in range(1, k)]
        assert_dots_close(got[3], want[3], scale_for(g0, others), b.dtype, weight_decay=opts["weight_decay"])


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_combine_interpolatron(case, dtype, k):
    b = make_bucket(case, dtype)
    for opts in OPTIONS:
        check_interpolatron(b, k, opts)


@pytest.mark.parametrize("k", (5, 9, 12))
def test_combine_long_history(k):
    """k beyond one register group of dots (8): the Gram row needs several groups."""
    b = make_bucket(CASES[-1], torch.float32)
    check_interpolatron(b, k, OPTIONS[0])
    check_interpolatron(b, k, OPTIONS[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_cpu_variant(cpu_variant, dtype):
    """Each instruction-set variant of the CPU kernels (baseline, AVX2, AVX-512)
    against the oracle on every op."""
    b = make_bucket(CASES[-1], dtype)
    for k in (1, 3):
        check_interpolatron(b, k, OPTIONS[0])
        check_interpolatron(b, k, OPTIONS[1])
    check_gram_row(b, 3, OPTIONS[2])
    check_rna_record(b, 4, 6, with_out=True)
    check_rna_extrapolate(b, 4, 3, 5)


def test_gram_given_as_strided_view():
    """The Gram row may be a view (a row of a bigger matrix): written through its stride."""
    b = make_bucket(CASES[0], torch.float32)
    coefs, lr, count = scalars(3, 4)
    x_hist, g_hist = b.ring(2), b.ring(2)
    big = torch.full((3, 3), NAN, dtype=torch.float64)
    EXT.combine(CombineArgs(clones(b.params), b.grads, b.offsets, x_hist.clone(), g_hist.clone(), coefs, lr,
                            count, 0.0, False, big[:, 1]), {})
    want = run_combine(ORACLE, b, x_hist, g_hist, coefs, lr, count, 0.0, False, True)[3]
    torch.testing.assert_close(big[:, 1], want, rtol=1e-5, atol=1e-4)
    assert big[:, [0, 2]].isnan().all()


# --------------------------------------------------------------------------- gram_row


def check_gram_row(b: Bucket, k: int, opts: dict, store: bool = True) -> None:
    """k dots <g0, g(age j)>. store: a k-slot ring whose slot c mod k takes g0;
    read-only (Anderson): a (k-1)-slot ring of ages 1..k-1 that stays bitwise."""
    count = torch.tensor(opts["count"], device=b.device)
    slots = k if store else k - 1
    g_hist = b.ring(slots)
    if store:
        b.poison(g_hist, opts["count"] % k)  # written, never read
    res = []
    for backend in (EXT, ORACLE):
        gh = g_hist.clone()
        out = torch.full((k,), NAN, dtype=torch.float64, device=b.device)
        backend.gram_row(GramArgs(b.params, b.grads, b.offsets, gh, count, opts["weight_decay"],
                                  opts["maximize"], out, store=store), {})
        res.append((gh, out))
    (gh, out), (gh_ref, out_ref) = res
    if store:
        assert_close(gh, gh_ref, b.dtype)
        untouched = ~b.owned()
        assert torch.equal(gh[:, untouched], g_hist[:, untouched])
    else:
        assert torch.equal(gh, g_hist), "the read-only Gram pass wrote into the ring"
    g0 = flat(b.grads) * (-1 if opts["maximize"] else 1) + opts["weight_decay"] * flat(b.params)
    others = [g0] + [cols(g_hist[(opts["count"] - j) % slots], b) for j in range(1, k)]
    assert_dots_close(out, out_ref, scale_for(g0, others), b.dtype, weight_decay=opts["weight_decay"])


@pytest.mark.parametrize("store", (True, False), ids=("store", "read_only"))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gram_row(case, dtype, k, store):
    b = make_bucket(case, dtype)
    for opts in OPTIONS:
        check_gram_row(b, k, opts, store)


@pytest.mark.parametrize("k", (8, 9, 17))
@pytest.mark.parametrize("store", (True, False), ids=("store", "read_only"))
def test_gram_row_many_groups(k, store):
    check_gram_row(make_bucket(CASES[-1], torch.float32), k, OPTIONS[1], store)


# --------------------------------------------------------------------------- RNA


def check_rna_record(b: Bucket, slots: int, count: int, with_out: bool) -> None:
    window = b.ring(slots)
    b.poison(window, count % slots)  # never read, overwritten with the sources
    res = []
    for backend in (EXT, ORACLE):
        w = window.clone()
        out = torch.full((slots - 1,), NAN, dtype=torch.float64) if with_out else None
        backend.rna_record(RecordArgs(b.params, b.offsets, w, torch.tensor(count), out), {})
        res.append((w, out))
    (w, out), (w_ref, out_ref) = res
    assert torch.equal(w, w_ref)  # a copy: bit exact
    if with_out:
        ys = [flat(b.params)] + [cols(window[(count - a) % slots], b) for a in range(1, slots)]
        r = [ys[j] - ys[j + 1] for j in range(slots - 1)]
        assert_dots_close(out, out_ref, scale_for(r[0], r) if r else torch.zeros(0), b.dtype)


@pytest.mark.parametrize("slots", (1, 2, 4, 11))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rna_record(case, dtype, slots):
    b = make_bucket(case, dtype)
    for count, with_out in ((0, True), (3, False), (2**32 + 1, True)):
        check_rna_record(b, slots, count, with_out)


def check_rna_extrapolate(b: Bucket, slots: int, m: int, count: int) -> None:
    window = b.ring(slots)
    read = {(count - 1 - a) % slots for a in range(m)}
    for s in set(range(slots)) - read:
        b.poison(window, s)  # slots outside the m newest must not leak in
    coefs = torch.randn(m, dtype=torch.float64)
    res = []
    for backend in (EXT, ORACLE):
        outs = [torch.full_like(p, NAN) for p in b.params]
        backend.rna_extrapolate(ExtrapArgs(window, b.offsets, torch.tensor(count), coefs, outs), {})
        res.append(outs)
    assert_close(res[0], res[1], b.dtype)


@pytest.mark.parametrize("slots,m", [(1, 1), (3, 3), (5, 2), (12, 12)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rna_extrapolate(case, dtype, slots, m):
    b = make_bucket(case, dtype)
    for count in (1, slots + 2, 2**31 + 7):
        check_rna_extrapolate(b, slots, m, count)


def test_rna_extrapolate_into_the_recorded_tensors():
    """Online mode writes the extrapolation into the very tensors that were recorded."""
    b = make_bucket(CASES[3], torch.float32)
    window, coefs, count = b.ring(4), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor(6)
    mine, ref = clones(b.params), clones(b.params)
    EXT.rna_extrapolate(ExtrapArgs(window, b.offsets, count, coefs, mine), {})
    ORACLE.rna_extrapolate(ExtrapArgs(window, b.offsets, count, coefs, ref), {})
    assert_close(mine, ref, torch.float32)


# --------------------------------------------------------------------------- determinism


def _all_ops(b: Bucket, k: int = 3, slots: int = 5) -> list[Tensor]:
    """Every output of every op, on fixed inputs."""
    torch.manual_seed(1234)
    coefs, lr, count = scalars(k, 11)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    outs = list(run_combine(EXT, b, x_hist, g_hist, coefs, lr, count, 0.01, False, True))
    outs = outs[0] + outs[1:]
    gh, gout = b.ring(k), torch.zeros(k, dtype=torch.float64)
    EXT.gram_row(GramArgs(b.params, b.grads, b.offsets, gh, count, 0.0, True, gout, store=True), {})
    window, rout = b.ring(slots), torch.zeros(slots - 1, dtype=torch.float64)
    EXT.rna_record(RecordArgs(b.params, b.offsets, window, count, rout), {})
    ext = [torch.empty_like(p) for p in b.params]
    EXT.rna_extrapolate(ExtrapArgs(window, b.offsets, count + 1, coefs, ext), {})
    return outs + [gh, gout, window, rout] + ext


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64),
                         ids=("fp32", "bf16", "fp64"))
def test_bitwise_deterministic_across_thread_counts(dtype):
    """Chunk boundaries never depend on the thread count, so neither do the bits."""
    b = make_bucket(Case("big", ((CPU_CHUNK * 9 + 5,), (CPU_CHUNK * 4,), (77,))), dtype)
    runs = []
    for n in (1, 2, 4):
        with num_threads(n):
            runs.append(_all_ops(b))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c) or (a.isnan() == c.isnan()).all() and torch.equal(
                a.nan_to_num(), c.nan_to_num())


def test_threads_restored():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- inputs


def test_dense_non_contiguous_stays_fused_in_storage_order(monkeypatch):
    """A dense but non-contiguous (transposed, channels_last) parameter runs on the
    fused kernels, elementwise in storage order (the ring order of every backend)."""
    monkeypatch.setattr(native_backend, "_fallback", lambda op: pytest.fail(f"{op} fell back"))
    p = torch.randn(7, 5).t()
    g = torch.randn(7, 5).t()
    coefs, lr, count = scalars(2, 1)
    x_hist, g_hist = torch.randn(1, 35), torch.randn(1, 35)
    mine = [p.clone().t().contiguous().t()]  # same strides as p
    assert not mine[0].is_contiguous()
    xh, gh = x_hist.clone(), g_hist.clone()
    EXT.combine(CombineArgs(mine, [g], [0], xh, gh, coefs, lr, count, 0.0, False, None), {})
    ref = [p.clone()]
    xr, gr = x_hist.clone(), g_hist.clone()
    ORACLE.combine(CombineArgs(ref, [g], [0], xr, gr, coefs, lr, count, 0.0, False, None), {})
    torch.testing.assert_close(mine[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xh, xr, rtol=0, atol=0)
    torch.testing.assert_close(gh, gr, rtol=0, atol=0)
    assert torch.equal(xh[0], p.t().reshape(-1))  # storage order of p


def test_non_dense_falls_back_to_the_reference():
    """A tensor with gaps (a strided slice) runs that call on the torch backend."""
    base = torch.randn(7, 10)
    p = base[:, ::2]
    g = torch.randn(7, 5)
    coefs, lr, count = scalars(2, 1)
    x_hist, g_hist = torch.randn(1, 35), torch.randn(1, 35)
    mine = [base.clone()[:, ::2]]
    xh, gh = x_hist.clone(), g_hist.clone()
    with pytest.warns(RuntimeWarning, match="non-contiguous") if not native_backend._warned_fallback else \
            contextlib.nullcontext():
        EXT.combine(CombineArgs(mine, [g], [0], xh, gh, coefs, lr, count, 0.0, False, None), {})
    ref = [p.clone()]
    xr, gr = x_hist.clone(), g_hist.clone()
    ORACLE.combine(CombineArgs(ref, [g], [0], xr, gr, coefs, lr, count, 0.0, False, None), {})
    assert torch.equal(mine[0], ref[0]) and torch.equal(xh, xr) and torch.equal(gh, gr)


def test_writes_bump_version_counters():
    """Like in-place torch ops, so autograd notices a saved tensor modified by a step."""
    b = make_bucket(CASES[0], torch.float32)
    coefs, lr, count = scalars(2, 0)
    x_hist, g_hist, gram = b.ring(1), b.ring(1), torch.zeros(2, dtype=torch.float64)
    before = [t._version for t in b.params + [x_hist, g_hist, gram]]
    EXT.combine(CombineArgs(b.params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, 0.0, False,
                            gram), {})
    after = [t._version for t in b.params + [x_hist, g_hist, gram]]
    assert all(a > v for a, v in zip(after, before))
    w = torch.nn.Parameter(torch.randn(4))
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        EXT.combine(CombineArgs([w], [torch.ones(4)], [0], torch.zeros(0, 4), torch.zeros(0, 4),
                                torch.ones(1, dtype=torch.float64), lr, count, 0.0, False, None), {})
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_bucket_writes_zero_dots():
    coefs, lr, count = scalars(3, 2)
    gram = torch.full((3,), NAN, dtype=torch.float64)
    EXT.combine(CombineArgs([], [], [], torch.zeros(2, 0), torch.zeros(2, 0), coefs, lr, count, 0.0, False,
                            gram), {})
    assert torch.equal(gram, torch.zeros(3, dtype=torch.float64))
    out = torch.full((3,), NAN, dtype=torch.float64)
    EXT.gram_row(GramArgs([], [], [], torch.zeros(3, 10), count, 0.0, False, out, store=True), {})
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))


def test_mismatched_dtype_raises():
    b = make_bucket(CASES[0], torch.float32)
    coefs, lr, count = scalars(2, 0)
    with pytest.raises(TypeError, match="dtype"):
        EXT.combine(CombineArgs(b.params, b.grads, b.offsets, b.ring(1).double(), b.ring(1).double(), coefs,
                                lr, count, 0.0, False, None), {})


def test_bad_layout_raises():
    b = make_bucket(CASES[0], torch.float32)
    coefs, lr, count = scalars(3, 0)
    with pytest.raises(ValueError, match="slots"):
        EXT.combine(CombineArgs(b.params, b.grads, b.offsets, b.ring(1), b.ring(1), coefs, lr, count, 0.0,
                                False, None), {})
    with pytest.raises(ValueError, match="does not fit"):
        EXT.combine(CombineArgs(b.params, b.grads, [o + b.n for o in b.offsets], b.ring(2), b.ring(2), coefs,
                                lr, count, 0.0, False, None), {})


# --------------------------------------------------------------------------- availability


def test_status_and_reasons():
    st = native_backend.extension_status()
    assert st["loaded"] and st["cpu_kernels"] and st["reason"] is None
    assert st["cpu_variant"] in st["cpu_variants_available"]
    assert native_backend.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert "int32" in native_backend.unavailable_reason(torch.device("cpu"), torch.int32)
    if not _C.has_cuda():
        assert st["cuda_kernels"] is False
        why = native_backend.unavailable_reason(torch.device("cuda"), torch.float32)
        assert "without CUDA kernels" in why and "pip install --no-build-isolation -e ." in why
        assert st["cuda_reason"] == why
    assert "meta" in native_backend.unavailable_reason(torch.device("meta"), torch.float32)
    with pytest.raises(ValueError, match="CPU and CUDA"):
        _C.combine(CombineArgs([], [], [], torch.zeros(0, 0, device="meta"), torch.zeros(0, 0, device="meta"),
                               torch.ones(1, dtype=torch.float64), torch.ones((), dtype=torch.float64),
                               torch.zeros((), dtype=torch.int64), 0.0, False, None), None)


def test_dispatch_prefers_the_extension_on_cpu():
    from interpolatron.backends import resolve

    assert resolve("auto", torch.device("cpu"), torch.float32) is EXT
    assert resolve("native", torch.device("cpu"), torch.bfloat16) is EXT


# --------------------------------------------------------------------------- CUDA kernels


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_ops_against_oracle(case, dtype):
    b = make_bucket(case, dtype, "cuda")
    for k in (1, 2, 4, 10):
        for opts in OPTIONS:
            coefs, lr, count = scalars(k, opts["count"], "cuda")
            x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
            args = (b, x_hist, g_hist, coefs, lr, count, opts["weight_decay"], opts["maximize"], opts["gram"])
            got, want = run_combine(EXT, *args), run_combine(ORACLE, *args)
            assert_close(got[0], want[0], dtype)
            assert torch.equal(got[1], want[1])
            assert_close(got[2], want[2], dtype)
            if opts["gram"]:
                g0 = flat(b.grads) * (-1 if opts["maximize"] else 1) + opts["weight_decay"] * flat(b.params)
                others = [g0] + [cols(g_hist[(opts["count"] - j) % (k - 1)], b) for j in range(1, k)]
                assert_dots_close(got[3], want[3], scale_for(g0, others), dtype,
                                  weight_decay=opts["weight_decay"])
            check_gram_row(b, k, opts, store=False)
    for k in (1, 3, 9):
        g_hist = b.ring(k)
        b.poison(g_hist, 5 % k)
        res = []
        for backend in (EXT, ORACLE):
            gh, out = g_hist.clone(), torch.full((k,), NAN, dtype=torch.float64, device="cuda")
            backend.gram_row(GramArgs(b.params, b.grads, b.offsets, gh, torch.tensor(5, device="cuda"), 0.01,
                                      True, out, store=True), {})
            res.append((gh, out))
        assert_close(res[0][0], res[1][0], dtype)
        g0 = -flat(b.grads) + 0.01 * flat(b.params)
        others = [g0] + [cols(g_hist[(5 - j) % k], b) for j in range(1, k)]
        assert_dots_close(res[0][1], res[1][1], scale_for(g0, others), dtype, weight_decay=0.01)
    for slots in (1, 3, 10):
        window = b.ring(slots)
        b.poison(window, 4 % slots)
        res = []
        for backend in (EXT, ORACLE):
            w, out = window.clone(), torch.full((slots - 1,), NAN, dtype=torch.float64, device="cuda")
            backend.rna_record(RecordArgs(b.params, b.offsets, w, torch.tensor(4, device="cuda"), out), {})
            res.append((w, out))
        assert torch.equal(res[0][0], res[1][0])
        ys = [flat(b.params)] + [cols(window[(4 - a) % slots], b) for a in range(1, slots)]
        r = [ys[j] - ys[j + 1] for j in range(slots - 1)]
        assert_dots_close(res[0][1], res[1][1], scale_for(r[0], r) if r else torch.zeros(0), dtype)
        coefs = torch.randn(slots, dtype=torch.float64, device="cuda")
        outs = [[torch.full_like(p, NAN) for p in b.params] for _ in range(2)]
        EXT.rna_extrapolate(ExtrapArgs(window, b.offsets, torch.tensor(9, device="cuda"), coefs, outs[0]), {})
        ORACLE.rna_extrapolate(ExtrapArgs(window, b.offsets, torch.tensor(9, device="cuda"), coefs,
                                          outs[1]), {})
        assert_close(outs[0], outs[1], dtype)


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_tables_are_cached_and_rebuilt():
    b = make_bucket(CASES[2], torch.float32, "cuda")
    coefs, lr, count = scalars(2, 0, "cuda")
    x_hist, g_hist, cache = b.ring(1), b.ring(1), {}
    for _ in range(3):
        EXT.combine(CombineArgs(b.params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, 0.0, False,
                                None), cache)
    tables = cache[("native_backend.tables", "combine")]
    assert tables.uploads == 1
    b.grads[0] = b.grads[0].clone()  # a new storage: the table must follow it
    EXT.combine(CombineArgs(b.params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, 0.0, False,
                            None), cache)
    assert tables.uploads == 2


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_bitwise_reproducible():
    """Two-stage reductions without atomics: the same bits on every run."""
    b = make_bucket(Case("big", (((1 << 20) + 3,), (4097,))), torch.float32, "cuda")
    coefs, lr, count = scalars(3, 7, "cuda")
    x_hist, g_hist = b.ring(2), b.ring(2)
    grams, params = [], []
    for _ in range(3):
        params.append(run_combine(EXT, b, x_hist, g_hist, coefs, lr, count, 0.01, False, True)[0])
        grams.append(run_combine(EXT, b, x_hist, g_hist, coefs, lr, count, 0.01, False, True)[3])
    for other in range(1, 3):
        assert torch.equal(grams[0], grams[other])
        assert all(torch.equal(a, c) for a, c in zip(params[0], params[other]))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_cuda_graph_capture_replays_new_lr(dtype):
    """Capture one combine step (and the count increment), change lr and the
    coefficients in place, replay: the kernels read the new values, as the
    torch backend computes them."""
    b = make_bucket(CASES[3], dtype, "cuda")
    k = 3
    coefs, lr, count = scalars(k, 0, "cuda")
    x_hist, g_hist, gram = b.ring(k - 1), b.ring(k - 1), torch.zeros(k, dtype=torch.float64, device="cuda")
    params, cache = clones(b.params), {}

    def step():
        EXT.combine(CombineArgs(params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, 0.01, False,
                                gram), cache)
        count.add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: builds the device tables outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for new_lr in (0.05, 0.3):
        ref_params, ref_x, ref_g = clones(params), x_hist.clone(), g_hist.clone()
        ref_count, ref_gram = count.clone(), torch.zeros_like(gram)
        lr.fill_(new_lr)
        coefs.copy_(coefs.flip(0))
        graph.replay()
        ORACLE.combine(CombineArgs(ref_params, b.grads, b.offsets, ref_x, ref_g, coefs, lr, ref_count, 0.01,
                                   False, ref_gram), {})
        torch.cuda.synchronize()
        assert_close(params, ref_params, dtype)
        assert torch.equal(x_hist, ref_x)
        assert_close(g_hist, ref_g, dtype)
        assert int(count) == int(ref_count) + 1
        torch.testing.assert_close(gram, ref_gram, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- optimizers


def _optimizers():
    import interpolatron

    return interpolatron


def _model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(
        device=device, dtype=dtype)


def _batches(n, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 7, generator=g).to(device, dtype),
             torch.randn(16, 3, generator=g).to(device, dtype)) for _ in range(n)]


def _train(make_opt, backend, steps=12, dtype=torch.float32, device="cpu"):
    model = _model(dtype, device)
    opt = make_opt(model.parameters(), backend)
    traj = []
    for x, y in _batches(steps, dtype, device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        traj.append(torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()]))
    return torch.stack(traj)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_kernels])])
@pytest.mark.parametrize("alphas,wd,maximize", [((1.0,), 0.0, False), ((0.05, 0.95), 2e-4, False),
                                                ((0.1, 0.3, 0.6), 0.0, True)])
def test_interpolatron_trajectory(alphas, wd, maximize, device):
    ip = _optimizers()

    def make(params, backend):
        return ip.Interpolatron(params, lr=0.05, alphas=alphas, weight_decay=wd, maximize=maximize,
                                backend=backend)

    torch.testing.assert_close(_train(make, "native", device=device), _train(make, "torch", device=device),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_kernels])])
@pytest.mark.parametrize("history,constraint", [(2, None), (3, "simplex"), (4, None)])
def test_anderson_trajectory(history, constraint, device):
    ip = _optimizers()

    def make(params, backend):
        return ip.Anderson(params, lr=0.05, history=history, reg=1e-6, constraint=constraint,
                           weight_decay=1e-4, backend=backend)

    # The coefficients are refit from Gram rows whose last bits differ between
    # the kernels' float32-per-chunk and the oracle's float64 dot products.
    torch.testing.assert_close(_train(make, "native", device=device), _train(make, "torch", device=device),
                               rtol=1e-4, atol=1e-5)


def _flat_params(model) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_kernels])])
@pytest.mark.parametrize("residual,mode", [("iterates", "offline"), ("iterates", "online"),
                                           ("gradients", "offline")])
def test_rna_trajectory(residual, mode, device):
    ip = _optimizers()
    results = {}
    for backend in ("native", "torch"):
        model = _model(device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rna = ip.RNA(model, window=4, residual=residual, mode=mode, optimizer=opt, backend=backend)
        traj = []
        for i, (x, y) in enumerate(_batches(20, device=device)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if i % 3 == 2:
                rna.record()
                traj.append(_flat_params(model))
        extrapolated = rna.extrapolate()
        traj.append(torch.cat([extrapolated[n].detach().reshape(-1).double().cpu()
                               for n, _ in model.named_parameters()]))
        results[backend] = torch.stack(traj)
    # The coefficients come from a small solve on Gram entries whose last bits
    # differ (float32 per chunk in the kernels, float64 in the oracle).
    torch.testing.assert_close(results["native"], results["torch"], rtol=1e-4, atol=1e-5)
