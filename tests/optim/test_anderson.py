"""Anderson mixing: warm-up, regularisation, the simplex constraint against
independent QP solvers, fallbacks, and ``solvers.anderson_coefficients``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _oracle import affine_minimiser
from scipy.optimize import minimize

import interpolatron
from interpolatron.solvers import anderson_coefficients


def _gram(vectors: list[np.ndarray]) -> np.ndarray:
    G = np.stack(vectors)
    return G @ G.T


def _random_psd(rng, k: int, dim: int = 6) -> np.ndarray:
    return _gram([rng.standard_normal(dim) for _ in range(k)])


def _qp_simplex_slsqp(M: np.ndarray) -> tuple[np.ndarray, float]:
    """min a^T M a over the simplex, by SLSQP from every vertex and the centre."""
    k = len(M)
    best = None
    starts = [np.eye(k)[i] for i in range(k)] + [np.full(k, 1.0 / k)]
    for a0 in starts:
        res = minimize(lambda a: a @ M @ a, a0, jac=lambda a: 2 * M @ a, method="SLSQP",
                       bounds=[(0.0, 1.0)] * k,
                       constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0,
                                     "jac": lambda a: np.ones(k)}],
                       options={"ftol": 1e-15, "maxiter": 500})
        a = np.clip(res.x, 0, None)
        a /= a.sum()
        if best is None or a @ M @ a < best @ M @ best:
            best = a
    return best, float(best @ M @ best)


def _solve(M, valid=None, reg=0.0, constraint=None, tol=1e-6):
    k = len(M)
    gram = torch.tensor(M, dtype=torch.float64)
    valid = torch.ones(k, dtype=torch.bool) if valid is None else torch.tensor(valid)
    a, fell_back = anderson_coefficients(gram, valid, reg, constraint, tol)
    return a.numpy(), bool(fell_back)


# -- the optimizer: warm-up ---------------------------------------------------------

def test_first_step_is_sgd_and_coefficients_are_e1():
    x0 = torch.randn(5, dtype=torch.float64)
    g0 = torch.randn(5, dtype=torch.float64)
    p = x0.clone().requires_grad_()
    opt = interpolatron.Anderson([p], lr=0.3, history=3, backend="torch")
    p.grad = g0.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), x0 - 0.3 * g0, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(opt.coefficients.numpy(), [1.0, 0.0, 0.0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_second_step_mixes_exactly_two_gradients(k):
    lr = 0.2
    x0 = np.random.default_rng(k).standard_normal(6)
    g0, g1 = np.random.default_rng(k + 10).standard_normal((2, 6))
    p = torch.tensor(x0).requires_grad_()
    opt = interpolatron.Anderson([p], lr=lr, history=k, backend="torch")
    p.grad = torch.tensor(g0)
    opt.step()
    x1 = x0 - lr * g0
    p.grad = torch.tensor(g1)
    opt.step()
    a = affine_minimiser(_gram([g1, g0]))  # newest first
    np.testing.assert_allclose(opt.coefficients.numpy(), np.r_[a, np.zeros(k - 2)], rtol=1e-12, atol=1e-13)
    expected = a[0] * (x1 - lr * g1) + a[1] * (x0 - lr * g0)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-13)
    # a minimises ||a1 g1 + a2 g0|| among sum-one weights: any other split is worse
    best = np.linalg.norm(a[0] * g1 + a[1] * g0)
    for s in (a[0] - 0.1, a[0] + 0.1, 0.5):
        assert np.linalg.norm(s * g1 + (1 - s) * g0) > best


def test_coefficients_are_a_float64_device_tensor_summing_to_one():
    p = torch.randn(4, 3, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.1, history=3, backend="torch")
    with pytest.raises(RuntimeError, match="no step"):
        opt.coefficients  # noqa: B018
    for _ in range(5):
        p.grad = torch.randn(4, 3)
        opt.step()
        c = opt.coefficients
        assert isinstance(c, torch.Tensor)
        assert c.device == p.device and c.dtype == torch.float64 and c.shape == (3,)
        assert abs(float(c.sum()) - 1.0) < 1e-12


# -- reg ---------------------------------------------------------------------------

@pytest.mark.parametrize("reg", [1e-3, 0.1, 10.0])
def test_reg_solves_with_scaled_identity(reg):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(8) for _ in range(3)]
    p = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.1, history=3, reg=reg, backend="torch")
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    M = _gram(grads[::-1])
    expected = affine_minimiser(M + reg * np.trace(M) / 3 * np.eye(3))
    np.testing.assert_allclose(opt.coefficients.numpy(), expected, rtol=1e-12, atol=1e-13)
    assert not np.allclose(expected, affine_minimiser(M))  # reg changed something


def test_huge_reg_tends_to_uniform_weights():
    rng = np.random.default_rng(1)
    M = _random_psd(rng, 4)
    a, fell_back = _solve(M, reg=1e10)
    assert not fell_back
    np.testing.assert_allclose(a, np.full(4, 0.25), atol=1e-8)


def test_reg_uses_the_trace_of_the_valid_block_only():
    rng = np.random.default_rng(2)
    M = _random_psd(rng, 4)
    M[2:, :] *= 100.0  # the ages that do not exist yet must not enter tr(M)/m
    M[:, 2:] *= 100.0
    a, _ = _solve(M, valid=[True, True, False, False], reg=0.5)
    B = M[:2, :2]
    np.testing.assert_allclose(a[:2], affine_minimiser(B + 0.5 * np.trace(B) / 2 * np.eye(2)), rtol=1e-12)
    np.testing.assert_array_equal(a[2:], [0.0, 0.0])


# -- simplex --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_simplex_k2_equals_the_dense_grid_minimum(seed):
    rng = np.random.default_rng(seed)
    g1, g2 = rng.standard_normal((2, 5))
    if seed % 2:  # nearly aligned gradients: the unconstrained a_2 leaves [0, 1]
        g2 = 1.5 * g1 + 0.05 * rng.standard_normal(5)
    M = _gram([g1, g2])
    a, fell_back = _solve(M, constraint="simplex")
    assert not fell_back
    grid = np.linspace(0.0, 1.0, 200001)
    values = (1 - grid) ** 2 * M[0, 0] + 2 * grid * (1 - grid) * M[0, 1] + grid ** 2 * M[1, 1]
    assert a @ M @ a <= values.min() + 1e-12
    assert abs(a[1] - grid[values.argmin()]) <= 1e-5 + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_simplex_k2_is_the_clipped_unconstrained_a2(seed):
    """The paper's rule: project the unconstrained solution into [0, 1]."""
    rng = np.random.default_rng(100 + seed)
    g1 = rng.standard_normal(4)
    # a spread of cases: unconstrained a_2 < 0, inside, > 1
    g2 = [rng.standard_normal(4), 0.3 * g1 + 0.01 * rng.standard_normal(4),
          3.0 * g1 + 0.01 * rng.standard_normal(4)][seed % 3]
    d = g1 - g2
    a2_free = float(g1 @ d / (d @ d))  # argmin ||(1 - a2) g1 + a2 g2||
    a, _ = _solve(_gram([g1, g2]), constraint="simplex")
    np.testing.assert_allclose(a, [1 - np.clip(a2_free, 0, 1), np.clip(a2_free, 0, 1)], atol=1e-12)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_simplex_k3_k4_matches_slsqp(k, seed):
    rng = np.random.default_rng(1000 * k + seed)
    if seed % 2:
        base = rng.standard_normal(6)  # correlated gradients: an active constraint
        vectors = [base * rng.uniform(0.5, 2.0) + 0.3 * rng.standard_normal(6) for _ in range(k)]
    else:
        vectors = [rng.standard_normal(6) for _ in range(k)]
    M = _gram(vectors)
    a, fell_back = _solve(M, constraint="simplex")
    assert not fell_back
    assert (a >= 0).all() and abs(a.sum() - 1) < 1e-12
    ref, ref_value = _qp_simplex_slsqp(M)
    assert a @ M @ a <= ref_value + 1e-10 * max(1.0, ref_value)
    np.testing.assert_allclose(a, ref, atol=2e-4)  # SLSQP's own accuracy


