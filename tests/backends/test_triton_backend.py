"""The Triton backend against the torch backend (the oracle), op by op.

On a CPU-only machine the kernels run in Triton's interpreter (the conftest
sets TRITON_INTERPRET=1 before anything imports Triton). On a CUDA machine the
conftest leaves it unset, so the same tests run compiled on the GPU, plus the
``gpu`` ones (CUDA-graph replay, > 2^31 elements, default block sizes).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_cases import (  # noqa: E402
    CASES,
    DTYPE_IDS,
    DTYPES,
    QUICK_CASES,
    QUICK_IDS,
    Case,
    assert_dots_close,
    assert_lists_close,
    case_dtype_params,
    clones,
    device_scalars,
    kernel_device,
    kernels_interpreted,
    make_bucket,
    nan_like,
    tol,
)

from interpolatron.backends import triton_backend  # noqa: E402
from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs
from interpolatron.backends.torch_backend import BACKEND as ORACLE  # noqa: E402
from interpolatron.backends.triton_backend import BACKEND as TRITON  # noqa: E402
from interpolatron.triton_kernels import _launch  # noqa: E402

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="the Triton kernels are compiled natively and there is no CUDA device")
native_only = pytest.mark.skipif(
    kernels_interpreted(),
    reason="the kernels run in Triton's CPU interpreter (no CUDA device, or TRITON_INTERPRET=1)")

NAN = float("nan")
TEST_BLOCK = 16
KS = (1, 2, 3, 4)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # With blocks of 16 elements the small test tensors span full (unmasked)
    # blocks and masked tails, and the interpreter stays fast.
    monkeypatch.setenv(_launch.BLOCK_ENV, str(TEST_BLOCK))


def _gram_scale(new: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    n0 = new.double().norm()
    return torch.stack([n0 * o.double().norm() for o in others])


def _flat(tensors: list[torch.Tensor], n_cols: int, offsets: list[int], dtype) -> torch.Tensor:
    """The bucket's effective columns gathered from the tensors, in fp64."""
    out = torch.zeros(n_cols, dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    for t, off in zip(tensors, offsets):
        out[off:off + t.numel()] = t.reshape(-1).double()
    return out


# --------------------------------------------------------------------------- availability


def test_unavailable_reason_names_the_fix():
    if kernels_interpreted():
        assert triton_backend.unavailable_reason(torch.device("cpu"), torch.float32) is None
        why = triton_backend.unavailable_reason(torch.device("cuda"), torch.float32)
        assert why is not None and "TRITON_INTERPRET" in why
    else:
        why = triton_backend.unavailable_reason(torch.device("cpu"), torch.float32)
        assert why is not None and "CUDA" in why and "TRITON_INTERPRET=1" in why
        assert triton_backend.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None
    assert triton_backend.unavailable_reason(torch.device(DEVICE), torch.int32) is not None
    for dtype in DTYPES:
        assert triton_backend.unavailable_reason(torch.device(DEVICE), dtype) is None


# --------------------------------------------------------------------------- combine


def _combine_both(b, k, count, *, weight_decay=0.0, maximize=False, gram=False):
    """Run the oracle and Triton on identical copies; return both final states."""
    coefs, lr, cnt = device_scalars(k, count, DEVICE)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    states = []
    for backend in (ORACLE, TRITON):
        params = clones(b.params)
        xh, gh = x_hist.clone(), g_hist.clone()
        out = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE) if gram else None
        backend.combine(CombineArgs(params, b.grads, b.offsets, xh, gh, coefs, lr, cnt, weight_decay,
                                    maximize, out), {})
        states.append((params, xh, gh, out))
    return states


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case,dtype", case_dtype_params())
def test_combine_matches_torch(case: Case, dtype, k):
    b = make_bucket(case, dtype, DEVICE)
    (p0, x0, g0, _), (p1, x1, g1, _) = _combine_both(b, k, count=3 * k + 1)
    assert_lists_close(p1, p0, dtype)
    assert_lists_close([x1, g1], [x0, g0], dtype)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", QUICK_CASES, ids=QUICK_IDS)
def test_combine_weight_decay_maximize_gram(case: Case, dtype, k, maximize):
    b = make_bucket(case, dtype, DEVICE)
    wd = 0.05 if maximize else 0.0  # without weight decay the Gram row is held to D3's bound
    (p0, x0, g0, r0), (p1, x1, g1, r1) = _combine_both(
        b, k, count=2 * k + 3, weight_decay=wd, maximize=maximize, gram=True)
    assert_lists_close(p1, p0, dtype)
    assert_lists_close([x1, g1], [x0, g0], dtype)
    # Scale of the Gram entries: the effective gradient against each ring row.
    sign = -1.0 if maximize else 1.0
    eff = [sign * g.double() + wd * p.double() for g, p in zip(b.grads, b.params)]
    new = _flat(eff, b.n, b.offsets, dtype)
    assert_dots_close(r1, r0, _gram_scale(new, [new] + [row.double() for row in g0]), dtype, weight_decay=wd)


