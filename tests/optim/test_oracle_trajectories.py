"""Whole trajectories of every optimizer against the independent float64 oracle
(tests/_support/_oracle.py): odd shapes, two param groups, a learning-rate schedule,
weight decay, maximize, k = 1..4, random coefficients on the simplex."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from _oracle import AndersonOracle, InterpolatronOracle, Problem, rna_gradients, rna_iterates

import interpolatron

SHAPES = [(3, 5), (7,), (2, 3, 4), ()]  # group 0: the first two, group 1: the rest
STEPS = 25
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def schedule(step: int) -> float:
    """The LambdaLR factor, written out independently for the oracle."""
    return 0.8 ** (step // 5)


def initial_arrays(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def torch_params(arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=dtype).requires_grad_() for a in arrays]


def set_grads(params, problem: Problem, sign: float = 1.0) -> list[np.ndarray]:
    """Set ``p.grad`` from the problem at the params' current values (as float64)
    and return the float64 gradients exactly as the params' dtype rounds them."""
    grads = problem.grad([p.detach().double().numpy() for p in params])
    out = []
    for p, g in zip(params, grads):
        p.grad = torch.tensor(sign * g, dtype=p.dtype)
        out.append(p.grad.double().numpy().copy())
    return out


def split(flat: list, sizes: tuple[int, int]) -> list[list]:
    return [flat[: sizes[0]], flat[sizes[0]: sizes[0] + sizes[1]]]


def assert_trajectory_close(params, oracle, dtype, step):
    expected = oracle.flat_params()
    for i, (p, e) in enumerate(zip(params, expected)):
        np.testing.assert_allclose(p.detach().double().numpy(), e, **TOL[dtype],
                                   err_msg=f"parameter {i} {tuple(p.shape)} after step {step}")


def dirichlet(rng, k: int) -> tuple[float, ...]:
    a = rng.dirichlet(np.ones(k))
    a[-1] = 1.0 - a[:-1].sum()  # exactly on the simplex in float64
    return tuple(float(v) for v in a)


# -- Interpolatron ---------------------------------------------------------------

INTERPOLATRON_CASES = []
for _k in (1, 2, 3, 4):
    for _dtype in (torch.float64, torch.float32):
        INTERPOLATRON_CASES.append(pytest.param(
            dict(k0=_k, k1=(_k % 4) + 1, dtype=_dtype, maximize=False, wd=(1e-2, 0.0)),
            id=f"k{_k}+k{(_k % 4) + 1}-{str(_dtype).removeprefix('torch.')}-wd"))
INTERPOLATRON_CASES += [
    pytest.param(dict(k0=2, k1=3, dtype=torch.float64, maximize=True, wd=(0.0, 3e-2)),
                 id="k2+k3-float64-maximize-wd"),
    pytest.param(dict(k0=3, k1=2, dtype=torch.float32, maximize=True, wd=(0.0, 0.0)),
                 id="k3+k2-float32-maximize"),
    pytest.param(dict(k0=2, k1=3, dtype=torch.float64, maximize=False, wd=(0.0, 0.0),
                      alphas=((0.05, 0.95), (0.1, 0.3, 0.6))), id="paper-defaults-float64"),
    pytest.param(dict(k0=2, k1=2, dtype=torch.float64, maximize=False, wd=(0.0, 0.0),
                      alphas=((1.0, 0.0), (0.0, 1.0))), id="vertex-alphas-float64"),
]


