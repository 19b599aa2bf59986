"""Checkpoints: the DCP-compatible layout (parameter keys only, Anderson's
settings in the param groups, its optimizer-wide state on the anchor
parameter) and load_state_dict's all-or-nothing validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _oracle import Problem

import interpolatron
from interpolatron.optim._checkpoint import CheckpointError

SHAPES = [(3, 5), (7,), (2, 3, 4), ()]


def _params(seed: int, shapes=SHAPES, dtype=torch.float64) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s), dtype=dtype).requires_grad_() for s in shapes]


def _groups(params):
    return [dict(params=params[:2], lr=0.1, weight_decay=1e-2), dict(params=params[2:], lr=0.05)]


def _anderson(params, **kw):
    return interpolatron.Anderson(_groups(params), lr=0.1, history=3, reg=1e-3, backend="torch", **kw)


def _run(opt, params, problem, steps, skip=()):
    for _ in range(steps):
        grads = problem.grad([p.detach().numpy() for p in params])
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in skip else torch.tensor(g, dtype=p.dtype)
        opt.step()


# -- D1: the layout --------------------------------------------------------------------------

def test_anderson_state_has_parameter_keys_only_and_settings_in_the_groups():
    params = _params(0)
    opt = _anderson(params, constraint="simplex")
    _run(opt, params, Problem(SHAPES, seed=0), 4)
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    anchor = opt.state[params[0]]
    assert anchor["anderson_gram"].shape == (3, 3) and anchor["anderson_gram"].dtype == torch.float64
    assert int(anchor["anderson_steps"]) == 4
    assert anchor["anderson_coefficients"] is opt.coefficients
    assert anchor["anderson_fallbacks"] is opt.fallbacks
    assert not any(k.startswith("anderson") for p in params[1:] for k in opt.state[p])
    for g in opt.state_dict()["param_groups"]:
        assert (g["history"], g["reg"], g["constraint"]) == (3, 1e-3, "simplex")
    assert (opt.history, opt.reg, opt.constraint) == (3, 1e-3, "simplex")
    with pytest.raises(AttributeError):
        opt.history = 2


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_resume_without_the_interpolatron_key_is_bit_identical(name):
    """DCP drops the top-level "interpolatron" key: loading works from the
    groups and per-parameter state alone."""
    def make(params):
        if name == "anderson":
            return _anderson(params)
        return interpolatron.Interpolatron(_groups(params), lr=0.1, alphas=(0.2, 0.3, 0.5), backend="torch")

    problem = Problem(SHAPES, seed=1)
    ref_params = _params(2)
    ref = make(ref_params)
    _run(ref, ref_params, problem, 9, skip=())
    params = _params(2)
    opt = make(params)
    _run(opt, params, problem, 5)
    sd = copy.deepcopy(opt.state_dict())
    del sd["interpolatron"]
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = make(resumed_params)
    resumed.load_state_dict(sd)
    _run(resumed, resumed_params, problem, 4)
    for p, r in zip(resumed_params, ref_params):
        assert torch.equal(p.detach(), r.detach())


def test_deepcopy_carries_anderson_settings_and_state():
    params = _params(3)
    opt = _anderson(params, singular_tol=1e-5)
    _run(opt, params, Problem(SHAPES, seed=3), 3)
    twin = copy.deepcopy(opt)
    assert twin.singular_tol == 1e-5 and twin.history == 3
    assert torch.equal(twin.coefficients, opt.coefficients)


def test_old_layout_checkpoint_is_refused_clearly():
    params = _params(4)
    opt = _anderson(params)
    _run(opt, params, Problem(SHAPES, seed=4), 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["anderson"] = {"gram": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match="old layout"):
        _anderson(_params(4)).load_state_dict(sd)


def test_optimizer_wide_settings_must_agree_across_groups():
    params = _params(5)
    with pytest.raises(ValueError, match="optimizer-wide"):
        interpolatron.Anderson([dict(params=params[:2]), dict(params=params[2:], reg=0.1)], lr=0.1)