def test_combine_writes_the_oldest_slot_with_old_param_and_effective_grad():
    """Exact slot bookkeeping, independent of the oracle: count = 5, k = 3 -> slot 1."""
    b = make_bucket(CASES[0], torch.float64, DEVICE)
    k, count, wd = 3, 5, 0.25
    coefs, lr, cnt = device_scalars(k, count, DEVICE)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    xh, gh, params = x_hist.clone(), g_hist.clone(), clones(b.params)
    TRITON.combine(CombineArgs(params, b.grads, b.offsets, xh, gh, coefs, lr, cnt, wd, True, None), {})
    slot, age2 = count % (k - 1), (count - 2) % (k - 1)
    old = _flat(b.params, b.n, b.offsets, torch.float64)
    eff = _flat([-g + wd * p for g, p in zip(b.grads, b.params)], b.n, b.offsets, torch.float64)
    assert torch.equal(xh[slot], old) and torch.equal(gh[slot], eff)
    assert torch.equal(xh[1 - slot], x_hist[1 - slot]) and torch.equal(gh[1 - slot], g_hist[1 - slot])
    a = coefs.double()
    # slot (count - 1) mod 2 holds age 1, slot (count - 2) mod 2 age 2 (before the write).
    age1 = (count - 1) % (k - 1)
    want = (a[0] * old + a[1] * x_hist[age1] + a[2] * x_hist[age2]
            - lr * (a[0] * eff + a[1] * g_hist[age1] + a[2] * g_hist[age2]))
    torch.testing.assert_close(_flat(params, b.n, b.offsets, torch.float64), want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
def test_combine_trajectory_wraps_the_ring(dtype):
    """Successive steps (count 0, 1, 2, ...) with fresh gradients: both backends
    carry the same rings through several wraps."""
    b = make_bucket(CASES[3], dtype, DEVICE)
    k = 3
    coefs, lr, _ = device_scalars(k, 0, DEVICE)
    start = (b.ring(k - 1), b.ring(k - 1))
    state = {be: (clones(b.params), start[0].clone(), start[1].clone()) for be in (ORACLE, TRITON)}
    caches = {ORACLE: {}, TRITON: {}}
    for step in range(2 * k + 2):
        grads = [torch.randn_like(p) for p in b.params]
        cnt = torch.tensor(step, device=DEVICE)
        lr.fill_(0.1 / (1 + step))
        for be, (params, xh, gh) in state.items():
            be.combine(CombineArgs(params, grads, b.offsets, xh, gh, coefs, lr, cnt, 0.01, False,
                                   None), caches[be])
        assert_lists_close(state[TRITON][0], state[ORACLE][0], dtype)
        assert_lists_close(list(state[TRITON][1:]), list(state[ORACLE][1:]), dtype)
        if dtype == torch.bfloat16:
            # Restart from the oracle's state (in place: the tables stay valid) so
            # that one-ulp differences do not compound over the steps.
            for mine, ref in zip(state[TRITON][0] + list(state[TRITON][1:]),
                                 state[ORACLE][0] + list(state[ORACLE][1:])):
                mine.copy_(ref)


def test_combine_rejects_bad_rings():
    b = make_bucket(CASES[0], torch.float32, DEVICE)
    coefs, lr, cnt = device_scalars(3, 0, DEVICE)
    with pytest.raises(ValueError, match="slots"):
        TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, b.ring(2), b.ring(3), coefs, lr, cnt, 0.0,
                                   False, None), {})


# --------------------------------------------------------------------------- gram_row


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case,dtype", case_dtype_params())
def test_gram_row_matches_torch(case: Case, dtype, k):
    b = make_bucket(case, dtype, DEVICE)
    count = 3 * k + 2
    wd, maximize = (0.1, k % 2 == 0) if case.name != "subset" else (0.0, True)
    # The slot about to be written is never read: poison it.
    g_hist = b.ring(k, poison_slot=count % k)
    outs = []
    for backend in (ORACLE, TRITON):
        gh = g_hist.clone()
        out = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE)
        backend.gram_row(GramArgs(b.params, b.grads, b.offsets, gh, torch.tensor(count, device=DEVICE), wd,
                                  maximize, out, store=True), {})
        outs.append((gh, out))
    (gh0, out0), (gh1, out1) = outs
    assert torch.isfinite(gh1).all(), "the poisoned slot must be overwritten"
    assert_lists_close([gh1], [gh0], dtype)
    new = gh0[count % k].double()
    olders = [gh0[(count - j) % k].double() for j in range(k)]
    assert_dots_close(out1, out0, _gram_scale(new, olders), dtype, weight_decay=wd)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case,dtype", case_dtype_params())