@pytest.mark.parametrize("case", INTERPOLATRON_CASES)
def test_interpolatron_trajectory_matches_oracle(case):
    dtype, maximize = case["dtype"], case["maximize"]
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    alphas = case.get("alphas") or (dirichlet(rng, case["k0"]), dirichlet(rng, case["k1"]))
    problem = Problem(SHAPES, seed=1)
    init = [a.astype(np.float64) for a in initial_arrays(2)]
    params = torch_params(init, dtype)
    init = [p.detach().double().numpy().copy() for p in params]  # what dtype rounding left
    lrs = (0.12, 0.07)
    groups = [dict(params=params[:2], lr=lrs[0], alphas=alphas[0], weight_decay=case["wd"][0]),
              dict(params=params[2:], lr=lrs[1], alphas=alphas[1], weight_decay=case["wd"][1])]
    opt = interpolatron.Interpolatron(groups, lr=0.5, maximize=maximize, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    oracle = InterpolatronOracle([
        dict(params=init[:2], lr=lrs[0], alphas=alphas[0], weight_decay=case["wd"][0], maximize=maximize),
        dict(params=init[2:], lr=lrs[1], alphas=alphas[1], weight_decay=case["wd"][1], maximize=maximize),
    ])
    sign = -1.0 if maximize else 1.0  # maximize -f: the same descent
    for t in range(STEPS):
        torch_grads = set_grads(params, problem, sign)
        if dtype == torch.float64:
            grads = [sign * g for g in problem.grad(oracle.flat_params())]
        else:
            grads = torch_grads
        opt.step()
        sched.step()
        oracle.step(split(grads, (2, 2)), lrs=[lr * schedule(t) for lr in lrs])
        assert_trajectory_close(params, oracle, dtype, t + 1)
    # the schedule really changed the learning rate, and the run moved
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[0] * schedule(STEPS))
    assert not np.allclose(oracle.flat_params()[0], init[0])


# -- Anderson ---------------------------------------------------------------------

ANDERSON_CASES = []
for _k in (1, 2, 3, 4):
    for _dtype in (torch.float64, torch.float32):
        ANDERSON_CASES.append(pytest.param(
            dict(k=_k, dtype=_dtype, reg=0.0, constraint=None, maximize=False, wd=(1e-2, 0.0)),
            id=f"k{_k}-{str(_dtype).removeprefix('torch.')}-wd"))
    ANDERSON_CASES.append(pytest.param(
        dict(k=_k, dtype=torch.float64, reg=0.0, constraint="simplex", maximize=False, wd=(0.0, 2e-2)),
        id=f"k{_k}-float64-simplex"))
ANDERSON_CASES += [
    pytest.param(dict(k=3, dtype=torch.float64, reg=1e-3, constraint=None, maximize=True, wd=(1e-2, 1e-2)),
                 id="k3-float64-reg-maximize"),
    pytest.param(dict(k=4, dtype=torch.float64, reg=1e-2, constraint="simplex", maximize=False,
                      wd=(0.0, 0.0)), id="k4-float64-reg-simplex"),
    pytest.param(dict(k=3, dtype=torch.float32, reg=0.0, constraint="simplex", maximize=True,
                      wd=(0.0, 1e-2)), id="k3-float32-simplex-maximize"),
]


