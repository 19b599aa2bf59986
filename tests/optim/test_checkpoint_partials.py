"""The top-level ``"anderson_partials"`` entry of a state_dict (each rank's
partial Gram of sharded Anderson, interpolatron/optim/_partials.py), checked
in one process: a malformed entry is refused and changes nothing; a
well-formed one on an optimizer without sharded parameters is not used (the
run is the one loaded without it, bitwise) and not written again. Its use on
the same layout is tested on 2 ranks in tests/integration/test_sharded_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch

import interpolatron
from interpolatron.optim._checkpoint import CheckpointError

SHAPES = [(4, 3), (5,)]


def _run(steps: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = interpolatron.Anderson(params, lr=0.1, history=3, weight_decay=0.01, backend="torch")
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps + 3)]
    for t in range(steps):
        _step(opt, params, grads[t])
    return opt, params, grads


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _entry(**change):
    gram = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    out = {"layout": (0, 2, 1, ((2, 0),), False, ((0, 0, "cpu", "torch.float32", (4, 3), (2, 3), (3, 1)),)),
           "active": ("buckets", (0, "cpu", "torch.float32", 2)), "gram": gram + gram.T}
    out.update(change)
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


BAD = {
    "not a list": "partials",
    "entry not a dict": [torch.zeros(3, 3, dtype=torch.float64)],
    "missing key": [{k: v for k, v in _entry().items() if k != "active"}],
    "extra key": [{**_entry(), "rank": 0}],
    "gram shape": [_entry(gram=torch.zeros(2, 2, dtype=torch.float64))],
    "gram dtype": [_entry(gram=torch.zeros(3, 3, dtype=torch.int64))],
    "gram narrower": [_entry(gram=torch.zeros(3, 3, dtype=torch.float16))],
    "gram not a tensor": [_entry(gram=[[0.0] * 3] * 3)],
    "gram non-finite": [_entry(gram=torch.full((3, 3), float("nan"), dtype=torch.float64))],
    "gram asymmetric": [_entry(gram=torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                                                 dtype=torch.float64))],
    "layout holds a tensor": [_entry(layout=(0, torch.zeros(1)))],
    "active holds an object": [_entry(active=("buckets", object()))],
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_malformed_partials_are_refused_and_change_nothing(bad):
    opt, params, grads = _run()
    sd = copy.deepcopy(opt.state_dict())
    sd["anderson_partials"] = BAD[bad]
    target, target_params, _ = _run(seed=1)
    before = copy.deepcopy(target.state_dict())
    values = [p.detach().clone() for p in target_params]
    with pytest.raises(CheckpointError, match="anderson_partials"):
        target.load_state_dict(sd)
    assert _same(target.state_dict(), before)
    assert all(torch.equal(p.detach(), v) for p, v in zip(target_params, values))


def test_wellformed_partials_without_sharding_are_not_used():
    """An entry is accepted (lists for tuples, as a serialiser may write them),
    then neither used (no sharded parameters) nor written again."""
    opt, params, grads = _run()
    sd = opt.state_dict()
    assert "anderson_partials" not in sd  # one process: no partial Grams
    saved = [p.detach().clone() for p in params]
    runs = []
    for partials in (None, [_entry(), _entry(layout=[0, [1, [2, "x"]]], active=["params", [0, 0]])]):
        state = copy.deepcopy(sd)
        if partials is not None:
            state["anderson_partials"] = partials
        ps = [s.clone().requires_grad_() for s in saved]
        o = interpolatron.Anderson(ps, lr=0.1, history=3, weight_decay=0.01, backend="torch")
        o.load_state_dict(state)
        assert "anderson_partials" not in o.state_dict()
        for t in range(3, 6):
            _step(o, ps, grads[t])
        runs.append((o.coefficients.clone(), [p.detach().clone() for p in ps]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
