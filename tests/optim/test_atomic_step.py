"""A refused step changes nothing: every check (settings, tensor lrs, the
number of steps k, gradients) runs before the first write, whichever group
holds the fault. Params, rings, counts, Anderson's optimizer-wide state and a
wrapping RNA's gradient averages stay bitwise as they were, and the optimizer
then goes on exactly like a twin that never saw the faulty step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _oracle import Problem
from optimizers import make, need_backend

import interpolatron

SHAPES = [(3, 4), (5,), (2, 3), (4,), (2, 2)]
GROUPS = [(0, 2), (2, 4), (4, 5)]  # three groups: a fault at the first, middle and last position


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(seed=0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s), dtype=dtype).requires_grad_() for s in SHAPES]


def _make(name, backend, params):
    groups = [dict(params=params[a:b], lr=0.1 / (i + 1), weight_decay=1e-2 * i)
              for i, (a, b) in enumerate(GROUPS)]
    return make(name, groups, backend, lr=0.1)


PROBLEM = Problem(SHAPES, seed=7)


def _set_grads(params):
    grads = PROBLEM.grad([p.detach().double().numpy() for p in params])
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=p.dtype)


def _tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _fault_setting(key, value):
    def inject(opt, params, gi):
        group = opt.param_groups[gi]
        old = group[key]
        group[key] = value() if callable(value) else value
        return lambda: group.__setitem__(key, old)
    return inject


def _fault_grad(make_bad):
    def inject(opt, params, gi):
        p = opt.param_groups[gi]["params"][0]
        good = p.grad
        p.grad_dtype = None  # let torch accept any gradient tensor
        bad = make_bad(good)
        if bad.shape == good.shape:
            p.grad = bad
        else:  # torch refuses to assign such a gradient; reshape a copy in place instead
            p.grad = good.clone()
            p.grad.set_(bad)

        def undo():
            p.grad = good
        return undo
    return inject


def _fault_k(opt, params, gi):
    if isinstance(opt, interpolatron.Interpolatron):
        return _fault_setting("alphas", (0.5, 0.5))(opt, params, gi)
    olds = [g["history"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["history"] = 2
    def undo():
        for g, h in zip(opt.param_groups, olds):
            g["history"] = h
    return undo


FAULTS = {
    "lr-negative": _fault_setting("lr", -0.1),
    "lr-nan": _fault_setting("lr", float("nan")),
    "lr-tensor-nan": _fault_setting("lr", lambda: torch.tensor(float("nan"))),
    "lr-tensor-negative": _fault_setting("lr", lambda: torch.tensor(-1.0)),
    "lr-tensor-2d": _fault_setting("lr", lambda: torch.tensor([[0.1]])),
    "lr-tensor-two-elements": _fault_setting("lr", lambda: torch.tensor([0.1, 0.2])),
    "lr-tensor-meta": _fault_setting("lr", lambda: torch.tensor(0.1, device="meta")),
    "lr-string": _fault_setting("lr", "0.1"),
    "weight-decay-string": _fault_setting("weight_decay", "0.01"),
    "weight-decay-nan": _fault_setting("weight_decay", float("nan")),
    "weight-decay-negative": _fault_setting("weight_decay", -1.0),
    "maximize-not-bool": _fault_setting("maximize", "yes"),
    "k-changed": _fault_k,
    "grad-sparse": _fault_grad(lambda g: g.to_sparse()),
    "grad-dtype": _fault_grad(lambda g: g.double()),
    "grad-shape": _fault_grad(lambda g: torch.zeros(g.numel() + 1)),
}
ANDERSON_FAULTS = {
    "reg-nan": _fault_setting("reg", float("nan")),
    "singular-tol-negative": _fault_setting("singular_tol", -1.0),
    "constraint-unknown": _fault_setting("constraint", "box"),
}


def _cases():
    for name in ("interpolatron", "anderson"):
        faults = dict(FAULTS, **(ANDERSON_FAULTS if name == "anderson" else {}))
        for backend in ("torch", "native"):
            for fault in faults:
                yield pytest.param(name, backend, fault, id=f"{name}-{backend}-{fault}")


@pytest.mark.parametrize("name, backend, fault", list(_cases()))
def test_a_fault_in_any_group_changes_nothing(name, backend, fault):
    need_backend(backend)
    faults = dict(FAULTS, **ANDERSON_FAULTS)
    for gi in range(len(GROUPS)):
        params, twin_params = _params(), _params()
        opt, twin = _make(name, backend, params), _make(name, backend, twin_params)
        rna = interpolatron.RNA(params, window=2, residual="gradients", optimizer=opt, backend="torch")
        twin_rna = interpolatron.RNA(twin_params, window=2, residual="gradients", optimizer=twin,
                                     backend="torch")
        for t in range(3):
            for ps, o in ((params, opt), (twin_params, twin)):
                _set_grads(ps)
                o.step()
            if t == 1:
                rna.record()
                twin_rna.record()
        _set_grads(params)
        _set_grads(twin_params)
        # a member without a gradient: the step would also rotate its ring
        params[1].grad = twin_params[1].grad = None
        before = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()),
                  {n: a.clone() for n, a in rna._acc.items()}, rna._steps_since)
        undo = faults[fault](opt, params, gi)
        with pytest.raises((ValueError, RuntimeError)) as info:
            opt.step()
        assert f"param group {gi}" in str(info.value) or fault.startswith(("grad", "k-changed", "reg", "sing",
                                                                            "constraint"))
        undo()  # (the settings are part of the state_dict)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before[0])), f"group {gi}: params"
        assert _tree_equal(opt.state_dict(), before[1]), f"group {gi}: rings, counts or Anderson state"
        assert _tree_equal(rna._acc, before[2]) and rna._steps_since == before[3], f"group {gi}: RNA"
        # then the same step, now valid, and two more: exactly the twin's path
        for t in range(3):
            if t:
                _set_grads(params)
                _set_grads(twin_params)
            opt.step()
            twin.step()
        for p, q in zip(params, twin_params):
            assert torch.equal(p.detach(), q.detach()), f"fault in group {gi}: diverged from the twin"
        if name == "anderson":
            assert torch.equal(opt.coefficients, twin.coefficients)
        rna.record()
        twin_rna.record()
        assert torch.equal(rna.coefficients, twin_rna.coefficients)
        rna.close()
        twin_rna.close()
