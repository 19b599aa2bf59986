"""Property test: corrupt real checkpoints of every optimizer and check that
each corruption is either refused (a CheckpointError, the optimizer bitwise
unchanged and going on exactly as before) or resumes the identical trajectory.

The corruptions are what validation can see: missing, extra or renamed keys,
wrong types, shapes and dtypes (an exact cast is accepted and must then resume
identically), non-finite values, out-of-range settings and counts, steps that
disagree within a bucket, an asymmetric Gram. Not included: replacing a valid
finite value by another valid one (a different history value, a whole
parameter's state dropped, which reads as "never had a gradient"): no
validation can tell those from a genuine checkpoint.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
from _oracle import Problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optimizers import OPTIMIZERS, make, need_backend

from interpolatron.optim._checkpoint import CheckpointError

SHAPES = [(3, 4), (5,), (2, 3), ()]
BEFORE, AFTER = 4, 3  # steps before the checkpoint and after resuming
EXAMPLES = int(os.environ.get("INTERPOLATRON_CORRUPTIONS", "250"))  # per optimizer and backend
RANDOM = os.environ.get("INTERPOLATRON_CORRUPTIONS_RANDOM")  # set: a fresh random sample (a longer hunt)

def _make(config: str, backend: str, params):
    groups = [dict(params=params[:2], lr=0.1, weight_decay=1e-2), dict(params=params[2:], lr=0.05)]
    return make(config, groups, backend, lr=0.1)


def _params(seed: int):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal(s), dtype=torch.float32).requires_grad_() for s in SHAPES]


PROBLEM = Problem(SHAPES, seed=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds hand-off latency (on a
    loaded machine, tens of ms per op), never speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _step(opt, params, skip=()):
    grads = PROBLEM.grad([p.detach().double().numpy() for p in params])
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i in skip else torch.tensor(g, dtype=p.dtype)
    opt.step()


def _skip(t: int):
    return (1,) if t == BEFORE - 1 else ()  # a parameter without a gradient just before saving


@functools.cache
def _reference(config: str, backend: str):
    """One uninterrupted run (the checkpoint after BEFORE steps, the final
    params after BEFORE + AFTER) and the target's expected path."""
    params = _params(0)
    opt = _make(config, backend, params)
    for t in range(BEFORE):
        _step(opt, params, _skip(t))
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(AFTER):
        _step(opt, params)
    final = [p.detach().clone() for p in params]
    # the target (another run's optimizer): its params after one and two steps
    target_params = _params(1)
    target = _make(config, backend, target_params)
    _step(target, target_params)
    _step(target, target_params)
    return saved_params, saved, final, [p.detach().clone() for p in target_params]


def _target(config: str, backend: str):
    params = _params(1)
    opt = _make(config, backend, params)
    _step(opt, params)
    return opt, params


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


# -- corruptions -------------------------------------------------------------------------------

BAD_SETTINGS = {
    "lr": [-0.1, float("nan"), float("inf"), "0.1", None, True, [0.1], torch.tensor(-0.1),
           torch.tensor(float("nan")), torch.tensor([[0.1]]), torch.tensor([0.1, 0.2]),
           torch.tensor(0.1, device="meta")],
    "weight_decay": [-1.0, float("nan"), float("inf"), "0.01", None, torch.tensor(0.01), [0.0]],
    "maximize": ["no", 1, None],
    "alphas": [(0.5, 0.6), (-0.1, 1.1), (), "ab", None, (float("nan"),)],
    "history": [0, -1, 2.0, "3", None, True, 7],
    "reg": [-1e-3, float("nan"), float("inf"), "0", None],
    "constraint": ["box", 1],
    "singular_tol": [0.0, -1.0, float("nan"), float("inf"), "1e-6", None],
}


def _harmless_settings(key, value):
    """Other spellings of the same setting, which must load and resume identically."""
    if key == "lr" and isinstance(value, float):
        return [torch.tensor(value, dtype=torch.float64), torch.tensor([value], dtype=torch.float64),
                np.float64(value)]
    if key == "weight_decay":
        return [np.float64(value), float(value)]
    if key == "alphas":
        return [list(value)]
    if key == "history":
        return [np.int64(value)]
    return []


