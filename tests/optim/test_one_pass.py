"""One-pass Anderson (``Anderson(one_pass=True)``, ALGORITHMS.md section 2b)
against the independent float64 oracle of section 2b (tests/_support/_oracle.py) and
against itself (GradScaler, checkpoints, copies, torch.compile).

* Whole trajectories on the torch backend (float64 and float32, k = 1..4,
  reg, simplex, maximize, weight decay, two groups, a schedule, parameters
  without gradients on some steps) against ``OnePassAndersonOracle``.
* Every backend (torch, native, triton in the interpreter), float32 and
  bfloat16: each step checked against the oracle seeded with the
  optimizer's own state before the step (so bf16 rounding does not pile up
  between the two): the coefficients solved from the kept Gram, the Gram
  kept for the next step (with the row the update pass computed) and the
  new parameters; float32 also as a whole trajectory.
* GradScaler's inf steps write nothing; the run equals, bitwise, the run
  that never saw them (a skipped step on which the set of parameters with
  gradients changes included).
* state_dict resume and deepcopy continue bitwise; a checkpoint without the
  setting loads as exact Anderson; bad values are refused.
* The step issues no Gram pass (one op per bucket) and reads nothing on the host.
* A compiled training step equals the eager one bitwise, with one compile.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _oracle import OnePassAndersonOracle, Problem
from _triton_cases import kernel_device
from test_oracle_trajectories import (
    SHAPES,
    assert_trajectory_close,
    initial_arrays,
    schedule,
    set_grads,
    split,
    torch_params,
)
from torch.profiler import ProfilerActivity, profile

from interpolatron.backends import availability
from interpolatron.optim import Anderson, CheckpointError

STEPS = 25
BACKENDS = ["torch", "native", "triton"]
# Steps (0-based) at which some parameters (flat index) have no gradient: the
# set changes (the kept Gram is over the last step's set; the next is rebuilt).
MISSING = {3: (1,), 4: (1,), 9: (0, 3), 14: (2,), 15: (0, 1, 2)}


def _need(backend: str, dtype: torch.dtype = torch.float32) -> None:
    if backend == "triton" and kernel_device() != "cpu":
        pytest.skip("the Triton kernels do not run on the CPU in this session")
    why = availability("cpu", dtype)[backend]
    if why:
        pytest.skip(why)


def _drop(grads: list, step: int, missing: dict | None) -> list:
    gone = (missing or {}).get(step, ())
    return [None if i in gone else g for i, g in enumerate(grads)]


def _set_grads(params, problem: Problem, step: int, missing, sign: float = 1.0) -> list:
    grads = set_grads(params, problem, sign)
    for i in (missing or {}).get(step, ()):
        params[i].grad = None
    return _drop(grads, step, missing)


# -- whole trajectories, torch backend -------------------------------------------

# Unregularised one-pass Anderson is unstable on most of these full-batch
# problems (measured: it diverges at k = 3, 4 and at most rates at k = 2,
# where exact Anderson converges; see bench/RESULTS.md): the trajectories use
# reg = 0.1, and reg = 0 where it stays bounded (k = 2 at lr 1.0).
CASES = []
for _k in (1, 2, 3, 4):
    for _dtype in (torch.float64, torch.float32):
        CASES.append(pytest.param(
            dict(k=_k, dtype=_dtype, reg=0.1, constraint=None, maximize=False, wd=(1e-2, 0.0)),
            id=f"k{_k}-{str(_dtype).removeprefix('torch.')}-reg-wd"))
    CASES.append(pytest.param(
        dict(k=_k, dtype=torch.float64, reg=0.0, constraint="simplex", maximize=False, wd=(0.0, 2e-2)),
        id=f"k{_k}-float64-simplex"))
    CASES.append(pytest.param(
        dict(k=_k, dtype=torch.float64, reg=0.1, constraint=None, maximize=False, wd=(1e-2, 0.0),
             missing=MISSING), id=f"k{_k}-float64-reg-missing"))
CASES += [
    pytest.param(dict(k=2, dtype=torch.float64, reg=0.0, constraint=None, maximize=False, wd=(1e-2, 0.0),
                      lrs=(1.0, 2 / 3)), id="k2-float64-reg0"),
    pytest.param(dict(k=3, dtype=torch.float64, reg=0.1, constraint=None, maximize=True, wd=(1e-2, 1e-2)),
                 id="k3-float64-reg-maximize"),
    pytest.param(dict(k=4, dtype=torch.float64, reg=1e-2, constraint="simplex", maximize=False,
                      wd=(0.0, 0.0), missing=MISSING), id="k4-float64-reg-simplex-missing"),
    pytest.param(dict(k=3, dtype=torch.float32, reg=0.0, constraint="simplex", maximize=True,
                      wd=(0.0, 1e-2), missing=MISSING), id="k3-float32-simplex-maximize-missing"),
]


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_oracle(case):
    dtype, maximize, k = case["dtype"], case["maximize"], case["k"]
    missing = case.get("missing")
    problem = Problem(SHAPES, seed=3, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(4), dtype)
    init = [p.detach().double().numpy().copy() for p in params]
    lrs = case.get("lrs", (0.3, 0.2))
    groups = [dict(params=params[:2], lr=lrs[0], weight_decay=case["wd"][0]),
              dict(params=params[2:], lr=lrs[1], weight_decay=case["wd"][1])]
    opt = Anderson(groups, lr=0.5, history=k, reg=case["reg"], constraint=case["constraint"],
                   maximize=maximize, backend="torch", one_pass=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    oracle = OnePassAndersonOracle([
        dict(params=init[:2], lr=lrs[0], weight_decay=case["wd"][0], maximize=maximize),
        dict(params=init[2:], lr=lrs[1], weight_decay=case["wd"][1], maximize=maximize),
    ], history=k, reg=case["reg"], constraint=case["constraint"])
    sign = -1.0 if maximize else 1.0
    for t in range(STEPS):
        torch_grads = _set_grads(params, problem, t, missing, sign)
        if dtype == torch.float64:
            grads = _drop([sign * g for g in problem.grad(oracle.flat_params())], t, missing)
        else:
            grads = torch_grads
        opt.step()
        sched.step()
        oracle.step(split(grads, (2, 2)), lrs=[lr * schedule(t) for lr in lrs])
        assert_trajectory_close(params, oracle, dtype, t + 1)
        eps = 1e-5 if dtype == torch.float32 else 1e-13
        tol = max(1e-9, eps / max(oracle.min_eigs[-1], 1e-12)) if case["constraint"] is None else (
            1e-4 if dtype == torch.float32 else 1e-9)
        np.testing.assert_allclose(opt.coefficients.cpu().numpy(), oracle.coefficients, rtol=tol, atol=tol,
                                   err_msg=f"coefficients at step {t + 1}")
        if k > 1 and t in (0, 1):  # the first two steps are SGD steps (nothing kept, then m = 1)
            assert opt.coefficients.tolist() == [1.0] + [0.0] * (k - 1)
    assert oracle.fallbacks == 0
    assert int(opt.fallbacks) == 0
    if k > 1 and case["constraint"] is None:
        # the coefficients left the SGD vertex: the lagged solve did something
        assert np.abs(oracle.coefficients[1:]).max() > 1e-3
        # clear of the singularity threshold (1e-6), where the two criteria could disagree
        assert min(oracle.min_eigs[2:], default=1.0) > 1e-5


# -- every backend, float32 and bfloat16 -------------------------------------------

def _age_order(ring: torch.Tensor, count: int) -> list[np.ndarray]:
    """A ring of ages 1..S (S slots, age j in slot (count - j) mod S), in age order."""
    slots = ring.shape[0]
    return [ring[(count - j) % slots].detach().double().numpy().copy() for j in range(1, slots + 1)]


def _seeded_oracle(opt: Anderson, params: list[torch.Tensor], k: int, wd: float, lr: float):
    """An oracle holding the optimizer's state as it is now (float64 copies)."""
    oracle = OnePassAndersonOracle([dict(params=[p.detach().double().numpy() for p in params], lr=lr,
                                         weight_decay=wd)], history=k)
    anchor = opt.state.get(params[0], {})
    steps = int(anchor["anderson_steps"]) if "anderson_steps" in anchor else 0
    oracle.t = steps
    if steps:
        m = min(steps, k)
        oracle.kept = anchor["anderson_gram"][:m, :m].double().cpu().numpy().copy()
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        if "x_hist" not in st:
            continue  # a first gradient: the oracle warm-starts it
        count = int(st["step"])
        oracle.x_hist[(0, i)] = _age_order(st["x_hist"], count)
        # ages 1..k-1 from the ring; age k (dropped by the step) is not kept
        oracle.g_hist[(0, i)] = _age_order(st["g_hist"], count) + [np.zeros(p.shape)]
    return oracle


