"""torch.optim conventions: checkpoints, params without gradients, input
validation that changes nothing, zero-size params, closures, schedulers,
tensor learning rates, backend selection and diagnostics."""

from __future__ import annotations

import copy
import io
import types

import numpy as np
import pytest
import torch
from _oracle import AndersonOracle, InterpolatronOracle, Problem
from optimizers import info, make

import interpolatron
from interpolatron.optim._checks import check_grad

SHAPES = [(3, 5), (7,), (2, 3, 4), ()]


def _init(seed: int, shapes=SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def _params(arrays, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=dtype).requires_grad_() for a in arrays]


def _groups(params):
    return [dict(params=params[:2], lr=0.1, weight_decay=1e-2), dict(params=params[2:], lr=0.05)]


def make_interpolatron(params, **kw):
    return make("interpolatron", _groups(params), lr=0.1, **kw)


def make_anderson(params, **kw):
    return make("anderson", _groups(params), lr=0.1, **kw)


MAKERS = {"interpolatron": make_interpolatron, "anderson": make_anderson}


def _set_grads(params, problem, skip=()):
    grads = problem.grad([p.detach().double().numpy() for p in params])
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i in skip else torch.tensor(g, dtype=p.dtype)
    return [None if i in skip else g for i, g in enumerate(grads)]