@pytest.mark.parametrize("case", ANDERSON_CASES)
def test_anderson_trajectory_matches_oracle(case):
    dtype, maximize, k = case["dtype"], case["maximize"], case["k"]
    problem = Problem(SHAPES, seed=3, lo=0.3, hi=1.5)
    params = torch_params(initial_arrays(4), dtype)
    init = [p.detach().double().numpy().copy() for p in params]
    lrs = (0.3, 0.2)
    groups = [dict(params=params[:2], lr=lrs[0], weight_decay=case["wd"][0]),
              dict(params=params[2:], lr=lrs[1], weight_decay=case["wd"][1])]
    opt = interpolatron.Anderson(groups, lr=0.5, history=k, reg=case["reg"], constraint=case["constraint"],
                                 maximize=maximize, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    oracle = AndersonOracle([
        dict(params=init[:2], lr=lrs[0], weight_decay=case["wd"][0], maximize=maximize),
        dict(params=init[2:], lr=lrs[1], weight_decay=case["wd"][1], maximize=maximize),
    ], history=k, reg=case["reg"], constraint=case["constraint"])
    sign = -1.0 if maximize else 1.0
    for t in range(STEPS):
        torch_grads = set_grads(params, problem, sign)
        if dtype == torch.float64:
            grads = [sign * g for g in problem.grad(oracle.flat_params())]
        else:
            grads = torch_grads
        opt.step()
        sched.step()
        oracle.step(split(grads, (2, 2)), lrs=[lr * schedule(t) for lr in lrs])
        assert_trajectory_close(params, oracle, dtype, t + 1)
        # the coefficients' error is the Gram's (float32: rounded iterates in the
        # weight decay term, and dot products that the seam contract lets a
        # kernel accumulate in float32) amplified by the Gram's conditioning
        eps = 1e-5 if dtype == torch.float32 else 1e-13
        tol = max(1e-9, eps / max(oracle.min_eigs[-1], 1e-12)) if case["constraint"] is None else (
            1e-4 if dtype == torch.float32 else 1e-9)
        np.testing.assert_allclose(opt.coefficients.cpu().numpy(), oracle.coefficients, rtol=tol, atol=tol,
                                   err_msg=f"coefficients at step {t + 1}")
    assert oracle.fallbacks == 0
    assert int(opt.fallbacks) == 0
    if case["constraint"] is None:
        # the trajectory stayed clear of the singularity threshold (1e-6): no
        # step where the oracle's and the package's criteria could disagree
        assert min(oracle.min_eigs[1:], default=1.0) > 1e-4
    if case["constraint"] == "simplex":
        assert (opt.coefficients >= 0).all()


# -- RNA ------------------------------------------------------------------------------

RNA_CASES = [
    pytest.param(dict(base="sgd", window=3, reg=1e-8, dtype=torch.float64), id="sgd-window3-float64"),
    pytest.param(dict(base="momentum", window=5, reg=1e-6, dtype=torch.float64),
                 id="momentum-window5-float64"),
    pytest.param(dict(base="interpolatron", window=4, reg=0.0, dtype=torch.float64),
                 id="interpolatron-window4-reg0-float64"),
    pytest.param(dict(base="sgd", window=4, reg=1e-4, dtype=torch.float32), id="sgd-window4-float32"),
]


def rna_condition(snapshots, lam) -> float:
    Y = np.stack(snapshots, axis=1)
    R = Y[:, 1:] - Y[:, :-1]
    RR = R.T @ R
    return float(np.linalg.cond(RR / np.linalg.norm(RR, 2) + lam * np.eye(RR.shape[0])))


@pytest.mark.parametrize("case", RNA_CASES)
def test_rna_offline_iterates_trajectory_matches_oracle(case):
    dtype, window = case["dtype"], case["window"]
    problem = Problem(SHAPES, seed=5)
    params = torch_params(initial_arrays(6), dtype)
    lr = 0.1
    if case["base"] == "sgd":
        base = torch.optim.SGD(params, lr=lr)
    elif case["base"] == "momentum":
        base = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        base = interpolatron.Interpolatron(params, lr=lr, alphas=(0.3, 0.7), backend="torch")
    rna = interpolatron.RNA(params, window=window, reg=case["reg"], backend="torch")
    snapshots = []
    rna.record()
    snapshots.append(np.concatenate([p.detach().double().numpy().reshape(-1) for p in params]))
    for t in range(STEPS):
        set_grads(params, problem)
        base.step()
        rna.record()
        snapshots.append(np.concatenate([p.detach().double().numpy().reshape(-1) for p in params]))
        before = [p.detach().clone() for p in params]
        out = rna.extrapolate()
        expected, c = rna_iterates(snapshots[-(window + 1):], case["reg"])
        got = np.concatenate([o.double().numpy().reshape(-1) for o in out])
        # The coefficients carry the data's rounding (float32: ~1e-7 per
        # element) amplified by the system's conditioning (lambda = 0 on nearly
        # collinear residuals); the extrapolation carries them times sum |c|.
        eps = float(torch.finfo(dtype).eps)
        cond = rna_condition(snapshots[-(window + 1):], case["reg"])
        coef_tol = max(1e-6 if dtype == torch.float32 else 1e-10, 10 * eps * cond)
        size = max(1.0, float(np.abs(c).sum()))
        np.testing.assert_allclose(rna.coefficients.cpu().numpy()[::-1], c, rtol=coef_tol, atol=coef_tol,
                                   err_msg=f"coefficients after record {t + 2}")
        np.testing.assert_allclose(got, expected, rtol=TOL[dtype]["rtol"] * size + coef_tol,
                                   atol=TOL[dtype]["atol"] * size + coef_tol * float(np.abs(expected).max()),
                                   err_msg=f"extrapolation after record {t + 2}")
        for p, b in zip(params, before):  # offline: training untouched
            assert torch.equal(p.detach(), b)


def test_rna_online_trajectory_matches_oracle():
    """Online RNA on top of gradient descent, all in the oracle too: after each
    record the extrapolation (of the snapshots as recorded) replaces the params."""
    window, lam, lr = 3, 1e-6, 0.1
    problem = Problem(SHAPES, seed=7)
    params = torch_params(initial_arrays(8), torch.float64)
    base = torch.optim.SGD(params, lr=lr)
    rna = interpolatron.RNA(params, window=window, reg=lam, mode="online", backend="torch")
    x = np.concatenate([p.detach().numpy().reshape(-1) for p in params])
    snapshots = []
    rna.record()
    snapshots.append(x.copy())
    for t in range(STEPS):
        set_grads(params, problem)
        base.step()
        rna.record()
        x = x - lr * problem.flat_grad(x)
        snapshots.append(x.copy())
        x, _ = rna_iterates(snapshots[-(window + 1):], lam)
        got = np.concatenate([p.detach().numpy().reshape(-1) for p in params])
        np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-10, err_msg=f"after record {t + 2}")