BACKEND_CASES = [pytest.param(b, d, k, c, id=f"{b}-{str(d).removeprefix('torch.')}-k{k}-{c or 'affine'}")
                 for b in BACKENDS for d in (torch.float32, torch.bfloat16) for k in (1, 2, 3, 4)
                 for c in (None, "simplex") if c is None or k in (2, 3)]


@pytest.mark.parametrize("backend,dtype,k,constraint", BACKEND_CASES)
def test_every_backend_step_by_step_against_oracle(backend, dtype, k, constraint):
    _need(backend, dtype)
    steps, lr, wd = 12, 0.3, 1e-2
    problem = Problem(SHAPES, seed=11, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(12), dtype)
    opt = Anderson(params, lr=lr, history=k, weight_decay=wd, constraint=constraint, backend=backend,
                   one_pass=True, reg=1e-4 if constraint is None else 0.0)
    missing = {4: (1,), 5: (1,), 8: (0, 3)}
    rng = np.random.default_rng(13)
    largest = 0.0
    last_kept, last_active = None, None
    for t in range(steps):
        oracle = _seeded_oracle(opt, params, k, wd, lr)
        oracle.reg, oracle.constraint = opt.reg, constraint
        before = [p.detach().double().numpy().copy() for p in params]
        # noisy gradients (a stochastic problem): coefficients off the SGD vertex, simplex too
        noisy = [g + 0.5 * rng.standard_normal(g.shape) for g in problem.grad(before)]
        grads = []
        for i, (p, g) in enumerate(zip(params, noisy)):
            p.grad = None if i in missing.get(t, ()) else torch.tensor(g, dtype=dtype)
            grads.append(None if p.grad is None else p.grad.double().numpy().copy())
        opt.step()
        oracle.step([grads])
        # the coefficients: solved from the same kept Gram, in float64 both
        np.testing.assert_allclose(opt.coefficients.double().numpy(), oracle.coefficients, rtol=1e-9,
                                   atol=1e-9, err_msg=f"coefficients at step {t + 1}")
        largest = max(largest, float(np.abs(oracle.coefficients[1:]).max(initial=0.0)))
        # The Gram kept for the next step: the row the update pass computed
        # (float64 dots of the float32 effective gradient; the oracle forms it
        # in float64 from the same values) shifted into the last kept Gram, or,
        # when the set of parameters with gradients changed, into its older
        # ages recomputed from the rings (16-bit rings hold the gradients
        # rounded; the kept entries are of the unrounded ones, as in exact Anderson).
        m = min(t + 1, k)
        kept = opt.state[params[0]]["anderson_gram"].double().numpy().copy()
        want = oracle.grams[-1]
        scale = np.sqrt(np.outer(np.diag(want), np.diag(want))) + 1e-300
        err = np.abs(kept[:m, :m] - want) / scale
        active = tuple(g is not None for g in grads)
        # (a partial step always rebuilds the older ages)
        if last_kept is not None and active == last_active and all(active):
            assert np.array_equal(kept[1:, 1:], last_kept[:-1, :-1]), f"older ages moved at step {t + 1}"
            err = err[0]  # the new row only
        assert err.max() <= 2e-7, f"kept Gram at step {t + 1}: relative error {err.max():.3g}"
        last_kept, last_active = kept, active
        # the new parameters: the float64 update within the dtype's rounding of
        # a float32 computation (each term rounded once in float32)
        a = oracle.coefficients
        for i, (p, e) in enumerate(zip(params, oracle.flat_params())):
            got = p.detach().double().numpy()
            if grads[i] is None:
                assert np.array_equal(got, before[i]), f"parameter {i} moved without a gradient"
                continue
            terms = np.abs(a).sum() * (np.abs(before[i]) + lr * (np.abs(grads[i]) + wd * np.abs(before[i])))
            # one ulp: Triton's interpreter converts to bf16 by truncation (native and torch round to nearest)
            ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23
            bound = ulp * np.abs(e) + 4e-7 * terms + 1e-30
            assert (np.abs(got - e) <= bound).all(), \
                f"parameter {i} at step {t + 1}: {np.abs(got - e).max():.3g} (bound {bound.max():.3g})"
    assert int(opt.fallbacks) == 0
    if k > 1:
        assert largest > 1e-2  # the lagged solve did something


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3])
def test_every_backend_float32_trajectory_matches_oracle(backend, k):
    _need(backend)
    problem = Problem(SHAPES, seed=3, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(4), torch.float32)
    init = [p.detach().double().numpy().copy() for p in params]
    opt = Anderson(params, lr=0.3, history=k, weight_decay=1e-2, reg=0.1, backend=backend, one_pass=True)
    oracle = OnePassAndersonOracle([dict(params=init, lr=0.3, weight_decay=1e-2)], history=k, reg=0.1)
    for t in range(STEPS):
        grads = _set_grads(params, problem, t, MISSING)
        opt.step()
        oracle.step([grads])
        assert_trajectory_close(params, oracle, torch.float32, t + 1)
        tol = max(1e-9, 1e-5 / max(oracle.min_eigs[-1], 1e-12))
        np.testing.assert_allclose(opt.coefficients.numpy(), oracle.coefficients, rtol=tol, atol=tol)
    assert np.abs(oracle.coefficients[1:]).max() > 1e-3