def _tensor_mutations(key: str, t: torch.Tensor):
    out = [("drop", None)]
    if t.is_floating_point() and t.numel():
        out += [("poison", float("nan")), ("poison", float("inf")), ("poison", -float("inf"))]
    if t.dim() >= 1 and t.shape[0] > 0:
        out += [("truncate", None), ("extend", None)]
    out += [("unsqueeze", None), ("to", torch.float16), ("to", torch.float64), ("to", torch.int64),
            ("to", torch.bool), ("meta", None), ("string", None)]
    if t.dim() >= 2 and t.shape[0] != t.shape[1]:
        out.append(("transpose", None))
    if t.dim() >= 2 and t.shape[-1] != 1 and t.numel():
        out.append(("flatten", None))
    if t.numel() == 1:
        out += [("python", None), ("reshape1", None)]
    if key in ("step", "anderson_steps", "anderson_fallbacks"):
        out += [("set", -1), ("set", 2.5), ("set", float("nan")), ("set", 10 ** 6), ("float", None)]
    if key == "step":
        out.append(("shift", 1))
    if key == "anderson_gram" and t.shape[0] > 1:
        out.append(("asymmetric", None))
    if key == "anderson_active":
        out.append(("all_false", None))
    return out


def _apply_tensor(kind, arg, t):
    if kind == "poison":
        t = t.clone()
        t.view(-1)[t.numel() // 2] = arg
        return t
    if kind == "truncate":
        return t[:-1].clone()
    if kind == "extend":
        return torch.cat([t, t[:1]])
    if kind == "unsqueeze":
        return t.unsqueeze(0).clone()
    if kind == "to":
        return t.to(arg)
    if kind == "meta":
        return torch.empty_like(t, device="meta")
    if kind == "string":
        return "tensor"
    if kind == "transpose":
        return t.transpose(0, 1).clone()
    if kind == "flatten":
        return t.reshape(t.shape[0], -1)[:, :-1].clone() if t.dim() == 2 else t.flatten(1).clone()
    if kind == "python":
        return t.item()
    if kind == "reshape1":
        return t.reshape(1).clone()
    if kind == "set":
        return torch.tensor(arg, dtype=torch.float64) if isinstance(arg, float) else torch.tensor(arg)
    if kind == "float":
        return t.to(torch.float32)
    if kind == "shift":
        return t + arg
    if kind == "asymmetric":
        t = t.clone()
        t[0, 1] += 1.0
        return t
    if kind == "all_false":
        return torch.zeros_like(t)
    raise AssertionError(kind)


def _candidates(saved: dict) -> list[tuple]:
    """Every corruption of ``saved``, as (path, kind, arg)."""
    out = [(("interpolatron",), "drop", None), (("interpolatron", "algorithm"), "value", "SGD"),
           (("state",), "value", []), (("param_groups",), "drop_group", None),
           (("state",), "extra_entry", 99), (("state",), "extra_entry", "anderson"),
           (("param_groups",), "first_params_short", None), (("param_groups",), "swap_ids", None)]
    for gi, group in enumerate(saved["param_groups"]):
        out.append((("param_groups", gi, "foo"), "value", 1))  # an unknown extra key: harmless
        for key, value in group.items():
            if key == "params":
                continue
            out.append((("param_groups", gi, key), "drop", None))
            for bad in BAD_SETTINGS.get(key, []):
                out.append((("param_groups", gi, key), "value", bad))
            for same in _harmless_settings(key, value):
                out.append((("param_groups", gi, key), "value", same))
    for index, entry in saved["state"].items():
        out.append((("state", index, "momentum_buffer"), "value", torch.zeros(1)))
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                for kind, arg in _tensor_mutations(key, value):
                    out.append((("state", index, key), kind, arg))
    return out


def _corrupt(saved: dict, corruptions: list[tuple]) -> dict:
    sd = copy.deepcopy(saved)
    for path, kind, arg in corruptions:
        _corrupt_one(saved, sd, path, kind, arg)
    return sd


def _corrupt_one(saved: dict, sd: dict, path: tuple, kind: str, arg) -> None:
    *parents, last = path
    node = sd
    for p in parents:
        missing = p not in node if isinstance(node, dict) else p >= len(node)
        if not isinstance(node, (dict, list)) or missing:
            return  # an earlier corruption removed it
        node = node[p]
    if kind not in ("value", "drop_group", "extra_entry", "first_params_short", "swap_ids") and (
            not isinstance(node, dict) or last not in node):
        return
    if kind == "drop":
        del node[last]
    elif kind == "value":
        node[last] = copy.deepcopy(arg)
    elif kind == "drop_group":
        sd["param_groups"].pop()
    elif kind == "extra_entry":
        sd["state"][arg] = copy.deepcopy(next(iter(saved["state"].values())))
    elif kind == "first_params_short":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif kind == "swap_ids":
        ids = sd["param_groups"][0]["params"]
        ids[0], ids[1] = ids[1], ids[0]
    elif isinstance(node[last], torch.Tensor):
        node[last] = _apply_tensor(kind, arg, node[last])


# -- the property ------------------------------------------------------------------------------

def _check_one(config: str, backend: str, corruption: list[tuple]) -> str:
    """Load ``saved`` corrupted by each of ``corruption`` in turn."""
    saved_params, saved, final, target_after_two = _reference(config, backend)
    sd = _corrupt(saved, corruption)
    opt, params = _target(config, backend)
    before_sd = copy.deepcopy(opt.state_dict())
    before_params = [p.detach().clone() for p in params]
    try:
        opt.load_state_dict(sd)
    except CheckpointError:
        assert _same_tree(opt.state_dict(), before_sd), f"refused {corruption} but the state changed"
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_params))
        _step(opt, params)  # and it goes on exactly as it would have
        for i, (p, e) in enumerate(zip(params, target_after_two)):
            assert torch.equal(p.detach(), e), f"refused {corruption}, then parameter {i} went elsewhere"
        return "refused"
    with torch.no_grad():
        for p, s in zip(params, saved_params):
            p.copy_(s)
    for _ in range(AFTER):
        _step(opt, params)
    for i, (p, e) in enumerate(zip(params, final)):
        assert torch.equal(p.detach(), e), f"accepted {corruption}, but parameter {i} resumed elsewhere"
    return "accepted"


