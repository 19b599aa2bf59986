"""The custom ops with GradScaler's ``grad_scale`` / ``found_inf``:
torch.library.opcheck (schema, fake kernel, mutation annotations) for every
backend, and the skipped op writes nothing."""

from __future__ import annotations

import pytest
import torch
from test_ops import BACKENDS, _args

from interpolatron import ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["taken", "skipped"])
@pytest.mark.parametrize("op", ["combine", "gram_row"])
def test_opcheck_with_scaler(op, found, dtype, backend):
    args = _args(op, dtype, backend)
    kwargs = {"grad_scale": torch.tensor(256.0), "found_inf": torch.tensor(found)}
    torch.library.opcheck(ops.OPS[op], args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_combine_op_writes_nothing(backend):
    args = _args("combine", torch.float32, backend)
    params, x_hist, g_hist = [p.clone() for p in args[0]], args[3].clone(), args[4].clone()
    ops.combine(*args, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(params, args[0]))
    assert torch.equal(x_hist, args[3]) and torch.equal(g_hist, args[4])
    ops.combine(*args, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    assert not torch.equal(x_hist, args[3])