def test_gram_row_read_only_matches_torch(case: Case, dtype, k):
    """Anderson's Gram pass: a (k-1)-slot ring of ages 1..k-1, left bitwise as it was."""
    b = make_bucket(case, dtype, DEVICE)
    count = 3 * k + 2
    wd, maximize = (0.1, k % 2 == 1) if case.name != "subset" else (0.0, True)
    g_hist = b.ring(k - 1)
    outs = []
    for backend in (ORACLE, TRITON):
        gh = g_hist.clone()
        out = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE)
        backend.gram_row(GramArgs(b.params, b.grads, b.offsets, gh, torch.tensor(count, device=DEVICE), wd,
                                  maximize, out, store=False), {})
        assert torch.equal(gh, g_hist), f"{backend.name}: the read-only Gram pass wrote into the ring"
        outs.append(out)
    g0 = torch.cat([g.reshape(-1) for g in b.grads]).double() * (-1 if maximize else 1)
    if wd:
        g0 = g0 + wd * torch.cat([p.reshape(-1) for p in b.params]).double()
    olders = [g0] + [g_hist[(count - j) % (k - 1)].double() for j in range(1, k)]
    assert_dots_close(outs[1], outs[0], _gram_scale(g0, olders), dtype, weight_decay=wd)


def test_gram_row_without_weight_decay_ignores_params():
    """params are read only when weight_decay != 0: NaN params must not leak in."""
    b = make_bucket(CASES[0], torch.float32, DEVICE)
    k, count = 3, 4
    gh0 = b.ring(k)
    gh1 = gh0.clone()
    out0 = torch.empty(k, dtype=torch.float64, device=DEVICE)
    out1 = torch.empty_like(out0)
    cnt = torch.tensor(count, device=DEVICE)
    ORACLE.gram_row(GramArgs(b.params, b.grads, b.offsets, gh0, cnt, 0.0, False, out0, store=True), {})
    TRITON.gram_row(GramArgs(nan_like(b.params), b.grads, b.offsets, gh1, cnt, 0.0, False, out1,
                             store=True), {})
    torch.testing.assert_close(gh1, gh0, **tol(torch.float32))
    assert torch.isfinite(out1).all()
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- RNA


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
@pytest.mark.parametrize("case,dtype", case_dtype_params())
def test_rna_record_matches_torch(case: Case, dtype, slots):
    b = make_bucket(case, dtype, DEVICE)
    count = 2 * slots + 1
    window = b.ring(slots, poison_slot=count % slots)  # slot c mod S is never read
    with_out = slots > 1  # the oracle has no differences to form with one slot
    results = []
    for backend in (ORACLE, TRITON):
        w = window.clone()
        out = torch.full((slots - 1,), NAN, dtype=torch.float64, device=DEVICE) if with_out else None
        backend.rna_record(RecordArgs(b.params, b.offsets, w, torch.tensor(count, device=DEVICE), out), {})
        results.append((w, out))
    (w0, out0), (w1, out1) = results
    assert torch.isfinite(w1).all(), "the poisoned slot must be overwritten"
    assert_lists_close([w1], [w0], dtype)
    if with_out:
        snaps = [_flat(b.params, b.n, b.offsets, dtype)]
        snaps += [w0[(count - a) % slots].double() for a in range(1, slots)]
        r = [snaps[j] - snaps[j + 1] for j in range(slots - 1)]
        assert_dots_close(out1, out0, _gram_scale(r[0], r), dtype)