# -- GradScaler ------------------------------------------------------------------

SCALE = 8.0
# At 4 a parameter gets its gradient back, at 7 one loses it: the set of
# parameters with gradients changes on a skipped step (the retry must build on
# the last taken step's Gram, with the older ages of the retry's own set).
INF_STEPS = (0, 4, 7)
MISSING_AMP = {3: (1,), 7: (2,), 8: (2,)}


def _amp_run(backend: str, dtype: torch.dtype, k: int, amp: bool, steps: int = 12, one_pass: bool = True):
    """Scaled gradients with inf steps (``amp``), or the same run without
    those steps at all: GradScaler's power-of-two scale is exact."""
    problem = Problem(SHAPES, seed=5, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(6), dtype)
    opt = Anderson(params, lr=0.2, history=k, weight_decay=1e-2, backend=backend, one_pass=one_pass)
    snapshots = []
    for t in range(steps):
        if t in INF_STEPS and not amp:
            continue
        set_grads(params, problem)
        for i in MISSING_AMP.get(t, ()):
            params[i].grad = None
        kwargs = {}
        if amp:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(SCALE)
            if t in INF_STEPS:
                params[0].grad.view(-1)[0] = float("inf")
            kwargs = dict(grad_scale=torch.tensor([SCALE]), found_inf=torch.tensor([float(t in INF_STEPS)]))
            state = {f"{i}/{key}": v.clone() for i, st in enumerate(opt.state.values())
                     for key, v in st.items() if isinstance(v, torch.Tensor)}
            values = [p.detach().clone() for p in params]
        opt.step(**kwargs)
        if amp and t in INF_STEPS:  # nothing written: parameters and every state tensor
            assert all(torch.equal(p, v) for p, v in zip(params, values)), t
            after = {f"{i}/{key}": v for i, st in enumerate(opt.state.values())
                     for key, v in st.items() if isinstance(v, torch.Tensor)}
            for key, v in state.items():
                if key.endswith("anderson_active"):
                    continue  # host bookkeeping of this step's set (the decision is on the device)
                assert key not in after or torch.equal(after[key], v), (t, key)
            continue
        snapshots.append((opt.coefficients.clone(), [p.detach().clone() for p in params]))
    return opt, snapshots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [2, 3])