def test_simplex_is_exact_for_a_singular_gram():
    """Opposite gradients: M is singular, the minimiser (1/2, 1/2) has value 0."""
    g = np.array([1.0, -2.0, 0.5])
    a, fell_back = _solve(_gram([g, -g]), constraint="simplex")
    assert not fell_back
    np.testing.assert_allclose(a, [0.5, 0.5], atol=1e-12)


def test_simplex_in_the_optimizer_keeps_weights_nonnegative():
    rng = np.random.default_rng(3)
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.1, history=4, constraint="simplex", backend="torch")
    grads = []
    for _ in range(6):
        g = rng.standard_normal(5)
        grads.insert(0, g)
        p.grad = torch.tensor(g)
        opt.step()
        a = opt.coefficients.numpy()
        assert (a >= 0).all() and abs(a.sum() - 1) < 1e-12
    M = _gram(grads[:4])
    _, ref_value = _qp_simplex_slsqp(M)
    assert a @ M @ a <= ref_value + 1e-10


# -- fallbacks -------------------------------------------------------------------------

def test_singular_one_dimensional_problem_falls_back_to_sgd():
    """In 1-D every pair of gradients is collinear: M has rank 1."""
    lr = 0.1
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=lr, history=2, backend="torch")
    xs = [2.0]
    for t in range(4):
        g = 3.0 * xs[-1] + 1.0
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        xs.append(xs[-1] - lr * g)
        assert p.item() == pytest.approx(xs[-1], abs=1e-15)
        np.testing.assert_array_equal(opt.coefficients.numpy(), [1.0, 0.0])
        # the first step uses one gradient (no system to solve), later ones fall back
        assert int(opt.fallbacks) == t


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_falls_back_and_counts(bad):
    rng = np.random.default_rng(4)
    p = torch.tensor(rng.standard_normal(4), requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.1, history=3, backend="torch")
    for _ in range(3):
        p.grad = torch.tensor(rng.standard_normal(4))
        opt.step()
    assert int(opt.fallbacks) == 0
    x = p.detach().clone()
    g = torch.tensor(rng.standard_normal(4))
    g[1] = bad
    p.grad = g.clone()
    opt.step()
    assert int(opt.fallbacks) == 1
    np.testing.assert_array_equal(opt.coefficients.numpy(), [1.0, 0.0, 0.0])
    assert torch.isfinite(opt.coefficients).all()
    expected = x - 0.1 * g  # an SGD step: only the poisoned element is non-finite
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(p.detach()[keep], expected[keep], rtol=0, atol=1e-15)
    assert not torch.isfinite(p.detach()[1])