def test_rna_record_differences_before_products():
    """Nearly equal snapshots of large magnitude: differences taken elementwise
    keep the Gram of residuals exact where a Gram of raw snapshots would not."""
    n, slots, count = 50, 3, 3
    base = torch.full((n,), 1e4, dtype=torch.float32, device=DEVICE)
    steps = [torch.randn(n, device=DEVICE) * 1e-2 for _ in range(slots)]
    window = torch.zeros(slots, n, device=DEVICE)
    window[(count - 1) % slots] = base + steps[1]
    window[(count - 2) % slots] = base + steps[1] + steps[2]
    src = base.clone()
    out = torch.full((slots - 1,), NAN, dtype=torch.float64, device=DEVICE)
    TRITON.rna_record(RecordArgs([src], [0], window, torch.tensor(count, device=DEVICE), out), {})
    r0 = (src - window[(count - 1) % slots]).double()
    r1 = (window[(count - 1) % slots] - window[(count - 2) % slots]).double()
    want = torch.stack([r0 @ r0, r0 @ r1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-9)


def test_rna_record_single_slot_copies_only():
    b = make_bucket(CASES[0], torch.float32, DEVICE)
    window = b.ring(1)
    out = torch.empty(0, dtype=torch.float64, device=DEVICE)
    TRITON.rna_record(RecordArgs(b.params, b.offsets, window, torch.tensor(7, device=DEVICE), out), {})
    torch.testing.assert_close(window[0], _flat(b.params, b.n, b.offsets, torch.float32).float(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("slots,m", [(1, 1), (3, 3), (5, 2)])
@pytest.mark.parametrize("case,dtype", case_dtype_params())
def test_rna_extrapolate_matches_torch(case: Case, dtype, slots, m):
    b = make_bucket(case, dtype, DEVICE)
    window = b.ring(slots)
    coefs = torch.randn(m, dtype=torch.float64, device=DEVICE)
    count = torch.tensor(3 * slots + 2, device=DEVICE)
    results = []
    for backend in (ORACLE, TRITON):
        outs = nan_like(b.params)  # every element must be overwritten
        backend.rna_extrapolate(ExtrapArgs(window, b.offsets, count, coefs, outs), {})
        results.append(outs)
    assert_lists_close(results[1], results[0], dtype)


def test_rna_online_record_then_extrapolate_in_place():
    """Online mode: extrapolate into the very tensors that were just recorded."""
    dtype, slots = torch.float32, 4
    b = make_bucket(CASES[2], dtype, DEVICE)
    window = b.ring(slots)
    coefs = torch.softmax(torch.randn(slots, dtype=torch.float64, device=DEVICE), 0)
    states = []
    for backend in (ORACLE, TRITON):
        params, w, cache = clones(b.params), window.clone(), {}
        for c in range(slots + 2):
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(c)).to(DEVICE))
            cnt = torch.tensor(c, device=DEVICE)
            backend.rna_record(RecordArgs(params, b.offsets, w, cnt, None), cache)
            backend.rna_extrapolate(ExtrapArgs(w, b.offsets, cnt + 1, coefs, params), cache)
        states.append((params, w))
    assert_lists_close(states[1][0], states[0][0], dtype)
    assert_lists_close([states[1][1]], [states[0][1]], dtype)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_rows_bitwise_identical_run_to_run(dtype):
    b = make_bucket(CASES[3], dtype, DEVICE)
    k, count = 4, 9
    g_hist, x_hist = b.ring(k), b.ring(k - 1)
    window = b.ring(k)
    coefs, lr, cnt = device_scalars(k, count, DEVICE)
    rows = []
    for _ in range(2):
        r_gram = torch.empty(k, dtype=torch.float64, device=DEVICE)
        r_comb = torch.empty(k, dtype=torch.float64, device=DEVICE)
        r_rna = torch.empty(k - 1, dtype=torch.float64, device=DEVICE)
        TRITON.gram_row(GramArgs(b.params, b.grads, b.offsets, g_hist.clone(), cnt, 0.1, False, r_gram,
                                 store=True), {})
        TRITON.combine(CombineArgs(clones(b.params), b.grads, b.offsets, x_hist.clone(), g_hist[1:].clone(),
                                   coefs, lr, cnt, 0.1, False, r_comb), {})
        TRITON.rna_record(RecordArgs(b.params, b.offsets, window.clone(), cnt, r_rna), {})
        rows.append((r_gram, r_comb, r_rna))
    for a, c in zip(*rows):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------- tables and launches


def test_pointer_tables_reused_while_storages_unchanged():
    b = make_bucket(CASES[0], torch.float32, DEVICE)
    coefs, lr, cnt = device_scalars(2, 0, DEVICE)
    xh, gh, cache = b.ring(1), b.ring(1), {}
    TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, xh, gh, coefs, lr, cnt, 0.0, False, None), cache)
    first = cache[("triton", "combine")]
    TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, xh, gh, coefs, lr, cnt, 0.0, False, None), cache)
    assert cache[("triton", "combine")] is first