# Every configuration of the registry, on the CPU backends.
CASES = [pytest.param(c, b, id=f"{c}-{b}") for c in OPTIMIZERS for b in ("torch", "native")]


@pytest.mark.parametrize("config, backend", CASES)
def test_corrupted_checkpoints_are_refused_or_resume_identically(config, backend):
    need_backend(backend)
    candidates = _candidates(_reference(config, backend)[1])
    outcomes: dict[str, int] = {}

    # Pairs touch different entries, and change at most one step count: two
    # lossy steps on one entry (float16, then float64) or every step of a
    # bucket shifted alike are "a valid value replaced by another".
    pairs = st.lists(st.sampled_from(candidates), min_size=1, max_size=2, unique_by=lambda c: c[0]).filter(
        lambda cs: sum(c[1] in ("shift", "set") for c in cs) <= 1)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=RANDOM is None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(pairs)
    def prop(corruption):
        outcome = _check_one(config, backend, corruption)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    prop()
    # both outcomes occur: the property is not vacuous
    assert outcomes.get("refused", 0) > outcomes.get("accepted", 0) > 0, outcomes


def test_every_corruption_kind_is_exercised_on_one_optimizer():
    """Exhaustively (no sampling) on Anderson k=3, torch backend: every candidate."""
    candidates = _candidates(_reference("anderson-k3", "torch")[1])
    outcomes = [_check_one("anderson-k3", "torch", [c]) for c in candidates]
    assert len(candidates) > 150
    assert outcomes.count("accepted") >= 10 and outcomes.count("refused") >= 100