def test_fallback_count_checkpoints():
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.1, history=2, backend="torch")
    for _ in range(3):
        p.grad = torch.tensor([1.0], dtype=torch.float64)
        opt.step()
    sd = opt.state_dict()
    assert int(sd["state"][0]["anderson_fallbacks"]) == 2


# -- solvers.anderson_coefficients directly --------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_solver_unconstrained_matches_closed_form(k):
    rng = np.random.default_rng(k)
    M = _random_psd(rng, k)
    a, fell_back = _solve(M)
    assert not fell_back
    np.testing.assert_allclose(a, affine_minimiser(M), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_solver_warm_up_uses_only_the_valid_ages(m):
    rng = np.random.default_rng(m)
    M = _random_psd(rng, 4)
    valid = [i < m for i in range(4)]
    for constraint in (None, "simplex"):
        a, fell_back = _solve(M, valid=valid, constraint=constraint)
        assert not fell_back
        np.testing.assert_array_equal(a[m:], np.zeros(4 - m))
        if constraint is None:
            np.testing.assert_allclose(a[:m], affine_minimiser(M[:m, :m]), rtol=1e-12, atol=1e-13)
        else:
            ref, ref_value = _qp_simplex_slsqp(M[:m, :m])
            assert a[:m] @ M[:m, :m] @ a[:m] <= ref_value + 1e-10


def test_solver_singular_and_non_finite_fall_back_to_e1():
    g = np.array([1.0, 2.0, 3.0])
    for M in (_gram([g, 2 * g, -g]), np.full((3, 3), np.nan), np.diag([np.inf, 1.0, 1.0]),
              np.zeros((3, 3))):
        a, fell_back = _solve(M)
        assert fell_back
        np.testing.assert_array_equal(a, [1.0, 0.0, 0.0])
    a, fell_back = _solve(np.full((2, 2), np.nan), constraint="simplex")
    assert fell_back
    np.testing.assert_array_equal(a, [1.0, 0.0])


def test_solver_singular_tol_is_relative_to_the_scale():
    """Scaling all gradients does not change the verdict (unit-diagonal test)."""
    rng = np.random.default_rng(5)
    g1 = rng.standard_normal(5)
    g2 = g1 + 1e-5 * rng.standard_normal(5)  # nearly collinear
    M = _gram([g1, g2])
    verdicts = {_solve(M * s)[1] for s in (1e-20, 1.0, 1e20)}
    assert verdicts == {True}
    # and a well-conditioned pair passes at every scale
    M = _gram([g1, rng.standard_normal(5)])
    assert {_solve(M * s)[1] for s in (1e-20, 1.0, 1e20)} == {False}


def test_solver_rejects_an_unknown_constraint():
    with pytest.raises(ValueError, match="constraint"):
        _solve(np.eye(2), constraint="box")