def test_pointer_tables_rebuilt_after_grads_replaced():
    """zero_grad(set_to_none=True) then backward gives new gradient storages. The
    old ones stay alive with other values, so a stale table would read them."""
    dtype, k = torch.float32, 3
    b = make_bucket(CASES[4], dtype, DEVICE)
    coefs, lr, cnt = device_scalars(k, 1, DEVICE)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    cache = {}
    TRITON.combine(CombineArgs(clones(b.params), b.grads, b.offsets, x_hist.clone(), g_hist.clone(), coefs,
                               lr, cnt, 0.0, False, None), cache)
    stale = cache[("triton", "combine")]
    old_grads = b.grads
    new_grads = [torch.randn_like(g) for g in old_grads]
    for g in old_grads:
        g.fill_(1e3)
    results = []
    for backend, c in ((ORACLE, {}), (TRITON, cache)):
        params, xh, gh = clones(b.params), x_hist.clone(), g_hist.clone()
        backend.combine(CombineArgs(params, new_grads, b.offsets, xh, gh, coefs, lr, cnt, 0.0, False,
                                    None), c)
        results.append((params, xh, gh))
    assert cache[("triton", "combine")] is not stale
    assert_lists_close(results[1][0], results[0][0], dtype)
    assert_lists_close(list(results[1][1:]), list(results[0][1:]), dtype)


def test_fast_path_flags_follow_alignment():
    """Full blocks take the unmasked, vectorized path only for tensors whose data
    pointers and ring column are 16-byte aligned; the others stay correct on the
    masked path (both paths are compared with the oracle in every test above)."""
    storage = torch.randn(64, device=DEVICE)
    params = [storage[:32], storage[33:63], torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)]
    grads = [torch.randn(32, device=DEVICE), torch.randn(30, device=DEVICE),
             torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)]
    offsets = [0, 32, 64, 101]  # 101 * 4 bytes is not a multiple of 16
    tabs = _launch.tables({}, "combine", [params, grads], ["rw", "r"], offsets, torch.device(DEVICE),
                          TEST_BLOCK, torch.float32)
    assert tabs.flags.tolist() == [1, 0, 1, 0]
    assert tabs.nblocks == 2 + 2 + 2 + 2
    assert tabs.blk_start.tolist() == [0, 16] * 4
    assert tabs.blk_tensor.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    coefs, lr, cnt = device_scalars(2, 1, DEVICE)
    x_hist, g_hist = torch.randn(1, 133, device=DEVICE), torch.randn(1, 133, device=DEVICE)
    results = []
    for backend in (ORACLE, TRITON):
        st = storage.clone()  # same views, same (mis)alignment
        ps, xh, gh = [st[:32], st[33:63]] + clones(params[2:]), x_hist.clone(), g_hist.clone()
        backend.combine(CombineArgs(ps, grads, offsets, xh, gh, coefs, lr, cnt, 0.0, False, None), {})
        results.append((ps, xh, gh))
    assert_lists_close(results[1][0], results[0][0], torch.float32)
    assert_lists_close(list(results[1][1:]), list(results[0][1:]), torch.float32)


@pytest.fixture
def launches(monkeypatch):
    calls = []
    real = _launch.launch

    def counting(kernel, programs, *args, **kw):
        calls.append(programs)
        return real(kernel, programs, *args, **kw)

    monkeypatch.setattr(_launch, "launch", counting)
    return calls


def test_launches_do_not_grow_with_tensor_count(launches):
    per_op = []
    for n_tensors in (2, 60):
        case = Case(f"n{n_tensors}", tuple((3 + i % 5,) for i in range(n_tensors)))
        b = make_bucket(case, torch.float32, DEVICE)
        k = 3
        coefs, lr, cnt = device_scalars(k, 2, DEVICE)
        counts = []
        for op in range(4):
            launches.clear()
            if op == 0:
                TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, b.ring(k - 1), b.ring(k - 1), coefs,
                                           lr, cnt, 0.1, False,
                                           torch.empty(k, dtype=torch.float64, device=DEVICE)), {})
            elif op == 1:
                TRITON.gram_row(GramArgs(b.params, b.grads, b.offsets, b.ring(k), cnt, 0.1, False,
                                         torch.empty(k, dtype=torch.float64, device=DEVICE), store=True), {})
            elif op == 2:
                TRITON.rna_record(RecordArgs(b.params, b.offsets, b.ring(k), cnt,
                                             torch.empty(k - 1, dtype=torch.float64, device=DEVICE)), {})
            else:
                TRITON.rna_extrapolate(ExtrapArgs(b.ring(k), b.offsets, cnt, coefs, nan_like(b.params)), {})
            counts.append(len(launches))
        per_op.append(counts)
    # The streaming kernel, plus the fixed-order reduction where a Gram row is made.
    assert per_op[0] == per_op[1] == [2, 2, 2, 1]