def _run(opt, params, problem, steps, skips=None, start=0):
    """``skips[t]``: the parameters without a gradient at (global) step t."""
    for t in range(start, start + steps):
        _set_grads(params, problem, (skips or {}).get(t, ()))
        opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_same_tree(a, b, path="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


def _assert_unchanged(opt, params, snapshot):
    before_params, before_state = snapshot
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    _assert_same_tree(opt.state_dict(), before_state)


# -- checkpoints ----------------------------------------------------------------------

ROUND_TRIP_SKIPS = {
    "all-grads": {},
    # a parameter without a gradient just before saving and just after resuming
    "skip-around-save": {5: (1,), 6: (1,), 7: (0, 1)},
    # a whole group without gradients at the first steps after resuming
    "group-idle-after-resume": {6: (2, 3), 7: (2, 3)},
}


@pytest.mark.parametrize("skips", list(ROUND_TRIP_SKIPS))
@pytest.mark.parametrize("via", ["in-memory", "torch.save"])
@pytest.mark.parametrize("name", ["interpolatron", "anderson", "anderson-simplex"])
def test_state_dict_round_trip_resumes_bit_identically(name, via, skips):
    make = MAKERS[name.split("-")[0]]
    kw = dict(constraint="simplex") if name.endswith("simplex") else {}
    skips = ROUND_TRIP_SKIPS[skips]
    problem = Problem(SHAPES, seed=11)
    n_before, n_after = 6, 7

    ref_params = _params(_init(12))
    ref = make(ref_params, **kw)
    _run(ref, ref_params, problem, n_before + n_after, skips)

    params = _params(_init(12))
    opt = make(params, **kw)
    _run(opt, params, problem, n_before, skips)
    saved = {"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}
    if via == "torch.save":
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf)
    frozen = copy.deepcopy(opt.state_dict())

    resumed_params = _params(_init(99))  # different values: everything comes from the checkpoint
    with torch.no_grad():
        for p, s in zip(resumed_params, saved["params"]):
            p.copy_(s)
    resumed = make(resumed_params, **kw)
    resumed.load_state_dict(saved["opt"])
    _run(resumed, resumed_params, problem, n_after, skips, start=n_before)

    for i, (p, r) in enumerate(zip(resumed_params, ref_params)):
        assert torch.equal(p.detach(), r.detach()), f"parameter {i} differs after resuming"
    if name.startswith("anderson"):
        assert torch.equal(resumed.coefficients, ref.coefficients)
        assert int(resumed.fallbacks) == int(ref.fallbacks)
    # the resumed optimizer did not write into the one it was loaded from
    _assert_same_tree(opt.state_dict(), frozen)


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_state_holds_k_minus_1_iterates_and_gradients(name):
    """k = 2: one stored iterate and one stored gradient per parameter, Adam's
    footprint (Anderson's Gram pass is read-only; its update pass stores g)."""
    params = _params(_init(0))
    opt = (interpolatron.Interpolatron(params, lr=0.1, alphas=(0.05, 0.95), backend="torch")
           if name == "interpolatron" else interpolatron.Anderson(params, lr=0.1, history=2, backend="torch"))
    _run(opt, params, Problem(SHAPES, seed=0), 2)
    for p in params:
        st = opt.state[p]
        assert st["x_hist"].shape == (1, *p.shape) and st["g_hist"].shape == (1, *p.shape)
        assert int(st["step"]) == 2


# -- params without gradients -------------------------------------------------------------

def _oracle_for(name, init, **kw):
    """The oracle of ``make(name)`` with this file's groups."""
    groups = [dict(params=init[:2], lr=0.1, weight_decay=1e-2), dict(params=init[2:], lr=0.05)]
    settings = info(name).kwargs
    if name == "interpolatron":
        for g in groups:
            g["alphas"] = settings["alphas"]
        return InterpolatronOracle(groups)
    return AndersonOracle(groups, history=settings["history"], reg=settings["reg"], **kw)


def _check_against_oracle(name, skips, steps=12):
    """``skips[t]``: the indices of the parameters without a gradient at step t."""
    problem = Problem(SHAPES, seed=21)
    init = _init(22)
    params = _params(init)
    opt = MAKERS[name](params)
    oracle = _oracle_for(name, init)
    for t in range(steps):
        skip = skips.get(t, ())
        before = [p.detach().clone() for p in params]
        _set_grads(params, problem, skip)
        grads = problem.grad(oracle.flat_params())
        grads = [None if i in skip else g for i, g in enumerate(grads)]
        opt.step()
        oracle.step([grads[:2], grads[2:]])
        for i, (p, e) in enumerate(zip(params, oracle.flat_params())):
            np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12,
                                       err_msg=f"parameter {i} after step {t + 1} (skipped: {skip})")
            if i in skip:
                assert torch.equal(p.detach(), before[i])
    return opt, params


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_param_that_never_has_a_gradient_is_untouched(name):
    opt, params = _check_against_oracle(name, {t: (1,) for t in range(12)})
    assert params[1] not in opt.state or "x_hist" not in opt.state[params[1]]


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_param_that_skips_steps_keeps_an_aligned_history(name):
    _check_against_oracle(name, {3: (0,), 4: (0, 3), 7: (2,)})


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_param_that_joins_late_starts_warm(name):
    _check_against_oracle(name, {0: (1, 2), 1: (1, 2), 2: (2,)})


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_whole_group_without_gradients_skips_and_resumes(name):
    """Group 1 (params 2 and 3) has no gradient at steps 4 and 5."""
    _check_against_oracle(name, {4: (2, 3), 5: (2, 3)})


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_step_without_any_gradient_changes_nothing(name):
    params = _params(_init(3))
    opt = MAKERS[name](params)
    _run(opt, params, Problem(SHAPES, seed=3), 3)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    snap = _snapshot(opt, params)
    opt.step()
    _assert_unchanged(opt, params, snap)


# -- invalid inputs: clear errors that change nothing -----------------------------------------

def _trained(name, steps=3):
    params = _params(_init(5))
    opt = MAKERS[name](params)
    problem = Problem(SHAPES, seed=5)
    _run(opt, params, problem, steps)
    _set_grads(params, problem)
    return opt, params, problem


