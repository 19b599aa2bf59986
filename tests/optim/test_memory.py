"""Bounded memory: Anderson's Gram rebuild (its first step, a change of the set
of parameters with gradients) works through fixed-size column chunks, so the
peak of a step is its state plus a chunk, measured with the torch profiler's
allocation events; the torch backend's per-column-set cache is bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optimizers import need_backend

import interpolatron
from interpolatron import gram, ops
from interpolatron.backends import torch_backend
from interpolatron.benchmark import measure_memory
from interpolatron.optim import _buckets

FIXED = 4 << 20  # bytes: the chunk (2 slots x 65536 columns x 8 bytes = 1 MiB) with room to spare


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(n: int):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in (n // 2, n // 4, n // 4)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("skip_one", [False, True], ids=["all-grads", "one-without-grad"])
def test_anderson_k3_first_step_and_membership_change_peak_at_state_plus_a_chunk(skip_one):
    """Before: 10x the parameter bytes at the first step (12x with a parameter
    without gradient), 6x at a membership change; now the 4x state (2 iterates,
    2 gradients) plus one chunk. (A parameter's first gradient after the
    first step re-lays the flat rings out: the new rings plus a chunk.)"""
    need_backend("native")
    params, pbytes = _model(1 << 22)
    if skip_one:
        params[1].grad = None
    opt = interpolatron.Anderson(params, lr=1e-3, history=3, backend="native")
    peak, net, method = measure_memory(opt.step, "cpu")
    if peak is None:
        pytest.skip(method)
    state = 4 * (pbytes - (params[1].numel() * 4 if skip_one else 0))
    assert net >= state  # the rings really were allocated (the measurement sees them)
    assert peak <= state + FIXED, f"first step peak {peak / pbytes:.2f}x the parameter bytes"
    for _ in range(2):
        opt.step()
    params[1].grad = None if not skip_one else torch.randn_like(params[1])
    peak, _, _ = measure_memory(opt.step, "cpu")
    # A newcomer (its first gradient) re-lays the bucket's flat rings out: the
    # new rings (4x, everything) exist next to the old ones for the copy.
    extra = 4 * pbytes if skip_one else 0
    assert peak <= extra + FIXED, f"membership change peak {peak / pbytes:.2f}x the parameter bytes"


def test_torch_backend_first_step_peak_is_state_plus_its_work_buffers():
    """The torch backend (the oracle) also keeps four flat work buffers on the
    CPU (x, new, step, g) and two float64 dot-product chunks: 4x state + 4x
    buffers + chunks (bounded by the 5x of the buffers it kept before)."""
    params, pbytes = _model(1 << 21)
    opt = interpolatron.Anderson(params, lr=1e-3, history=3, backend="torch")
    peak, _, method = measure_memory(opt.step, "cpu")
    if peak is None:
        pytest.skip(method)
    assert peak <= 9 * pbytes + FIXED, f"{peak / pbytes:.2f}x"


def _naive_ring_gram(ring, count, spans, ages):
    cols = np.concatenate([np.arange(o, o + n) for o, n in spans]) if spans else np.arange(ring.shape[1])
    r = ring.double().numpy()[:, cols]
    slots = [(count - a) % ring.shape[0] for a in range(ages)]
    rows = r[slots]
    return rows @ rows.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chunked_ring_gram_equals_the_gathered_float64_gram(dtype, monkeypatch):
    monkeypatch.setattr(gram, "RING_GRAM_CHUNK", 7)  # many chunks, spans crossing chunk edges
    rng = np.random.default_rng(1)
    rings = [torch.tensor(rng.standard_normal((3, 50)), dtype=dtype),
             torch.tensor(rng.standard_normal((3, 20)), dtype=dtype)]
    spans = [[(0, 9), (9, 4), (30, 17)], None]
    counts = [torch.tensor(4), torch.tensor(2)]
    got = gram.ring_gram([(r, c, s) for r, c, s in zip(rings, counts, spans)], 3, torch.device("cpu"))
    want = sum(_naive_ring_gram(r, int(c), s, 3) for r, c, s in zip(rings, counts, spans))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=1e-13)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_rotate_moves_each_entry_one_slot_on(slots, monkeypatch):
    monkeypatch.setattr(_buckets, "ROTATE_CHUNK", 5)
    members = [torch.zeros(4, 3), torch.zeros(7)]
    bucket = _buckets.Bucket((0, torch.device("cpu"), torch.float32), None, members, slots, slots,
                          torch.zeros((), dtype=torch.int64), slots + 1)
    bucket.x_hist.copy_(torch.randn_like(bucket.x_hist))
    bucket.g_hist.copy_(torch.randn_like(bucket.g_hist))
    before = [v.clone() for v in bucket.views(members[0])] + [v.clone() for v in bucket.views(members[1])]
    bucket.rotate(members[0])
    after = list(bucket.views(members[0])) + list(bucket.views(members[1]))
    assert torch.equal(after[0], before[0].roll(1, 0)) and torch.equal(after[1], before[1].roll(1, 0))
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])  # the other member


def test_torch_backend_column_cache_is_bounded_and_changes_no_result(monkeypatch):
    """Random subsets of parameters with gradients (a mixture of experts): the
    cache keeps at most COLUMN_CACHE_ENTRIES index sets, and the trajectory is
    bitwise that of an unbounded cache."""
    rng = np.random.default_rng(2)
    subsets = [rng.random(6) < 0.6 for _ in range(40)]

    def run():
        torch.manual_seed(3)
        params = [torch.randn(5, requires_grad=True) for _ in range(6)]
        opt = interpolatron.Anderson(params, lr=0.05, history=3, reg=1e-3, backend="torch")
        sizes = []
        for mask in subsets:
            for p, on in zip(params, mask):
                p.grad = (p.detach() * 0.5 + 0.1) if on else None
            opt.step()
            buckets = opt._plan.buckets.values()
            sizes.append(max(len(ops.cache_of(b.cache).get("columns", ())) for b in buckets))
        return [p.detach().clone() for p in params], sizes

    bounded, sizes = run()
    assert max(sizes) == torch_backend.COLUMN_CACHE_ENTRIES
    monkeypatch.setattr(torch_backend, "COLUMN_CACHE_ENTRIES", 10 ** 6)
    unbounded, sizes = run()
    assert max(sizes) > 10  # without the bound it did grow
    assert len(set(map(tuple, (m.tolist() for m in subsets)))) > 4
    for a, b in zip(bounded, unbounded):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_a_dropped_optimizer_frees_its_rings_without_the_cycle_collector(name):
    """No reference cycle through the optimizer: its buckets (the rings, the
    bulk of its memory) go when the last reference does, not at some later
    gc.collect() (the benchmark's memory rows measured the difference)."""
    import gc
    import weakref

    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    cls = interpolatron.Interpolatron if name == "interpolatron" else interpolatron.Anderson
    opt = cls(params, lr=0.1, backend="torch")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    gc.collect()
    alive = weakref.ref(opt)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del opt
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()