@pytest.mark.parametrize("layout", ["empty_bucket", "all_zero_size"])
def test_empty_buckets_launch_nothing_and_zero_the_gram(layout, launches):
    shapes = () if layout == "empty_bucket" else ((0,), (0, 3))
    b = make_bucket(Case(layout, shapes), torch.float32, DEVICE)
    k = 3
    coefs, lr, cnt = device_scalars(k, 5, DEVICE)
    gram = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE)
    TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, b.ring(k - 1), b.ring(k - 1), coefs, lr, cnt,
                               0.1, True, gram), {})
    row = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE)
    TRITON.gram_row(GramArgs(b.params, b.grads, b.offsets, b.ring(k), cnt, 0.1, False, row, store=True), {})
    rna = torch.full((k - 1,), NAN, dtype=torch.float64, device=DEVICE)
    TRITON.rna_record(RecordArgs(b.params, b.offsets, b.ring(k), cnt, rna), {})
    TRITON.rna_extrapolate(ExtrapArgs(b.ring(k), b.offsets, cnt, coefs[:2], nan_like(b.params)), {})
    row_ro = torch.full((k,), NAN, dtype=torch.float64, device=DEVICE)
    TRITON.gram_row(GramArgs(b.params, b.grads, b.offsets, b.ring(k - 1), cnt, 0.1, False, row_ro,
                             store=False), {})
    assert launches == []
    for r in (gram, row, rna, row_ro):
        assert torch.equal(r, torch.zeros_like(r))


def test_non_contiguous_tensors_are_staged():
    """Transposed and channels_last tensors map to ring columns in reshape(-1)
    order (the oracle's) and are updated in place."""
    dtype, k = torch.float32, 2
    shapes = [(5, 7), (2, 3, 4, 5), (9,)]
    params = [torch.randn(7, 5, device=DEVICE).t(),
              torch.randn(*shapes[1], device=DEVICE).to(memory_format=torch.channels_last),
              torch.randn(9, device=DEVICE)]
    grads = [torch.randn(7, 5, device=DEVICE).t(), torch.randn(*shapes[1], device=DEVICE),
             torch.randn(18, device=DEVICE)[::2]]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    assert not grads[0].is_contiguous() and not grads[2].is_contiguous()
    offsets = [0, 35, 35 + 120]
    n = offsets[-1] + 9
    coefs, lr, cnt = device_scalars(k, 3, DEVICE)
    x_hist, g_hist = torch.randn(1, n, device=DEVICE), torch.randn(1, n, device=DEVICE)
    results = []
    for backend in (ORACLE, TRITON):
        ps = [p.clone(memory_format=torch.preserve_format) for p in params]
        assert not ps[0].is_contiguous() and not ps[1].is_contiguous()
        xh, gh = x_hist.clone(), g_hist.clone()
        backend.combine(CombineArgs(ps, grads, offsets, xh, gh, coefs, lr, cnt, 0.1, False, None), {})
        results.append((ps, xh, gh))
    assert_lists_close(results[1][0], results[0][0], dtype)
    assert_lists_close(list(results[1][1:]), list(results[0][1:]), dtype)
    outs = [torch.full((7, 5), NAN, device=DEVICE).t(), torch.full((9,), NAN, device=DEVICE)]
    window = torch.randn(2, 44, device=DEVICE)
    coefs2 = torch.tensor([0.3, 0.7], dtype=torch.float64, device=DEVICE)
    TRITON.rna_extrapolate(ExtrapArgs(window, [0, 35], cnt, coefs2, outs), {})
    ref = [torch.empty(7, 5, device=DEVICE).t(), torch.empty(9, device=DEVICE)]
    ORACLE.rna_extrapolate(ExtrapArgs(window, [0, 35], cnt, coefs2, ref), {})
    assert_lists_close(outs, ref, dtype)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@native_only