def _assert_step_refused(opt, params, problem, error, match):
    """The step raises, nothing changes, and the optimizer then goes on exactly
    like a twin that never saw the bad step."""
    snap = _snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    _assert_unchanged(opt, params, snap)
    _assert_goes_on_like_a_twin(opt, params, problem)


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_sparse_gradient_is_refused(name):
    opt, params, problem = _trained(name)
    params[1].grad = params[1].grad.to_sparse()
    _assert_step_refused(opt, params, problem, RuntimeError, "sparse")


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_complex_gradient_is_refused(name):
    opt, params, problem = _trained(name)
    params[2].grad_dtype = None  # let torch accept a gradient of another dtype
    params[2].grad = params[2].grad.to(torch.complex128)
    _assert_step_refused(opt, params, problem, RuntimeError, "complex")


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_gradient_of_another_dtype_is_refused(name):
    opt, params, problem = _trained(name)
    params[0].grad_dtype = None
    params[0].grad = params[0].grad.float()
    _assert_step_refused(opt, params, problem, RuntimeError, "dtype")


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_gradient_of_another_shape_is_refused(name):
    opt, params, problem = _trained(name)
    params[1].grad.set_(torch.zeros(8, dtype=torch.float64))  # torch refuses to assign one
    _assert_step_refused(opt, params, problem, RuntimeError, "shape")


def test_gradient_on_another_device_is_refused():
    """torch itself refuses to assign such a gradient, so the optimizer's own
    check is exercised on a stand-in parameter."""
    p = types.SimpleNamespace(grad=torch.zeros(3, device="meta"), dtype=torch.float32,
                              device=torch.device("cpu"), shape=torch.Size([3]))
    with pytest.raises(RuntimeError, match="meta"):
        check_grad(p)


@pytest.mark.parametrize("alphas, match", [
    ((-0.1, 1.1), r"\[0, 1\]"),
    ((1.5, -0.5), r"\[0, 1\]"),
    ((0.3, 0.3), "sum to 1"),
    ((0.5, 0.6), "sum to 1"),
    ((), "at least one"),
    ((float("nan"), 1.0), r"\[0, 1\]"),
    (("a", "b"), "sequence of numbers"),
    (0.5, "sequence of numbers"),
])
def test_invalid_alphas_are_refused(alphas, match):
    with pytest.raises(ValueError, match=match):
        interpolatron.Interpolatron([torch.zeros(2, requires_grad=True)], lr=0.1, alphas=alphas)


def test_invalid_alphas_in_a_param_group_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        interpolatron.Interpolatron([{"params": [torch.zeros(2)], "alphas": (0.2, 0.2)}], lr=0.1)


