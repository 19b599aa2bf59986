"""A refused step changes nothing, the param groups' settings included (issue
17 item 6): settings are normalised when a group is added or loaded, and a
step's checks never rewrite them; a value a user assigned between steps in
another valid form (a list of alphas, an int weight decay) is left as it is
by a step that is refused."""

from __future__ import annotations

import pytest
import torch
from optimizers import ALGORITHMS, make


def _typed(value):
    """A value with the type of every part spelled out (0 and 0.0, a list and a
    tuple, differ), tensors by identity and bits."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value.dtype, value.detach().cpu().reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_typed(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _typed(v)) for k, v in value.items()))
    return (type(value).__name__, value)


def _groups(opt):
    return [_typed(g) for g in opt.param_groups]


def _make(name):
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3))
    return make(name, [{"params": [a]}, {"params": [b]}], lr=0.1), (a, b)


def _other_forms(opt, name):
    """Valid values in forms the constructor would have normalised."""
    for g in opt.param_groups:
        g["weight_decay"] = 0  # an int
        if name == "interpolatron":
            g["alphas"] = list(g["alphas"])  # a list
        else:
            g["reg"] = 0  # an int
            g["singular_tol"] = 1  # an int


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("fault", ["lr", "weight_decay", "grad"])
def test_refused_step_leaves_every_group_dict_as_it_was(name, fault):
    opt, (a, b) = _make(name)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()  # state exists: the refused step below is not the first
    _other_forms(opt, name)
    if fault == "lr":
        opt.param_groups[1]["lr"] = -1.0
    elif fault == "weight_decay":
        opt.param_groups[1]["weight_decay"] = float("nan")
    else:
        b.grad = torch.randn(3).to_sparse()  # refused by the step
    before = _groups(opt)
    params = [p.detach().clone() for p in (a, b)]
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert _groups(opt) == before
    assert all(torch.equal(p, q) for p, q in zip((a, b), params))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_add_param_group_and_load_normalise(name):
    """Where settings are normalised: when a group is added and when one is loaded."""
    opt, (a, b) = _make(name)
    c = torch.nn.Parameter(torch.randn(2))
    extra = {"params": [c], "weight_decay": 0}
    if name == "interpolatron":
        extra["alphas"] = list(opt.param_groups[0]["alphas"])
    opt.add_param_group(extra)
    group = opt.param_groups[-1]
    assert type(group["weight_decay"]) is float
    if name == "interpolatron":
        assert group["alphas"] == opt.param_groups[0]["alphas"] and type(group["alphas"]) is tuple
    sd = opt.state_dict()
    sd["param_groups"][0]["weight_decay"] = 0
    opt.load_state_dict(sd)
    assert type(opt.param_groups[0]["weight_decay"]) is float