def test_cuda_graph_replay_follows_lr_coefs_and_count():
    """A captured step replays with lr, coefs and count changed in place on the
    device: nothing was baked in at capture time."""
    dev, dtype, k = "cuda", torch.float32, 3
    b = make_bucket(CASES[3], dtype, dev)
    coefs, lr, count = device_scalars(k, 0, dev)
    x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
    gram = torch.empty(k, dtype=torch.float64, device=dev)
    ref = dict(params=clones(b.params), xh=x_hist.clone(), gh=g_hist.clone(), count=count.clone(),
               gram=gram.clone())
    cache = {}

    def triton_step():
        TRITON.combine(CombineArgs(b.params, b.grads, b.offsets, x_hist, g_hist, coefs, lr, count, 0.01,
                                   False, gram), cache)
        count.add_(1)

    def oracle_step():
        ORACLE.combine(CombineArgs(ref["params"], b.grads, b.offsets, ref["xh"], ref["gh"], coefs, lr,
                                   ref["count"], 0.01, False, ref["gram"]), {})
        ref["count"].add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and builds the tables outside the capture
        triton_step()
    torch.cuda.current_stream().wait_stream(side)
    oracle_step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_step()
    for i, new_lr in enumerate((0.05, 0.2, 0.01, 0.3)):
        lr.fill_(new_lr)
        coefs.copy_(torch.softmax(torch.randn(k, dtype=torch.float64, device=dev), 0))
        for g in b.grads:
            g.copy_(torch.randn_like(g))
        graph.replay()
        oracle_step()
        torch.cuda.synchronize()
        assert count.item() == ref["count"].item() == i + 2
        assert_lists_close(b.params, ref["params"], dtype)
        assert_lists_close([x_hist, g_hist], [ref["xh"], ref["gh"]], dtype)
        torch.testing.assert_close(gram, ref["gram"], rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@native_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_default_blocks_large_tensors(dtype, monkeypatch):
    """The production launch settings (default block, vectorized full blocks)
    on tensors of a few million elements, aligned and misaligned offsets."""
    monkeypatch.delenv(_launch.BLOCK_ENV, raising=False)
    for gap in (0, 3):
        case = Case("large", (((1 << 20) + 3,), (4096,), (3, 333_333), (1,)), gap=gap)
        b = make_bucket(case, dtype, "cuda")
        k = 3
        coefs, lr, cnt = device_scalars(k, 7, "cuda")
        x_hist, g_hist = b.ring(k - 1), b.ring(k - 1)
        results = []
        for backend in (ORACLE, TRITON):
            params, xh, gh = clones(b.params), x_hist.clone(), g_hist.clone()
            gram = torch.empty(k, dtype=torch.float64, device="cuda")
            backend.combine(CombineArgs(params, b.grads, b.offsets, xh, gh, coefs, lr, cnt, 0.01, True,
                                        gram), {})
            results.append((params, xh, gh, gram))
        assert_lists_close(results[1][0], results[0][0], dtype)
        assert_lists_close(list(results[1][1:3]), list(results[0][1:3]), dtype)
        ref_gram = results[0][3]
        # Entries are compared against the size of the products summed, ~||g||^2.
        torch.testing.assert_close(results[1][3], ref_gram, rtol=0, atol=1e-5 * float(ref_gram[0]))


@pytest.mark.gpu
@native_only
def test_gpu_int64_indexing_past_2_31_elements(monkeypatch):
    """One bf16 tensor of 2^31 + 77 elements (about 17 GB with its rings): the
    tail elements, past any int32 offset, are updated and stored correctly."""
    # The production block (not the tests' 16): int64 offsets at the real size.
    monkeypatch.delenv(_launch.BLOCK_ENV, raising=False)
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 77
    if free < 5 * n * 2:
        pytest.skip("needs about 22 GB of free GPU memory")
    dev, dtype = "cuda", torch.bfloat16
    p = torch.randn(n, device=dev, dtype=dtype)
    g = torch.randn(n, device=dev, dtype=dtype)
    x_hist = torch.randn(1, n + 5, device=dev, dtype=dtype)
    g_hist = torch.randn(1, n + 5, device=dev, dtype=dtype)
    coefs = torch.tensor([0.25, 0.75], dtype=torch.float64, device=dev)
    lr, cnt = torch.tensor(0.5, dtype=torch.float64, device=dev), torch.tensor(4, device=dev)
    idx = torch.cat([torch.arange(64, device=dev), torch.arange(n - 4096, n, device=dev)])
    p0, g0 = p[idx].float(), g[idx].float()
    xh0, gh0 = x_hist[0, idx + 5].float(), g_hist[0, idx + 5].float()
    want = 0.25 * p0 + 0.75 * xh0 - 0.5 * (0.25 * g0 + 0.75 * gh0)
    TRITON.combine(CombineArgs([p], [g], [5], x_hist, g_hist, coefs, lr, cnt, 0.0, False, None), {})
    torch.testing.assert_close(p[idx].float(), want.to(dtype).float(), **tol(dtype))
    assert torch.equal(x_hist[0, idx + 5].float(), p0)
    assert torch.equal(g_hist[0, idx + 5].float(), g0)


# --------------------------------------------------------------------------- optimizers


def _optimizers():
    import interpolatron

    return interpolatron


def _model(dtype, batch_norm: bool = False) -> torch.nn.Module:
    """Odd shapes, a bias-free layer and a frozen tensor (non-contiguous offsets
    among the optimizer's tensors); batch norm adds float and integer buffers."""
    layers = [torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False)]
    m = torch.nn.Sequential(*layers, *([torch.nn.BatchNorm1d(3)] if batch_norm else []))
    m[0].bias.requires_grad_(False)
    return m.to(device=DEVICE, dtype=dtype)