def test_add_param_group_with_invalid_settings_changes_nothing():
    params = _params(_init(6))
    opt = make_interpolatron(params[:3])
    before = [dict(g) for g in opt.param_groups]
    for bad in (dict(alphas=(0.7, 0.7)), dict(lr=-1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            opt.add_param_group(dict(params=[params[3]], **bad))
        assert len(opt.param_groups) == len(before)
        for g, b in zip(opt.param_groups, before):
            assert g.keys() == b.keys() and all(g[k] is b[k] or g[k] == b[k] for k in g)
    # and the parameter can still be added properly afterwards
    opt.add_param_group(dict(params=[params[3]], alphas=(0.5, 0.5, 0.0)))
    assert len(opt.param_groups) == len(before) + 1


def test_alphas_invalidated_after_construction_are_refused_at_step():
    opt, params, problem = _trained("interpolatron")
    opt.param_groups[1]["alphas"] = (0.5, 0.6, -0.1)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        opt.step()
    for p, b in zip(params, snap[0]):
        assert torch.equal(p.detach(), b)


def test_changing_k_after_the_history_exists_is_refused():
    opt, params, problem = _trained("interpolatron")
    opt.param_groups[0]["alphas"] = (0.5, 0.5)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="k"):
        opt.step()
    for p, b in zip(params, snap[0]):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(history=0), "history"),
    (dict(history=-2), "history"),
    (dict(history=2.0), "history"),
    (dict(history="3"), "history"),
    (dict(reg=-1e-3), "reg"),
    (dict(constraint="box"), "constraint"),
    (dict(lr=-0.1), "learning rate"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_invalid_anderson_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpolatron.Anderson([torch.zeros(2, requires_grad=True)], **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_unsupported_parameter_dtypes_are_refused(name, dtype):
    p = torch.zeros(3, dtype=dtype)
    cls = interpolatron.Interpolatron if name == "interpolatron" else interpolatron.Anderson
    with pytest.raises(TypeError, match="complex" if dtype.is_complex else "dtype"):
        cls([p], lr=0.1)


# -- state_dicts from another configuration ------------------------------------------------------

def _foreign_state_dicts():
    def run(opt, params):
        _run(opt, params, Problem([tuple(p.shape) for p in params], seed=8), 3)
        return opt.state_dict()

    p = _params(_init(8))
    yield "interpolatron-k2", run(
        interpolatron.Interpolatron(_groups(p), alphas=(0.4, 0.6), backend="torch"), p)
    p = _params(_init(8))
    yield "anderson-k3", run(make_anderson(p), p)
    p = _params(_init(8))
    yield "anderson-k2", run(make_anderson(p, history=2), p)
    p = _params(_init(8, [(5, 3), (7,), (2, 3, 4), ()]))
    yield "interpolatron-k3-other-shapes", run(make_interpolatron(p), p)
    p = _params(_init(8, [(3, 5), (7,), (2, 3, 4), (), (2,)]))
    yield "interpolatron-k3-extra-param", run(interpolatron.Interpolatron(
        [dict(params=p[:2], lr=0.1), dict(params=p[2:], lr=0.05)], alphas=(0.2, 0.3, 0.5),
        backend="torch"), p)
    p = _params(_init(8))
    sgd = torch.optim.SGD(_groups(p), lr=0.1, momentum=0.9)
    yield "torch-sgd", run(sgd, p)
    p = _params(_init(8))
    adam = torch.optim.Adam([{"params": p}], lr=0.1)
    yield "torch-adam-one-group", run(adam, p)


FOREIGN = dict(_foreign_state_dicts())
REFUSED = [
    ("interpolatron", "interpolatron-k2"),
    ("interpolatron", "anderson-k3"),
    ("interpolatron", "interpolatron-k3-other-shapes"),
    ("interpolatron", "interpolatron-k3-extra-param"),
    ("interpolatron", "torch-sgd"),
    ("interpolatron", "torch-adam-one-group"),
    ("anderson", "anderson-k2"),
    ("anderson", "interpolatron-k2"),
    ("anderson", "torch-sgd"),
]


@pytest.mark.parametrize("name, foreign", REFUSED, ids=[f"{a}<-{b}" for a, b in REFUSED])
def test_state_dict_of_another_configuration_is_refused_and_changes_nothing(name, foreign):
    opt, params, problem = _trained(name)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.load_state_dict(copy.deepcopy(FOREIGN[foreign]))
    _assert_unchanged(opt, params, snap)
    _assert_goes_on_like_a_twin(opt, params, problem)


def _assert_goes_on_like_a_twin(opt, params, problem):
    """The optimizer goes on exactly like a twin rebuilt from its state_dict."""
    snap = _snapshot(opt, params)
    twin_params = _params([s.numpy() for s in snap[0]])
    maker = make_interpolatron if isinstance(opt, interpolatron.Interpolatron) else make_anderson
    twin = maker(twin_params)
    twin.load_state_dict(copy.deepcopy(snap[1]))
    for _ in range(2):
        grads = problem.grad([p.detach().numpy() for p in params])
        for ps in (params, twin_params):
            for p, g in zip(ps, grads):
                p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


# -- zero-size parameters, zero_grad, closures ---------------------------------------------------

@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_zero_size_parameters_work(name):
    shapes = [(3, 5), (0,), (2, 0, 4), ()]
    problem = Problem(shapes, seed=13)
    init = _init(14, shapes)
    params = _params(init)
    opt = MAKERS[name](params)
    oracle = _oracle_for(name, init)
    for _ in range(6):
        _set_grads(params, problem)
        grads = problem.grad(oracle.flat_params())
        opt.step()
        oracle.step([grads[:2], grads[2:]])
    for p, e in zip(params, oracle.flat_params()):
        assert p.shape == e.shape
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_only_zero_size_parameters(name):
    p = torch.zeros(0, requires_grad=True)
    opt = (interpolatron.Interpolatron if name == "interpolatron" else interpolatron.Anderson)(
        [p], lr=0.1, backend="torch")
    for _ in range(3):
        p.grad = torch.zeros(0)
        opt.step()
    assert p.shape == (0,)


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_zero_grad_sets_none_and_step_closure_returns_the_loss(name):
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    X = torch.randn(10, 4, dtype=torch.float64)
    opt = (interpolatron.Interpolatron([w, b], lr=0.1, alphas=(0.5, 0.5), backend="torch")
           if name == "interpolatron" else interpolatron.Anderson([w, b], lr=0.1, backend="torch"))
    returned = []

    def closure():
        opt.zero_grad()
        loss = ((X @ w + b) ** 2).mean()
        loss.backward()
        returned.append(loss)
        return loss

    w0, b0 = w.detach().clone(), b.detach().clone()
    loss = opt.step(closure)
    assert loss is returned[-1]
    # the first step is SGD with the closure's gradient
    gw, gb = torch.autograd.functional.jacobian(lambda w_, b_: ((X @ w_ + b_) ** 2).mean(), (w0, b0))
    torch.testing.assert_close(w.detach(), w0 - 0.1 * gw, rtol=0, atol=1e-14)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * gb, rtol=0, atol=1e-14)
    opt.zero_grad()
    assert w.grad is None and b.grad is None
    assert opt.step() is None


# -- schedulers and tensor learning rates ---------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=10,
                                                                 cycle_momentum=False),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=3),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_schedulers_drive_the_learning_rate(name, sched_name):
    problem = Problem(SHAPES, seed=15)
    init = _init(16)
    params = _params(init)
    opt = MAKERS[name](params)
    sched = SCHEDULERS[sched_name](opt)
    oracle = _oracle_for(name, init)
    used = []
    for t in range(4):
        _set_grads(params, problem)
        grads = problem.grad(oracle.flat_params())
        lrs = [float(g["lr"]) for g in opt.param_groups]
        used.append(lrs)
        opt.step()
        oracle.step([grads[:2], grads[2:]], lrs=lrs)
        if sched_name == "ReduceLROnPlateau":
            sched.step(1.0 + t)  # a worsening metric: reduce every time
        else:
            sched.step()
        for p, e in zip(params, oracle.flat_params()):
            np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)
    assert len({tuple(u) for u in used}) > 1, "the scheduler never changed the learning rate"


