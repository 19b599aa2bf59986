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
# Fair toys (ALGORITHMS.md section 5): one learning rate for both methods,
# "escaped" = past the barrier from that step on, every step checked.

def _flat_runs(x0, width, lr, alphas=(0.05, 0.95), steps=150):
    hb = toys.trajectory("heavy_ball", "flat_valley", x0, steps, lr, momentum=0.9, width=width)
    ip = toys.trajectory("interpolatron", "flat_valley", x0, steps, lr, alphas=alphas, backend="torch",
                         width=width)
    return hb, ip


def test_escape_step_means_staying_out():
    xs = [0.0, 0.5, 1.2, 0.9, 1.5, 2.0, 3.0]
    assert toys.first_crossing(xs, 1.0) == 2
    assert toys.escape_step(xs, 1.0) == 4
    assert toys.escape_step(xs + [0.99], 1.0) is None
    assert toys.escape_step([0.0, 0.1], 1.0) is None and toys.first_crossing([0.0, 0.1], 1.0) is None


def test_figure2_at_the_same_lr_heavy_ball_leaves_first():
    cfg = toys.FIGURE2
    hb, ip = _flat_runs(cfg["x0"], cfg["width"], cfg["lr"], cfg["alphas"])
    w = cfg["width"]
    assert toys.escape_step(hb, w) == 2 and toys.first_crossing(hb, w) == 2
    # Interpolatron's two interleaved chains: over at step 3, back at 4, out for good from 11
    assert toys.first_crossing(ip, w) == 3
    assert ip[4] <= w
    assert toys.escape_step(ip, w) == 11
    assert [t for t in range(12) if ip[t] > w] == [3, 5, 7, 9, 11]  # every step: only odd ones before 11
    assert all(x > w for x in ip[11:]) and all(x > w for x in hb[2:])
    # past the barrier the function falls again: both end below the local minimum's value
    for xs in (hb, ip):
        assert float(toys.flat_valley(torch.tensor(xs[-1]), width=w)) < 0


@pytest.mark.parametrize("lr", [0.02, 0.05, 0.1, 0.2])
@pytest.mark.parametrize("width", [0.8, 1.0, 1.1])
@pytest.mark.parametrize("x0", [0.0, 0.005])
def test_figure2_outcome_is_robust_to_the_setup(x0, width, lr):
    hb, ip = _flat_runs(x0, width, lr)
    n_hb, n_ip = toys.escape_step(hb, width), toys.escape_step(ip, width)
    assert n_hb is not None
    assert n_ip is None or n_hb <= n_ip, (n_hb, n_ip)


def test_figure2_the_old_claim_needed_heavy_ball_at_a_tenth_of_the_rate():
    """The setup this toy used to have: heavy ball at lr * (1 - momentum)."""
    cfg = toys.FIGURE2
    hb = toys.trajectory("heavy_ball", "flat_valley", cfg["x0"], 400, cfg["lr"] * 0.1, momentum=0.9,
                         width=cfg["width"])
    _, ip = _flat_runs(cfg["x0"], cfg["width"], cfg["lr"], cfg["alphas"])
    assert toys.escape_step(hb, cfg["width"]) > toys.escape_step(ip, cfg["width"])


def test_flat_valley_has_the_papers_slopes():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    toys.flat_valley(x, width=1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [-15.0, 0.1, -15.0])
    values = toys.flat_valley(torch.tensor([-1e-9, 0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64))
    np.testing.assert_allclose(values.numpy(), [0.0, 0.0, 0.1, 0.1], atol=1e-7)  # continuous


# -- Figure 3: a cliff -------------------------------------------------------------------------------

def _cliff_runs(x0, lr, alphas, steps=40):
    """Trajectories as distances from the minimum at x = 0 (same lr for both)."""
    cfg = toys.FIGURE3
    hb = toys.trajectory("heavy_ball", "cliff", x0, steps, lr, momentum=cfg["momentum"], width=cfg["width"])
    ip = toys.trajectory("interpolatron", "cliff", x0, steps, lr, alphas=alphas, backend="torch",
                         width=cfg["width"])
    assert hb[1] == ip[1] < 0  # the first step is the same SGD step, onto the cliff
    return np.abs(hb), np.abs(ip)


def test_figure3_both_are_thrown_heavy_ball_keeps_going_interpolatron_swings():
    cfg = toys.FIGURE3
    hb, ip = _cliff_runs(cfg["x0"], cfg["lr"], cfg["alphas"])
    np.testing.assert_allclose([hb[2], hb[8]], [8.36, 42.966], atol=1e-3)
    # Interpolatron is thrown too, one step later, nearly as far: x3 = 8.03
    assert ip.argmax() == 3 and ip[3] == pytest.approx(8.03, abs=1e-2)
    # every step, odd ones included: far on odd steps, near on even ones, both chains closing in
    odd, even = ip[3::2], ip[2::2]
    assert np.all(odd[:6] > 5.0) and np.all(even[:6] < 2.5)
    assert ip[9] == pytest.approx(5.976, abs=1e-3) and ip[10] == pytest.approx(1.926, abs=1e-3)
    assert np.all(np.diff(odd) < 0)
    # heavy ball is farther than Interpolatron at every step from step 2 on
    assert np.all(hb[2:] > ip[2:])
    assert hb[40] > 60 > 10 > ip[40]


@pytest.mark.parametrize("alphas", [(0.05, 0.95), (0.1, 0.9), (0.5, 0.5)])
@pytest.mark.parametrize("lr", [0.55, 0.6, 0.8])
@pytest.mark.parametrize("x0", [0.4, 0.5])
def test_figure3_outcome_is_robust_to_the_setup(x0, lr, alphas):
    hb, ip = _cliff_runs(x0, lr, alphas)
    assert np.all(hb[2:] > ip[2:])  # every step
    assert hb[-1] >= 5 * ip[-1], (hb[-1], ip[-1])
    assert ip.max() > 5.0  # Interpolatron is thrown far too: no "stays near"


def test_trajectory_rejects_unknown_methods():
    with pytest.raises(ValueError, match="optimizer_name"):
        toys.trajectory("adam", "cliff", 0.0, 3, 0.1)


def test_trajectory_sgd_and_anderson_run():
    sgd = toys.trajectory("sgd", "cliff", 0.5, 3, 0.1)
    np.testing.assert_allclose(sgd, [0.5, 0.4, 0.3, 0.2], atol=1e-15)
    anderson = toys.trajectory("anderson", "cliff", 0.5, 3, 0.1, alphas=(0.5, 0.5), backend="torch")
    assert anderson[1] == pytest.approx(0.4)  # its first step is SGD
