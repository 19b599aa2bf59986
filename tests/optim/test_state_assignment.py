"""Per-parameter state replaced outside ``load_state_dict`` after the optimizer
has stepped: ``ZeroRedundancyOptimizer.load_state_dict`` assigns
``optimizer.state[p]`` directly, and so may a user or a tool. The buckets
used to keep stepping their old rings while ``state`` showed the loaded ones
(a silently wrong resume: 6e-3 (Interpolatron) and 2e-2 (Anderson) off the
uninterrupted run after 3 steps). The next step now reloads the state as
``load_state_dict`` would: validated (a bad value is refused and nothing
changes), buckets rebuilt from it. The distributed ZeRO case is in
tests/integration/test_zero_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch
from optimizers import ALGORITHMS, make

from interpolatron.optim._checkpoint import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SAVED_AT, DETOUR, AFTER = 3, 2, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _batch(t: int):
    gen = torch.Generator().manual_seed(1000 + t)
    return (torch.randn(8, 5, generator=gen, dtype=torch.float64),
            torch.randn(8, 3, generator=gen, dtype=torch.float64))


def _train(model, step, opt, steps):
    for t in steps:
        x, y = _batch(t)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        step()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _reference(name: str) -> list[torch.Tensor]:
    """Uninterrupted: the saved steps, then the steps after the detour."""
    model = _model()
    opt = make(name, model.parameters(), weight_decay=1e-3)
    _train(model, opt.step, opt, range(SAVED_AT))
    _train(model, opt.step, opt, range(SAVED_AT + DETOUR, SAVED_AT + DETOUR + AFTER))
    return _params(model)


def _detour(name: str, restore, compiled: bool = False) -> list[torch.Tensor]:
    """Step, save the state, step on (a detour), put the saved parameters back and
    ``restore(opt, saved)`` the state by assignment, step on."""
    model = _model()
    opt = make(name, model.parameters(), weight_decay=1e-3)
    step = torch.compile(opt.step, backend="eager", fullgraph=True) if compiled else opt.step
    _train(model, step, opt, range(SAVED_AT))
    saved = {p: copy.deepcopy(opt.state[p]) for p in model.parameters()}
    x_saved = _params(model)
    _train(model, step, opt, range(SAVED_AT, SAVED_AT + DETOUR))
    with torch.no_grad():
        for p, x in zip(model.parameters(), x_saved):
            p.copy_(x)
    restore(opt, saved)
    _train(model, step, opt, range(SAVED_AT + DETOUR, SAVED_AT + DETOUR + AFTER))
    return _params(model)


def _assign_dicts(opt, saved):
    for p, st in saved.items():
        opt.state[p] = copy.deepcopy(st)  # what ZeroRedundancyOptimizer.load_state_dict does


def _assign_entries(opt, saved):
    for p, st in saved.items():
        for key, value in st.items():
            opt.state[p][key] = value.clone()  # the dicts stay, their tensors are replaced


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("restore", [_assign_dicts, _assign_entries], ids=["dicts", "entries"])
def test_state_assigned_after_steps_resumes_bitwise(name, restore):
    got, ref = _detour(name, restore), _reference(name)
    assert _max_diff(got, ref) == 0.0


@pytest.mark.parametrize("name", ALGORITHMS)
def test_state_assigned_between_compiled_steps_resumes_bitwise(name):
    """A compiled step guards on the state's tensors: the replaced ones retrace it,
    and the retrace's host setup reloads them."""
    torch._dynamo.reset()
    try:
        got = _detour(name, _assign_dicts, compiled=True)
    finally:
        torch._dynamo.reset()
    assert _max_diff(got, _reference(name)) == 0.0


def _snapshot(model, opt):
    groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else copy.copy(v))
               for k, v in g.items() if k != "params"} for g in opt.param_groups]
    rings = [t.clone() for b in opt._plan.buckets.values() for t in (b.x_hist, b.g_hist, b.count)]
    return _params(model), groups, rings


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("fault", ["shape", "nan", "unknown-key", "step"])
def test_bad_assigned_state_is_refused_and_changes_nothing(name, fault):
    model = _model()
    opt = make(name, model.parameters(), weight_decay=1e-3)
    _train(model, opt.step, opt, range(SAVED_AT))
    p = list(model.parameters())[2]
    bad = copy.deepcopy(opt.state[p])
    if fault == "shape":
        bad["x_hist"] = bad["x_hist"][:, :1].clone()
    elif fault == "nan":
        bad["g_hist"][(0,) * bad["g_hist"].dim()] = float("nan")
    elif fault == "unknown-key":
        bad["exp_avg"] = torch.zeros_like(p)
    else:
        bad["step"] = torch.tensor(-1)
    for g in opt.param_groups:
        g["weight_decay"] = 0  # a valid value in another form: a refused step leaves it so
    opt.state[p] = bad
    before = _snapshot(model, opt)
    x, y = _batch(SAVED_AT)
    opt.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(CheckpointError, match="optimizer.state was replaced"):
        opt.validate_step()
    with pytest.raises(CheckpointError, match="optimizer.state was replaced"):
        opt.step()
    assert _same(_snapshot(model, opt), before)
    assert opt.state[p] is bad  # what was put there stays (nothing was swapped in)
    assert all(type(g["weight_decay"]) is int for g in opt.param_groups)


def test_partial_replacement_loads_like_load_state_dict():
    """One parameter's history replaced: the step resumes as load_state_dict of
    the state with that replacement would (bitwise)."""
    runs = []
    for via_load in (False, True):
        model = _model()
        opt = make("anderson", model.parameters(), weight_decay=1e-3)
        _train(model, opt.step, opt, range(SAVED_AT))
        p = list(model.parameters())[1]
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn(opt.state[p]["x_hist"].shape, generator=gen, dtype=torch.float64)
        if via_load:
            sd = copy.deepcopy(opt.state_dict())
            sd["state"][1]["x_hist"] = sd["state"][1]["x_hist"] + noise
            opt.load_state_dict(sd)
        else:
            opt.state[p]["x_hist"] = opt.state[p]["x_hist"] + noise
        _train(model, opt.step, opt, range(SAVED_AT, SAVED_AT + AFTER))
        runs.append(_params(model))
    assert _max_diff(*runs) == 0.0