@pytest.mark.parametrize("name", ["interpolatron", "anderson"])
def test_tensor_learning_rate_updated_in_place(name):
    problem = Problem(SHAPES, seed=17)
    init = _init(18)
    params = _params(init)
    lr = torch.tensor(0.1, dtype=torch.float64)
    if name == "interpolatron":
        opt = interpolatron.Interpolatron(params, lr=lr, alphas=(0.2, 0.3, 0.5), backend="torch")
        oracle = InterpolatronOracle([dict(params=init, lr=0.1, alphas=(0.2, 0.3, 0.5))])
    else:
        opt = interpolatron.Anderson(params, lr=lr, history=3, backend="torch")
        oracle = AndersonOracle([dict(params=init, lr=0.1)], history=3)
    assert opt.param_groups[0]["lr"] is lr
    for value in (0.1, 0.03, 0.2, 0.07):
        lr.fill_(value)
        _set_grads(params, problem)
        grads = problem.grad(oracle.flat_params())
        opt.step()
        oracle.step([grads], lrs=[value])
        for p, e in zip(params, oracle.flat_params()):
            np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)


# -- backends ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [interpolatron.Interpolatron, interpolatron.Anderson])
def test_unknown_backend_is_a_value_error(cls):
    with pytest.raises(ValueError, match="nonexistent"):
        cls([torch.zeros(2, requires_grad=True)], lr=0.1, backend="nonexistent")


