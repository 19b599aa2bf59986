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


# -- load_state_dict: explicit cases (the property test samples many more) --------------------

def _saved(name="anderson", steps=3):
    params = _params(6)
    opt = (_anderson(params) if name == "anderson" else
           interpolatron.Interpolatron(_groups(params), lr=0.1, alphas=(0.2, 0.3, 0.5), backend="torch"))
    _run(opt, params, Problem(SHAPES, seed=6), steps)
    return params, opt, copy.deepcopy(opt.state_dict())


def _resume(name, params, sd, steps=3):
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    opt = (_anderson(resumed_params) if name == "anderson" else
           interpolatron.Interpolatron(_groups(resumed_params), lr=0.1, alphas=(0.2, 0.3, 0.5),
                                       backend="torch"))
    opt.load_state_dict(sd)
    _run(opt, resumed_params, Problem(SHAPES, seed=7), steps)
    return resumed_params


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
@pytest.mark.parametrize("spelling", ["python-int", "float32-tensor", "numpy-int"])
def test_a_step_saved_as_a_python_int_or_float_tensor_resumes_identically(name, spelling):
    params, _, sd = _saved(name)
    want = _resume(name, params, copy.deepcopy(sd))
    for entry in sd["state"].values():
        if "step" in entry:
            entry["step"] = {"python-int": int(entry["step"]), "numpy-int": np.int64(int(entry["step"])),
                             "float32-tensor": entry["step"].to(torch.float32)}[spelling]
    got = _resume(name, params, sd)
    for a, b in zip(got, want):
        assert torch.equal(a.detach(), b.detach())


def _set(*path_and_value):
    *path, key, value = path_and_value

    def corrupt(sd):
        node = sd
        for p in path:
            node = node[p]
        if value is _DROP:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value
    return corrupt


_DROP = object()


def _poison(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _all_groups(key, value):
    return lambda sd: [g.__setitem__(key, value) for g in sd["param_groups"]]


REFUSALS = [
    ("a g_hist with one of its two ring slots", _set("state", 1, "g_hist", lambda t: t[:1]),
     r"parameter 1 .*'g_hist'.*shape"),
    ("a missing step", _set("state", 2, "step", _DROP), r"parameter 2 .*lacks 'step'"),
    ("steps that disagree in a bucket", _set("state", 3, "step", 7), r"parameter 3 .*'step' is 7"),
    ("a NaN in a history", _set("state", 0, "x_hist", _poison), r"parameter 0 .*'x_hist'.*non-finite"),
    ("a negative lr", _set("param_groups", 1, "lr", -0.1), r"param group 1.*learning rate"),
    ("a NaN weight_decay", _set("param_groups", 0, "weight_decay", float("nan")),
     r"param group 0.*weight_decay"),
    ("weight_decay -1", _set("param_groups", 0, "weight_decay", -1.0), r"param group 0.*weight_decay"),
    ("an unknown key", _set("state", 2, "momentum_buffer", torch.zeros(1)),
     r"parameter 2 .*unknown key 'momentum_buffer'"),
]
ANDERSON_REFUSALS = [
    ("a missing Anderson state", _set("state", 0, "anderson_gram", _DROP),
     r"parameter 0 lacks 'anderson_gram'"),
    ("a Gram of another k", _set("state", 0, "anderson_gram", torch.zeros(2, 2, dtype=torch.float64)),
     r"'anderson_gram' has shape \(2, 2\), expected \(3, 3\)"),
    ("reg NaN", _all_groups("reg", float("nan")), r"reg must be finite"),
    ("singular_tol -1", _all_groups("singular_tol", -1.0), "singular_tol"),
    ("more fallbacks than steps", _set("state", 0, "anderson_fallbacks", torch.tensor(99)), "exceeds"),
]


@pytest.mark.parametrize("name, what, corrupt, match",
                         [("interpolatron", *r) for r in REFUSALS] + [("anderson", *r) for r in REFUSALS]
                         + [("anderson", *r) for r in ANDERSON_REFUSALS],
                         ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_the_issues_corruptions_are_refused_with_a_clear_message(name, what, corrupt, match):
    params, opt, sd = _saved(name)
    before = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    with pytest.raises(CheckpointError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for i, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert after["param_groups"] == before["param_groups"]