def test_grad_scaler_skipped_steps_are_never_taken(backend, dtype, k):
    _need(backend, dtype)
    scaled, a = _amp_run(backend, dtype, k, amp=True)
    plain, b = _amp_run(backend, dtype, k, amp=False)
    assert len(a) == len(b) == 12 - len(INF_STEPS)
    for t, ((ca, pa), (cb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(ca, cb), (t, ca, cb)
        assert all(torch.equal(x, y) for x, y in zip(pa, pb)), t
    assert int(scaled.fallbacks) == int(plain.fallbacks) == 0
    assert scaled.coefficients[1:].abs().max() > 1e-3


# -- checkpoints and copies ----------------------------------------------------------

def _train(opt, params, problem, first: int, last: int, missing=None):
    coefs = []
    for t in range(first, last):
        _set_grads(params, problem, t, missing)
        opt.step()
        coefs.append(opt.coefficients.clone())
    return coefs


def _fresh(backend: str, k: int = 3, one_pass: bool = True):
    params = torch_params(initial_arrays(7), torch.float32)
    return params, Anderson(params, lr=0.2, history=k, weight_decay=1e-2, backend=backend, one_pass=one_pass)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saved_at", [1, 4, 6])  # 4: right after a change of the set (MISSING at 3 and 4)
def test_state_dict_resume_is_bitwise(backend, saved_at):
    _need(backend)
    total = 12
    problem = Problem(SHAPES, seed=8, lo=0.3, hi=1.5)
    params, opt = _fresh(backend)
    ref = _train(opt, params, problem, 0, total, MISSING)
    ref_params = [p.detach().clone() for p in params]

    params, opt = _fresh(backend)
    _train(opt, params, problem, 0, saved_at, MISSING)
    saved = copy.deepcopy(opt.state_dict())
    assert all(g["one_pass"] is True for g in saved["param_groups"])
    values = [p.detach().clone() for p in params]
    params2, opt2 = _fresh(backend, one_pass=False)  # the checkpoint's setting wins
    with torch.no_grad():
        for p, v in zip(params2, values):
            p.copy_(v)
    opt2.load_state_dict(saved)
    assert opt2.one_pass
    twin = copy.deepcopy(opt)  # a copy continues the same trajectory too
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    got = _train(opt2, params2, problem, saved_at, total, MISSING)
    got_twin = _train(twin, twin_params, problem, saved_at, total, MISSING)
    for t, (a, b, c) in enumerate(zip(ref[saved_at:], got, got_twin)):
        assert torch.equal(a, b) and torch.equal(a, c), t
    assert all(torch.equal(a, b) for a, b in zip(ref_params, params2))
    assert all(torch.equal(a, b) for a, b in zip(ref_params, twin_params))


def test_a_checkpoint_without_the_setting_loads_as_exact_anderson():
    problem = Problem(SHAPES, seed=8, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(7), torch.float32)
    exact = Anderson(params, lr=0.2, history=3, backend="torch")
    _train(exact, params, problem, 0, 4)
    old = copy.deepcopy(exact.state_dict())
    for g in old["param_groups"]:
        del g["one_pass"]  # as an older version saved it
    fresh = Anderson(params, lr=0.2, history=3, backend="torch", one_pass=True)
    fresh.load_state_dict(old)
    assert fresh.one_pass is False
    assert all(g["one_pass"] is False for g in fresh.param_groups)


def test_bad_settings_are_refused():
    p = torch.zeros(3, requires_grad=True)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="one_pass"):
            Anderson([p], one_pass=bad)
    q = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="one_pass is optimizer-wide"):
        Anderson([dict(params=[p]), dict(params=[q], one_pass=True)])
    problem = Problem([(3,)], seed=1)
    opt = Anderson([p], lr=0.1, history=2, one_pass=True, backend="torch")
    for _ in range(3):
        p.grad = torch.tensor(problem.grad([p.detach().double().numpy()])[0], dtype=torch.float32)
        opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["one_pass"] = "yes"
    with pytest.raises(CheckpointError, match="one_pass"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, v in before["state"][0].items():
        now = after["state"][0][key]
        assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v


def test_switching_modes_between_steps_keeps_the_kept_gram():
    """The kept Gram means the same in both modes (the Gram of the last step,
    its new row included): a run may switch between steps; after a switch to
    one pass, the step solves from the Gram the exact step kept."""
    problem = Problem(SHAPES, seed=9, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(9), torch.float64)
    opt = Anderson(params, lr=0.2, history=3, backend="torch")
    _train(opt, params, problem, 0, 5)
    kept = opt.state[params[0]]["anderson_gram"].clone()
    for g in opt.param_groups:
        g["one_pass"] = True
    _train(opt, params, problem, 5, 6)
    from interpolatron.solvers import anderson_coefficients

    want, _ = anderson_coefficients(kept, torch.ones(3, dtype=torch.bool))
    assert torch.equal(opt.coefficients, want)
    for g in opt.param_groups:
        g["one_pass"] = False
    _train(opt, params, problem, 6, 8)  # and back
    assert torch.isfinite(opt.coefficients).all()


# -- one pass, no host sync ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_op_per_bucket_and_no_host_sync(backend):
    _need(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = Anderson(model.parameters(), lr=0.05, history=3, backend=backend, one_pass=True)
    x = torch.randn(5, 12)
    for _ in range(3):
        model.zero_grad(set_to_none=False)
        model(x).square().sum().backward()
        opt.step()
    model.zero_grad(set_to_none=False)
    model(x).square().sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("interpolatron::combine") == 1  # one bucket
    assert "interpolatron::gram_row" not in names
    assert not [n for n in names if n in ("aten::item", "aten::_local_scalar_dense")]


# -- torch.compile -------------------------------------------------------------------------

@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    old = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.config.trace_autograd_ops = True
    yield
    torch._dynamo.config.trace_autograd_ops = old
    torch._dynamo.reset()


def _compile_run(backend: str, counter=None, steps: int = 30):
    """A whole training step (forward, backward, step) under a schedule;
    compiled from the second step when ``counter`` is given."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    opt = Anderson(model.parameters(), lr=0.05, history=3, weight_decay=1e-3, backend=backend, one_pass=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(train_step, backend=counter, fullgraph=True) if counter is not None else None
    losses, coefs = [], []
    for t in range(steps):
        g = torch.Generator().manual_seed(t % 8)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
        opt.zero_grad()
        losses.append((train_step if compiled is None or t == 0 else compiled)(x, y))
        coefs.append(opt.coefficients.clone())
        sched.step()
    return model, torch.stack(losses), torch.stack(coefs)


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_compiled_training_step_equals_eager(backend):
    """After one eager step (as for exact Anderson), bitwise equal to eager
    with Dynamo alone (the same kernels in the same order), one compile."""
    _need(backend)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    ref_model, ref_losses, ref_coefs = _compile_run(backend)
    model, losses, coefs = _compile_run(backend, counter)
    assert counter.frame_count == 1, counter.frame_count
    assert torch.equal(losses, ref_losses)
    assert torch.equal(coefs, ref_coefs)
    assert coefs[-1, 1:].abs().max() > 1e-3
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