def _construct(cls, p, backend):
    if cls is interpolatron.RNA:
        return cls([p], window=2, backend=backend)
    return cls([p], lr=0.1, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("cls", [interpolatron.Interpolatron, interpolatron.Anderson, interpolatron.RNA])
def test_unavailable_backend_says_what_is_missing(cls, backend):
    """Wherever availability() says the backend cannot serve (CPU without the
    interpreter or the extension, the meta device), construction raises
    BackendUnavailable with that reason."""
    cases = [(dev, interpolatron.availability(dev, torch.float32)[backend]) for dev in ("cpu", "meta")]
    cases = [(dev, why) for dev, why in cases if why is not None]
    if not cases:
        pytest.skip(f"backend {backend!r} is available on every device tried here")
    for dev, why in cases:
        p = torch.zeros(2, device=dev, requires_grad=True)
        with pytest.raises(interpolatron.BackendUnavailable) as info:
            _construct(cls, p, backend)
        message = str(info.value)
        assert backend in message and why in message


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("cls", [interpolatron.Interpolatron, interpolatron.Anderson, interpolatron.RNA])
def test_backend_whose_module_is_missing_names_the_import(cls, backend, monkeypatch):
    """A backend whose module (an optional dependency, the compiled extension)
    cannot be imported is unavailable, and the error says which import failed."""
    from interpolatron import backends

    monkeypatch.setitem(backends._MODULES, backend, "interpolatron.backends.no_such_module_for_tests")
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(interpolatron.BackendUnavailable) as info:
        _construct(cls, p, backend)
    message = str(info.value)
    assert backend in message and "no_such_module_for_tests" in message


def test_auto_backend_on_cpu_runs_and_reports_its_choice():
    params = _params(_init(19))
    opt = interpolatron.Interpolatron(params, lr=0.1, backend="auto")
    _run(opt, params, Problem(SHAPES, seed=19), 1)
    chosen = set(opt.backends_in_use().values())
    assert chosen and chosen <= set(interpolatron.backends.BACKEND_NAMES)


# -- diagnostics -------------------------------------------------------------------------------------

def test_diagnostics_grad_norm_is_the_norm_of_the_effective_gradient():
    problem = Problem(SHAPES, seed=23)
    init = _init(24)
    params = _params(init)
    opt = interpolatron.Interpolatron(_groups(params), lr=0.1, alphas=(0.3, 0.7), diagnostics=True,
                                      backend="torch")
    for _ in range(3):
        raw = _set_grads(params, problem)
        eff = [g + (1e-2 * p.detach().numpy() if i < 2 else 0.0) for i, (p, g) in enumerate(zip(params, raw))]
        opt.step()
        true = np.sqrt(sum(float(np.sum(e * e)) for e in eff))
        assert float(opt.diagnostics["grad_norm"]) == pytest.approx(true, rel=1e-12)
        assert float(opt.diagnostics["grad_norm_sq"]) == pytest.approx(true ** 2, rel=1e-12)


def test_diagnostics_grad_cosine_of_two_known_gradients():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Interpolatron([p], lr=0.1, alphas=(0.5, 0.5), diagnostics=True, backend="torch")
    p.grad = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()
    assert "grad_cosine" not in opt.diagnostics  # no previous gradient yet
    p.grad = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    opt.step()
    assert float(opt.diagnostics["grad_cosine"]) == pytest.approx(1 / np.sqrt(2), rel=1e-12)
    p.grad = torch.tensor([-2.0, -2.0, 0.0], dtype=torch.float64)
    opt.step()
    assert float(opt.diagnostics["grad_cosine"]) == pytest.approx(-1.0, rel=1e-12)
    assert float(opt.diagnostics["grad_norm"]) == pytest.approx(np.sqrt(8), rel=1e-12)


def test_diagnostics_off_is_an_error():
    opt = interpolatron.Interpolatron([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(RuntimeError, match="diagnostics=True"):
        opt.diagnostics  # noqa: B018
