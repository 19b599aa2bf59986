"""copy.deepcopy and pickle give optimizers (and RNA) that continue the exact trajectory."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from optimizers import backend_params, make

import interpolatron

# Anderson with the simplex constraint: its solver state is the most to copy.
CONFIGS = ("interpolatron-k3", "anderson-k3-simplex", "anderson-k2-onepass")
COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}
X = torch.randn(16, 6)
Y = torch.randn(16, 1)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _step(model, opt, t):
    opt.zero_grad()
    x = X + 0.1 * t
    torch.nn.functional.mse_loss(model(x), Y).backward()
    opt.step()


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", backend_params(("torch", "native")))
@pytest.mark.parametrize("name", CONFIGS)
def test_copied_optimizer_continues_the_trajectory(name, backend, how):
    model = _model()
    opt = make(name, model.parameters(), backend, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.8)
    for t in range(4):
        _step(model, opt, t)
        sched.step()
    model2, opt2 = COPIES[how]((model, opt))
    assert type(opt2) is type(opt)
    for t in range(4, 10):
        for m, o in ((model, opt), (model2, opt2)):
            _step(m, o, t)
            o.param_groups[0]["lr"].mul_(0.9)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    if name == "anderson":
        assert torch.equal(opt.coefficients, opt2.coefficients)


@pytest.mark.parametrize("residual", ["iterates", "gradients"])
@pytest.mark.parametrize("how", list(COPIES))
def test_copied_rna_continues(residual, how):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rna = interpolatron.RNA(model, window=3, residual=residual, optimizer=opt, backend="torch")
    for t in range(8):
        _step(model, opt, t)
        if t % 2:
            rna.record()
    model2, opt2, rna2 = COPIES[how]((model, opt, rna))
    for t in range(8, 14):
        for m, o, r in ((model, opt, rna), (model2, opt2, rna2)):
            _step(m, o, t)
            if t % 2:
                r.record()
    out, out2 = rna.extrapolate(), rna2.extrapolate()
    assert out.keys() == out2.keys()
    for k in out:
        assert torch.equal(out[k], out2[k]), k
    assert torch.equal(rna.coefficients, rna2.coefficients)
