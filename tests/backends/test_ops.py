"""The seam ops as torch custom ops: torch.library.opcheck for every op, backend and dtype."""

from __future__ import annotations

import pytest
import torch
from optimizers import backend_params

from interpolatron import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

BACKENDS = backend_params()  # (test_ops_grad_scaler.py takes the same)


def _args(op: str, dtype: torch.dtype, backend: str, k: int = 3):
    shapes = [(3, 5), (7,), (2, 2, 3)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    numels = [p.numel() for p in params]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    n = sum(numels)
    count = torch.tensor(4, dtype=torch.int64)
    ring = lambda slots: torch.randn(slots, n).to(dtype)  # noqa: E731
    coefs = torch.tensor([0.5, 0.3, 0.2][:k], dtype=torch.float64)
    if op == "combine":
        lr = torch.tensor(0.1, dtype=torch.float64)
        return (params, grads, offsets, ring(k - 1), ring(k - 1), coefs, lr, count, 0.01, False,
                torch.zeros(k, dtype=torch.float64), backend, 0)
    if op == "gram_row":
        return (params, grads, offsets, ring(k - 1), count, 0.01, True, torch.zeros(k, dtype=torch.float64),
                backend, 0)
    if op == "gram_row_store":
        return (params, grads, offsets, ring(k), count, 0.0, False, torch.zeros(k, dtype=torch.float64),
                backend, 0)
    if op == "rna_record":
        return (params, offsets, ring(k + 1), count, torch.zeros(k, dtype=torch.float64), backend, 0)
    if op == "rna_extrapolate":
        return (ring(k + 1), offsets, count, coefs, params, backend, 0)
    raise AssertionError(op)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(ops.OPS))
def test_opcheck(op, dtype, backend):
    torch.library.opcheck(ops.OPS[op], _args(op, dtype, backend))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_opcheck_combine_with_stochastic_rounding(dtype, backend):
    torch.library.opcheck(ops.combine, _args("combine", dtype, backend), {"sr_seed": 12345})


@pytest.mark.parametrize("op", list(ops.OPS))
def test_ops_match_the_backend_calls(op):
    """The op writes exactly what the torch backend's method writes (bitwise)."""
    from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs
    from interpolatron.backends.torch_backend import BACKEND

    args = _args(op, torch.float32, "torch")
    def clone(a):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [t.clone() for t in a]
        return a.clone() if isinstance(a, torch.Tensor) else a

    mine = [clone(a) for a in args]
    ref = [clone(a) for a in args]
    ops.OPS[op](*mine)
    method = "gram_row" if op.startswith("gram_row") else op
    fields = ref[:-2]  # the schema's arguments but backend and cache
    if method == "gram_row":
        args = GramArgs(*fields, store=op == "gram_row_store")
    else:
        args = {"combine": CombineArgs, "rna_record": RecordArgs, "rna_extrapolate": ExtrapArgs}[op](*fields)
    getattr(BACKEND, method)(args, {})
    def flat(xs):
        return [t for a in xs for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]

    for a, b in zip(flat(mine), flat(ref)):
        assert torch.equal(a, b)


def test_cache_handles_are_freed_with_their_owner():
    class Owner:
        pass

    owner = Owner()
    handle = ops.new_cache(owner)
    ops.cache_of(handle)["x"] = 1
    assert ops.cache_of(handle) == {"x": 1}
    del owner
    import gc

    gc.collect()
    assert handle not in ops._CACHES
