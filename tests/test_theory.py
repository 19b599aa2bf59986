"""The paper's theory and toys: linear convergence on strongly convex
quadratics (the appendix theorem), and the 1-D toys of Figures 2 and 3
(``interpolatron.toys``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interpolatron
from interpolatron import toys

# -- the appendix theorem ----------------------------------------------------------------------


def _spectral_radius(alphas, lr, eigenvalues) -> float:
    """Largest root modulus of ``z^k - sum_i a_i (1 - lr*lam) z^(k-i)`` over the
    Hessian's eigenvalues: the iteration matrix (8)-(9) of the appendix on a
    quadratic, where ``J_i = 1 - lr*lam`` for every i."""
    a = np.asarray(alphas, dtype=np.float64)
    return max(float(np.abs(np.roots(np.r_[1.0, -a * (1 - lr * lam)])).max()) for lam in eigenvalues)


THEOREM_CASES = [
    ((0.05, 0.95), 1.0), ((0.05, 0.95), 1.9),
    ((0.1, 0.9), 0.5), ((0.5, 0.5), 1.5),
    ((0.1, 0.3, 0.6), 1.0), ((0.1, 0.3, 0.6), 1.9),
    ((1 / 3, 1 / 3, 1 / 3), 1.5), ((0.6, 0.3, 0.1), 0.5),
]


def _run_quadratic(alphas, lr, A, b, x0, steps):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Interpolatron([x], lr=lr, alphas=alphas, backend="torch")
    At, bt = torch.tensor(A), torch.tensor(b)
    x_star = np.linalg.solve(A, b)
    errors = [np.linalg.norm(x0 - x_star)]
    for _ in range(steps):
        x.grad = At @ x.detach() - bt
        opt.step()
        errors.append(np.linalg.norm(x.detach().numpy() - x_star))
    return np.array(errors) / errors[0]


def _fitted_rate(errors) -> float:
    """exp of the slope of log(error) over the geometric phase (1e-3 .. 1e-10)."""
    t = np.arange(len(errors))
    window = (errors < 1e-3) & (errors > 1e-10)
    assert window.sum() > 20
    slope = np.polyfit(t[window], np.log(errors[window]), 1)[0]
    assert slope < 0
    return float(np.exp(slope))


THEOREM_IDS = [f"k{len(a)}-{'-'.join(f'{v:.2g}' for v in a)}-lr{s}L" for a, s in THEOREM_CASES]


@pytest.mark.parametrize("alphas, lr_times_L", THEOREM_CASES, ids=THEOREM_IDS)
def test_linear_convergence_on_a_strongly_convex_quadratic(alphas, lr_times_L):
    mu, L, d = 0.2, 1.0, 8
    lr = lr_times_L / L
    theta = max(abs(1 - lr * mu), abs(1 - lr * L))
    assert theta < 1  # the theorem's condition
    k = len(alphas)
    rng = np.random.default_rng(k * 100 + int(lr_times_L * 10))
    eigenvalues = np.r_[mu, L, rng.uniform(mu, L, d - 2)]
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (q * eigenvalues) @ q.T
    b = rng.standard_normal(d)
    x_star = np.linalg.solve(A, b)

    rho = _spectral_radius(alphas, lr, eigenvalues)
    # Lemma 3 made explicit: every root has |z|^k <= theta * sum a_i |z|^(k-i), so |z| <= theta^(1/k)
    assert rho <= theta ** (1 / k) + 1e-12
    steps = int(np.ceil(np.log(1e-11) / np.log(rho))) + 30

    # from a random start: geometric contraction, no slower than the theory allows
    errors = _run_quadratic(alphas, lr, A, b, rng.standard_normal(d), steps)
    assert errors[-1] < 1e-8
    assert _fitted_rate(errors) <= rho + 1e-2 <= theta ** (1 / k) + 1e-2

    # from a start on the slowest mode: exactly the predicted rate
    worst = max(range(d), key=lambda i: _spectral_radius(alphas, lr, [eigenvalues[i]]))
    errors = _run_quadratic(alphas, lr, A, b, x_star + q[:, worst], steps)
    assert errors[-1] < 1e-8
    assert _fitted_rate(errors) == pytest.approx(rho, abs=1e-2)


def test_k1_is_gradient_descent_with_rate_theta():
    mu, L = 0.2, 1.0
    A = np.diag([mu, 0.5, L])
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Interpolatron([x], lr=1.0, alphas=(1.0,), backend="torch")
    for _ in range(10):
        x.grad = torch.tensor(A) @ x.detach()
        opt.step()
    np.testing.assert_allclose(x.detach().numpy(), (1 - np.diag(A)) ** 10, rtol=1e-12)


# -- Figure 2: leaving a local minimum through a flat region -----------------------------------------

def _escape_steps(x0, width, cfg=toys.FIGURE2, steps=400):
    hb = toys.trajectory("heavy_ball", "flat_valley", x0, steps, cfg["heavy_ball_lr"],
                         momentum=cfg["momentum"], width=width)
    ip = toys.trajectory("interpolatron", "flat_valley", x0, steps, cfg["lr"], alphas=cfg["alphas"],
                         backend="torch", width=width)
    return hb, ip, toys.escape_step(hb, width), toys.escape_step(ip, width)


def test_figure2_heavy_ball_needs_several_times_more_steps_to_leave_the_local_minimum():
    cfg = toys.FIGURE2
    hb, ip, n_hb, n_ip = _escape_steps(cfg["x0"], cfg["width"])
    assert n_ip is not None and n_hb is not None
    assert n_hb >= 3 * n_ip, (n_hb, n_ip)
    # the mechanism: the first (SGD) step of Interpolatron stays in the valley,
    # the interpolated gradient of the sheer wall carries it over later
    assert 0 < ip[2] <= cfg["width"] < ip[n_ip]
    # and once over the barrier it keeps going: f falls below the local minimum's value
    f = toys.flat_valley(torch.tensor(ip[-1]), width=cfg["width"])
    assert float(f) < 0


@pytest.mark.parametrize("width", [0.8, 0.9, 1.0, 1.1])
@pytest.mark.parametrize("x0", [0.0, 0.002, 0.008])
def test_figure2_outcome_is_robust_to_the_setup(x0, width):
    _, _, n_hb, n_ip = _escape_steps(x0, width)
    assert n_ip is not None and n_ip <= 5
    assert n_hb is not None and n_hb >= 3 * n_ip, (n_hb, n_ip)


def test_flat_valley_has_the_papers_slopes():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    toys.flat_valley(x, width=1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [-15.0, 0.1, -15.0])
    values = toys.flat_valley(torch.tensor([-1e-9, 0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64))
    np.testing.assert_allclose(values.numpy(), [0.0, 0.0, 0.1, 0.1], atol=1e-7)  # continuous


# -- Figure 3: a cliff -------------------------------------------------------------------------------

def _cliff_runs(x0, lr, alphas, steps=8):
    """Trajectories as distances from the minimum at x = 0."""
    cfg = toys.FIGURE3
    hb = toys.trajectory("heavy_ball", "cliff", x0, steps, lr, momentum=cfg["momentum"], width=cfg["width"])
    ip = toys.trajectory("interpolatron", "cliff", x0, steps, lr, alphas=alphas, backend="torch",
                         width=cfg["width"])
    assert hb[1] == ip[1] < 0  # the first step is the same SGD step, onto the cliff
    return np.abs(hb), np.abs(ip)


def test_figure3_heavy_ball_is_thrown_far_while_interpolatron_stays_near():
    cfg = toys.FIGURE3
    hb, ip = _cliff_runs(cfg["x0"], cfg["lr"], cfg["alphas"])
    # after 2 steps Interpolatron is still in the valley, heavy ball far out
    assert ip[2] <= cfg["width"] < 5 * cfg["width"] < hb[2]
    # heavy ball keeps flying away, every step
    assert np.all(np.diff(hb[2:]) > 0)
    # Interpolatron takes the cliff's push at most once and comes back
    assert hb[-1] >= 4 * ip.max()
    assert ip[-1] < ip.max() and ip[4] <= cfg["width"]


@pytest.mark.parametrize("alphas", [(0.05, 0.95), (0.1, 0.9), (0.5, 0.5)])
@pytest.mark.parametrize("lr", [0.55, 0.6, 0.8])
@pytest.mark.parametrize("x0", [0.4, 0.5])
def test_figure3_outcome_is_robust_to_the_setup(x0, lr, alphas):
    hb, ip = _cliff_runs(x0, lr, alphas)
    assert hb[-1] >= 3 * ip.max(), (hb[-1], ip.max())
    assert np.all(np.diff(hb[2:]) > 0)


def test_trajectory_rejects_unknown_methods():
    with pytest.raises(ValueError, match="optimizer_name"):
        toys.trajectory("adam", "cliff", 0.0, 3, 0.1)


def test_trajectory_sgd_and_anderson_run():
    sgd = toys.trajectory("sgd", "cliff", 0.5, 3, 0.1)
    np.testing.assert_allclose(sgd, [0.5, 0.4, 0.3, 0.2], atol=1e-15)
    anderson = toys.trajectory("anderson", "cliff", 0.5, 3, 0.1, alphas=(0.5, 0.5), backend="torch")
    assert anderson[1] == pytest.approx(0.4)  # its first step is SGD