def test_rna_gradient_residuals_trajectory_matches_oracle():
    """residual='gradients': per record, the mean of the gradients of the steps
    since the previous record; iterates recorded at the same times."""
    window, lam, lr, steps_per_record = 3, 1e-8, 0.05, 3
    problem = Problem(SHAPES, seed=9)
    params = torch_params(initial_arrays(10), torch.float64)
    base = torch.optim.SGD(params, lr=lr, momentum=0.5)
    rna = interpolatron.RNA(params, window=window, reg=lam, residual="gradients", optimizer=base,
                            backend="torch")
    x = np.concatenate([p.detach().numpy().reshape(-1) for p in params])
    v = None
    iterates, mean_grads = [], []
    for r in range(8):
        acc = np.zeros_like(x)
        for _ in range(steps_per_record):
            # the gradient the base optimizer sees differs per step (a drifting target)
            shift = 0.01 * (r * steps_per_record)
            flat_g = problem.flat_grad(x) + shift
            for p, g in zip(params, np.split(flat_g, np.cumsum([p.numel() for p in params])[:-1])):
                p.grad = torch.tensor(g.reshape(p.shape), dtype=torch.float64)
            base.step()
            acc += flat_g
            v = flat_g.copy() if v is None else 0.5 * v + flat_g
            x = x - lr * v
        rna.record()
        iterates.append(x.copy())
        mean_grads.append(acc / steps_per_record)
        np.testing.assert_allclose(np.concatenate([p.detach().numpy().reshape(-1) for p in params]), x,
                                   rtol=1e-12, atol=1e-12)
        out = rna.extrapolate()
        m = min(len(iterates), window)
        expected, c = rna_gradients(iterates[-m:], mean_grads[-m:], lam)
        got = np.concatenate([o.numpy().reshape(-1) for o in out])
        scale = max(1.0, float(np.abs(c).sum()))
        np.testing.assert_allclose(got, expected, rtol=1e-10 * scale, atol=1e-10 * scale,
                                   err_msg=f"after record {r + 1}")
    rna.close()