def _loss(model: torch.nn.Module, step: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 7, generator=g).to(device=DEVICE, dtype=dtype)
    y = torch.randn(16, 3, generator=g).to(device=DEVICE, dtype=dtype)
    return ((model(x) - y) ** 2).mean() + 0.1 * (model[0].weight.sin() ** 2).sum()


def _run_optimizer(make, backend: str, dtype, steps: int, set_to_none: bool):
    torch.manual_seed(0)
    model = _model(dtype)
    opt = make([p for p in model.parameters() if p.requires_grad], backend)
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        _loss(model, step, dtype).backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return opt, history


def _assert_trajectories_close(got, want, dtype, rtol, atol):
    for step, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol,
                                       msg=lambda m, s=step, i=i: f"step {s}, tensor {i}: {m}")


@pytest.mark.parametrize("alphas,set_to_none", [((1.0,), True), ((0.1, 0.9), False),
                                                ((0.1, 0.3, 0.6), True)],
                         ids=["k1-set_to_none", "k2-zeroed", "k3-set_to_none"])
def test_interpolatron_triton_follows_torch(alphas, set_to_none):
    ip = _optimizers()

    def make(params, backend):
        return ip.Interpolatron(params, lr=0.1, alphas=alphas, weight_decay=1e-2, diagnostics=True,
                                backend=backend)

    runs = {be: _run_optimizer(make, be, torch.float32, 12, set_to_none) for be in ("torch", "triton")}
    _assert_trajectories_close(runs["triton"][1], runs["torch"][1], torch.float32, 1e-5, 1e-6)
    d_triton, d_torch = runs["triton"][0].diagnostics, runs["torch"][0].diagnostics
    assert set(d_triton) == set(d_torch)
    for key in d_torch:
        torch.testing.assert_close(d_triton[key], d_torch[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_interpolatron_triton_follows_torch_other_dtypes(dtype):
    ip = _optimizers()

    def make(params, backend):
        return ip.Interpolatron(params, lr=0.05, alphas=(0.1, 0.3, 0.6), maximize=False, backend=backend)

    runs = {be: _run_optimizer(make, be, dtype, 10, True) for be in ("torch", "triton")}
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (3e-2, 3e-2)
    _assert_trajectories_close(runs["triton"][1], runs["torch"][1], dtype, rtol, atol)


@pytest.mark.parametrize("history,constraint", [(1, None), (3, "simplex"), (4, None)])
def test_anderson_triton_follows_torch(history, constraint):
    ip = _optimizers()

    def make(params, backend):
        return ip.Anderson(params, lr=0.1, history=history, reg=1e-3, constraint=constraint,
                           weight_decay=1e-2, backend=backend)

    runs = {be: _run_optimizer(make, be, torch.float32, 12, True) for be in ("torch", "triton")}
    # The coefficients are solved from the Gram matrix: rounding differences in
    # it reach the iterates, amplified by the conditioning of the solve.
    _assert_trajectories_close(runs["triton"][1], runs["torch"][1], torch.float32, 1e-4, 1e-5)
    torch.testing.assert_close(runs["triton"][0].coefficients, runs["torch"][0].coefficients,
                               rtol=1e-4, atol=1e-5)


def _rna_run(ip, backend: str, **kw):
    torch.manual_seed(0)
    model = _model(torch.float32, batch_norm=True)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rna = ip.RNA(model, window=4, backend=backend, optimizer=base, **kw)
    extrapolations = []
    for epoch in range(10):
        base.zero_grad()
        _loss(model, epoch, torch.float32).backward()
        base.step()
        rna.record()
        if epoch >= 2 and kw.get("mode", "offline") == "offline":
            outs = rna.extrapolate()
            extrapolations.append({n: t.clone() for n, t in outs.items()})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return rna, extrapolations, state


@pytest.mark.parametrize("kw", [dict(), dict(mode="online"), dict(residual="gradients")],
                         ids=["offline_iterates", "online", "gradient_residuals"])
def test_rna_triton_follows_torch(kw):
    ip = _optimizers()
    runs = {be: _rna_run(ip, be, **kw) for be in ("torch", "triton")}
    (_, ex_t, st_t), (_, ex_x, st_x) = runs["torch"], runs["triton"]
    assert len(ex_x) == len(ex_t)
    for a, b in zip(ex_x, ex_t):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    for n in st_t:
        torch.testing.assert_close(st_x[n], st_t[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # With lambda = 1e-8 the solve is ill-conditioned: the Gram's rounding (fp32
    # partials against the oracle's fp64 products) moves c more than the point.
    torch.testing.assert_close(runs["triton"][0].coefficients, runs["torch"][0].coefficients,
                               rtol=1e-3, atol=5e-5)
