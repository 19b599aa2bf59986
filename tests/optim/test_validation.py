"""Settings are validated identically on every backend: tensor learning rates
(one element, finite, non-negative, on the parameters' device or the CPU),
Anderson's reg and singular_tol, weight_decay, duplicate parameters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _oracle import Problem
from optimizers import ALGORITHMS, BACKENDS, need_backend

import interpolatron

SHAPES = [(3, 4), (5,)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s), dtype=torch.float32).requires_grad_() for s in SHAPES]


def _cls(name):
    return interpolatron.Interpolatron if name == "interpolatron" else interpolatron.Anderson


BAD = [
    (dict(lr=-0.1), "learning rate"),
    (dict(lr=float("nan")), "finite"),
    (dict(lr=float("inf")), "finite"),
    (dict(lr="0.1"), "real number"),
    (dict(lr=torch.tensor(-0.1)), "learning rate"),
    (dict(lr=torch.tensor(float("nan"))), "learning rate"),
    (dict(lr=torch.tensor([[0.1]])), "one element"),
    (dict(lr=torch.tensor([0.1, 0.2])), "one element"),
    (dict(lr=torch.tensor(0.1, device="meta")), "device"),
    (dict(lr=torch.tensor(True)), "real"),
    (dict(weight_decay="0.01"), "weight_decay"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(weight_decay=torch.tensor(0.01)), "weight_decay"),
    (dict(weight_decay=None), "weight_decay"),
    (dict(maximize="yes"), "maximize"),
]
ANDERSON_BAD = [
    (dict(reg=float("nan")), "reg"),
    (dict(reg=-1.0), "reg"),
    (dict(reg="0"), "reg"),
    (dict(singular_tol=float("nan")), "singular_tol"),
    (dict(singular_tol=-1.0), "singular_tol"),
    (dict(singular_tol=0.0), "singular_tol"),
    (dict(history=True), "history"),
]


def _bad_cases():
    for backend in BACKENDS:
        for name in ALGORITHMS:
            for kw, match in BAD + (ANDERSON_BAD if name == "anderson" else []):
                key = next(iter(kw))
                yield pytest.param(name, backend, kw, match, id=f"{name}-{backend}-{key}-{kw[key]!r}")


@pytest.mark.parametrize("name, backend, kw, match", list(_bad_cases()))
def test_invalid_settings_are_refused_on_every_backend(name, backend, kw, match):
    need_backend(backend)
    kw = dict(dict(lr=0.1), **kw)
    with pytest.raises(ValueError, match=match):
        _cls(name)(_params(), backend=backend, **kw)
    # and as a param group added later (the optimizer stays as it was)
    opt = _cls(name)(_params()[:1], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(dict(params=_params()[1:], **kw))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_element_tensor_lr_works_like_the_float(name, backend):
    """``torch.tensor([0.1])`` (which torch.optim accepts) and a 0-dim float64
    tensor give bitwise the float lr's trajectory."""
    need_backend(backend)
    problem = Problem(SHAPES, seed=1)
    finals = []
    for lr in (0.1, torch.tensor([0.1], dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)):
        params = _params(1)
        opt = _cls(name)(params, lr=lr, backend=backend)
        for _ in range(3):
            for p, g in zip(params, problem.grad([p.detach().double().numpy() for p in params])):
                p.grad = torch.tensor(g, dtype=p.dtype)
            opt.step()
        finals.append([p.detach().clone() for p in params])
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_new_tensor_lr_object_is_checked_at_step_but_the_same_one_is_not_reread(name, monkeypatch):
    """The value of a tensor lr is read (a host sync) when the group gets a new
    tensor object, not at every step."""
    params = _params(2)
    lr = torch.tensor(0.1)
    opt = _cls(name)(params, lr=lr, backend="torch")
    reads = []
    original = torch.Tensor.__float__

    def counting(self):
        reads.append(self)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counting)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert reads == []
    opt.param_groups[0]["lr"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert len(reads) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_duplicate_parameters_are_refused(name, backend):
    need_backend(backend)
    p, q = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear error, not torch's warning
        with pytest.raises(ValueError, match="twice"):
            _cls(name)([p, q, p], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="more than one"):
        _cls(name)([dict(params=[p]), dict(params=[q, p])], lr=0.1, backend=backend)
    opt = _cls(name)([p], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group(dict(params=[q, q]))
    assert len(opt.param_groups) == 1
