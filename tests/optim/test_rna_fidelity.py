"""RNA as its authors wrote it (ALGORITHMS.md section 3): adaptive lambda with
the line search from the oldest snapshot and the fall-back to the newest,
checked against an independent NumPy implementation written here from the
text; positive buffers clamped to their snapshots' range; gradient residuals
that include the base optimizer's coupled weight decay."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _oracle import rna_gradients
from torch import nn

import interpolatron

# -- an independent adaptive RNA (NumPy, float64, from ALGORITHMS.md section 3) --


def _weights(R: np.ndarray, lam: float) -> np.ndarray:
    RR = R.T @ R
    RR = RR / np.linalg.norm(RR, 2)
    k = RR.shape[0]
    try:
        z = np.linalg.solve(RR + lam * np.eye(k), np.ones(k))
        if not np.all(np.isfinite(z)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        z = np.linalg.lstsq(RR + lam * np.eye(k), np.ones(k), rcond=None)[0]
    return np.full(k, 1.0 / k) if abs(z.sum()) < 1e-10 else z / z.sum()


def adaptive_rna(Y: np.ndarray, f, reg: float) -> tuple[np.ndarray, float, float, bool]:
    """``Y``: snapshots as columns, oldest first. Returns (point, lambda, t,
    fell back). Grid {0} U logspace(-15, 1, k) U {reg}; extrapolation over the
    k newest snapshots; line search x0 + t (xe - x0), t doubling while f
    decreases; the newest snapshot if nothing tried beats it."""
    R = np.diff(Y, axis=1)
    k = R.shape[1]
    grid = [0.0] + list(np.logspace(-15, 1, k)) + [reg]
    values = []
    for lam in grid:
        values.append(f(Y[:, 1:] @ _weights(R, lam)))
    i = int(np.argmin(values))
    lam, xe = grid[i], Y[:, 1:] @ _weights(R, grid[i])
    x0 = Y[:, 0]
    t, best = 1.0, values[i]
    while True:
        trial = f(x0 + 2 * t * (xe - x0))
        if not trial < best:
            break
        t, best = 2 * t, trial
    if not best < f(Y[:, -1]):
        return Y[:, -1], lam, 0.0, True
    return x0 + t * (xe - x0), lam, t, False


# -- a logistic-regression model and its windows --------------------------------------


class LogReg(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.w + self.b


def _problem(seed: int, n: int = 200, d: int = 10):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    X = torch.randn(n, d, dtype=torch.float64, generator=gen) * scales
    noise = 0.5 * torch.randn(n, dtype=torch.float64, generator=gen)
    y = (X @ torch.randn(d, dtype=torch.float64, generator=gen) + noise > 0).double()
    return X, y, gen


def _loss_flat(X: torch.Tensor, y: torch.Tensor, tau: float):
    Xn, yn = X.numpy(), y.numpy()

    def f(v: np.ndarray) -> float:
        z = Xn @ v[:-1] + v[-1]
        return float(np.mean(np.logaddexp(0.0, z) - yn * z) + 0.5 * tau * v[:-1] @ v[:-1])

    return f


def _flat(model: LogReg) -> np.ndarray:
    return np.concatenate([model.w.detach().numpy(), model.b.detach().numpy().reshape(1)])


@pytest.mark.parametrize("seed, window, lr, batch", [(0, 5, 0.5, 20), (1, 4, 2.0, 200), (2, 6, 0.2, 10),
                                                     (3, 3, 1.0, 200)])
def test_adaptive_lambda_and_line_search_match_an_independent_implementation(seed, window, lr, batch):
    X, y, gen = _problem(seed)
    tau = 1e-3
    model = LogReg(X.shape[1])
    f = _loss_flat(X, y, tau)

    def objective(m: LogReg) -> float:
        return f(_flat(m))

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rna = interpolatron.RNA(model, window=window, objective=objective, backend="torch")
    rna.record()
    snaps = [_flat(model)]
    for _ in range(window + 2):
        for _ in range(3):
            idx = torch.randint(0, len(X), (batch,), generator=gen)
            opt.zero_grad()
            (nn.functional.binary_cross_entropy_with_logits(model(X[idx]), y[idx])
             + 0.5 * tau * model.w @ model.w).backward()
            opt.step()
        rna.record()
        snaps.append(_flat(model))
    before = _flat(model)
    out = rna.extrapolate()
    np.testing.assert_array_equal(_flat(model), before)  # every evaluation restored the model
    got = np.concatenate([out["w"].numpy(), out["b"].numpy().reshape(1)])
    Y = np.stack(snaps[-(window + 1):], axis=1)
    expected, lam, t, fell_back = adaptive_rna(Y, f, rna.reg)
    assert rna.fell_back == fell_back
    assert rna.step_used == t
    assert rna.reg_used == pytest.approx(lam, rel=1e-12, abs=0)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # the weights over the window's snapshots reproduce the point and sum to one
    c = rna.coefficients.numpy()
    assert c.shape == (window + 1,)
    np.testing.assert_allclose(Y[:, ::-1] @ c, expected, rtol=1e-9, atol=1e-12)
    assert abs(c.sum() - 1) < 1e-12
    # never worse than the newest snapshot, nor than the grid search alone
    assert f(got) <= f(Y[:, -1])
    R = np.diff(Y, axis=1)
    grid_only = min(f(Y[:, 1:] @ _weights(R, v)) for v in [0.0, *np.logspace(-15, 1, window), rna.reg])
    assert f(got) <= grid_only * (1 + 1e-12)


def test_line_search_moves_past_the_extrapolation_on_slow_gradient_descent():
    """Full-batch gradient descent with a small step on an ill-conditioned
    problem: the window's extrapolation undershoots and doubling t pays."""
    X, y, _ = _problem(5)
    tau = 1e-3
    model = LogReg(X.shape[1])
    f = _loss_flat(X, y, tau)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rna = interpolatron.RNA(model, window=3, objective=lambda m: f(_flat(m)), backend="torch")
    rna.record()
    snaps = [_flat(model)]
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(X), y) + 0.5 * tau * model.w @ model.w
        loss.backward()
        opt.step()
        rna.record()
        snaps.append(_flat(model))
    out = rna.extrapolate()
    got = np.concatenate([out["w"].numpy(), out["b"].numpy().reshape(1)])
    expected, _, t, fell_back = adaptive_rna(np.stack(snaps, axis=1), f, rna.reg)
    assert not fell_back and t >= 2 and rna.step_used == t
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_adaptive_falls_back_to_the_newest_snapshot_when_nothing_beats_it():
    """An objective minimised exactly at the newest snapshot: no extrapolation
    and no line-search point beats it, so the result is that snapshot, bitwise."""
    torch.manual_seed(3)
    model = LogReg(4)
    newest: list[np.ndarray] = []

    def objective(m: LogReg) -> float:
        return float(np.sum((_flat(m) - newest[0]) ** 2))

    rna = interpolatron.RNA(model, window=3, objective=objective, backend="torch")
    rna.record()
    for _ in range(4):
        with torch.no_grad():
            model.w.mul_(0.5).add_(torch.randn(4, dtype=torch.float64))
            model.b.add_(1.0)
        rna.record()
    newest.append(_flat(model))
    with torch.no_grad():  # training went on after the last record
        model.w.add_(1.0)
    out = rna.extrapolate()
    assert rna.fell_back and rna.step_used == 0.0
    np.testing.assert_array_equal(np.concatenate([out["w"].numpy(), out["b"].numpy().reshape(1)]), newest[0])
    np.testing.assert_array_equal(rna.coefficients.numpy(), [1.0, 0.0, 0.0, 0.0])
    with rna.swapped():
        np.testing.assert_array_equal(_flat(model), newest[0])


def test_non_finite_objective_values_are_never_chosen():
    """An objective that is NaN everywhere: nothing beats the newest snapshot."""
    model = LogReg(3)
    rna = interpolatron.RNA(model, window=2, objective=lambda m: math.nan, backend="torch")
    for i in range(3):
        with torch.no_grad():
            model.w.fill_(1.0 / (i + 1))
        rna.record()
    out = rna.extrapolate()
    assert rna.fell_back
    np.testing.assert_array_equal(out["w"].numpy(), np.full(3, 1.0 / 3))


# -- batch-norm statistics --------------------------------------------------------------


def _bn_net() -> nn.Module:
    bn = nn.BatchNorm1d(5, momentum=1.0)
    return nn.Sequential(nn.Linear(3, 5), bn, nn.ReLU(), nn.Linear(5, 2)).double()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {n: t.detach().clone() for n, t in named.items()}


def _two_records_with_shrinking_variance(positive_buffers=None):
    """Two records whose batch-norm variance shrinks 10,000-fold (momentum 1:
    the running statistics are the last batch's)."""
    torch.manual_seed(0)
    model = _bn_net()
    rna = interpolatron.RNA(model, window=1, backend="torch", positive_buffers=positive_buffers)
    snaps = []
    for scale in (10.0, 0.1):
        model(scale * torch.randn(64, 3, dtype=torch.float64))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * scale)
        rna.record()
        snaps.append(_snapshot(model))
    return model, rna, snaps


@pytest.mark.parametrize("clamp", [True, False])
def test_negative_weights_keep_running_var_in_its_snapshots_range(clamp):
    model, rna, snaps = _two_records_with_shrinking_variance(None if clamp else [])
    c = torch.tensor([1.123, -0.123], dtype=torch.float64)  # newest first, as the issue measured
    rna.coefficients_for = lambda reg: c  # the weights under test, whatever the window solves
    out = rna.extrapolate()
    old, new = snaps
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "1.running_mean"):
        np.testing.assert_allclose(out[name].numpy(), (1.123 * new[name] - 0.123 * old[name]).numpy(),
                                   rtol=1e-13, atol=1e-15, err_msg=name)
    raw = 1.123 * new["1.running_var"] - 0.123 * old["1.running_var"]
    assert (raw < 0).all()  # unclamped, every channel's variance is negative
    X = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with rna.swapped():
        model.eval()
        loss = float(model(X).detach().square().mean())
        model.train()
    if clamp:
        lo = torch.minimum(old["1.running_var"], new["1.running_var"])
        hi = torch.maximum(old["1.running_var"], new["1.running_var"])
        np.testing.assert_allclose(out["1.running_var"].numpy(), raw.clamp(lo, hi).numpy(), rtol=1e-13)
        assert math.isfinite(loss)
        # the mean is not a positive buffer: it is extrapolated beyond its snapshots
        m_old, m_new = old["1.running_mean"], new["1.running_mean"]
        assert ((out["1.running_mean"] > torch.maximum(m_old, m_new))
                | (out["1.running_mean"] < torch.minimum(m_old, m_new))).any()
    else:
        np.testing.assert_allclose(out["1.running_var"].numpy(), raw.numpy(), rtol=1e-13)
        assert math.isnan(loss)


def test_clamp_uses_only_the_snapshots_the_weights_combine():
    """Window 3 full (4 snapshots): the plain extrapolation combines the 3
    newest, so the oldest's huge variance must not widen the range."""
    torch.manual_seed(0)
    model = _bn_net()
    rna = interpolatron.RNA(model, window=3, backend="torch")
    snaps = []
    for scale in (100.0, 1.0, 0.5, 0.25):
        model(scale * torch.randn(64, 3, dtype=torch.float64))
        rna.record()
        snaps.append(_snapshot(model))
    c = torch.tensor([3.0, -1.0, -1.0], dtype=torch.float64)
    rna.coefficients_for = lambda reg: c
    out = rna.extrapolate()
    v = torch.stack([s["1.running_var"] for s in snaps[1:]])
    raw = 3.0 * v[2] - v[1] - v[0]
    np.testing.assert_allclose(out["1.running_var"].numpy(), raw.clamp(v.amin(0), v.amax(0)).numpy(),
                               rtol=1e-13)


def test_default_positive_buffers_and_bad_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2),
                          nn.InstanceNorm2d(2, track_running_stats=True),
                          nn.BatchNorm2d(2, track_running_stats=False))
    rna = interpolatron.RNA(model, window=2, backend="torch")
    assert rna._clamped == {"1.running_var", "2.running_var"}
    with pytest.raises(ValueError, match="positive_buffers"):
        interpolatron.RNA(model, window=2, positive_buffers=["1.running_variance"])


# -- gradient residuals and weight decay --------------------------------------------------


def _ridge(seed: int, wd: float):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((20, 6))
    b = rng.standard_normal(20)
    x_star = np.linalg.solve(A.T @ A + wd * np.eye(6), A.T @ b)  # minimiser of 1/2|Ax-b|^2 + wd/2 |x|^2
    return A, b, x_star


OPTIMIZERS = {
    "SGD": lambda p, wd: torch.optim.SGD(p, lr=0.01, weight_decay=wd),
    "SGD momentum": lambda p, wd: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=wd),
    # eps 1: near its optimum Adam's step is about (lr / eps) * gradient, and
    # with a small eps that map is unstable there (rounding noise grows)
    "Adam": lambda p, wd: torch.optim.Adam(p, lr=0.01, weight_decay=wd, eps=1.0),
    "Interpolatron": lambda p, wd: interpolatron.Interpolatron(p, lr=0.01, weight_decay=wd, backend="torch"),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gradient_residuals_vanish_at_the_regularised_optimum(name):
    wd = 0.3
    A, b, x_star = _ridge(0, wd)
    x = torch.tensor(x_star, requires_grad=True)
    opt = OPTIMIZERS[name]([x], wd)
    rna = interpolatron.RNA([x], window=3, residual="gradients", optimizer=opt, backend="torch")
    for _ in range(3):
        for _ in range(2):
            x.grad = torch.tensor(A.T @ (A @ x.detach().numpy() - b))  # not zero: wd * x_star is
            opt.step()
        rna.record()
    loss_grad_sq = float(np.sum((wd * x_star) ** 2))
    assert loss_grad_sq > 0.01
    assert float(rna._gram.diagonal().max()) < 1e-24 * loss_grad_sq  # p.grad alone would give loss_grad_sq


@pytest.mark.parametrize("name, decoupled", [("SGD", False), ("Adam", False), ("Interpolatron", False),
                                             ("AdamW", True), ("Adam decoupled", True)])
def test_gradient_residuals_are_the_mean_objective_gradient(name, decoupled):
    """Away from the optimum: the recorded residuals are the mean of
    ``p.grad + wd * p`` before each step (coupled), or of ``p.grad``
    (decoupled decay), checked through the extrapolation against the oracle."""
    wd = 0.05
    A, b, _ = _ridge(1, wd)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    factories = dict(OPTIMIZERS)
    factories["AdamW"] = lambda p, w: torch.optim.AdamW(p, lr=0.05, weight_decay=w)
    factories["Adam decoupled"] = lambda p, w: torch.optim.Adam(p, lr=0.05, weight_decay=w,
                                                               decoupled_weight_decay=True)
    opt = factories[name]([x], wd)
    rna = interpolatron.RNA([x], window=3, residual="gradients", optimizer=opt, backend="torch", reg=1e-9)
    iterates, means = [], []
    for n_steps in (2, 3, 1, 2):
        gs = []
        for _ in range(n_steps):
            g = A.T @ (A @ x.detach().numpy() - b)
            gs.append(g if decoupled else g + wd * x.detach().numpy())
            x.grad = torch.tensor(g)
            opt.step()
        rna.record()
        iterates.append(x.detach().numpy().copy())
        means.append(np.mean(gs, axis=0))
    newest_first = np.stack(means[::-1][:3], axis=1)
    np.testing.assert_allclose(rna._gram.numpy(), newest_first.T @ newest_first, rtol=1e-12, atol=1e-14)
    # and through the extrapolation (the solve amplifies rounding: looser)
    expected, c = rna_gradients(iterates[-3:], means[-3:], 1e-9)
    np.testing.assert_allclose(rna.extrapolate()[0].numpy(), expected, rtol=1e-7, atol=1e-9)


def test_maximize_negates_the_gradient_residual():
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1, weight_decay=0.5, maximize=True)
    rna = interpolatron.RNA([x], window=2, residual="gradients", optimizer=opt, backend="torch")
    g = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    x.grad = g.clone()
    opt.step()  # x = 0.1 * g, residual -g + 0.5 * 0 = -g
    rna.record()
    x.grad = g.clone()
    opt.step()  # residual -g + 0.5 * (0.1 g) = -0.95 g
    rna.record()
    np.testing.assert_allclose(rna._gram[:2, :2].numpy(), np.array([[0.95 ** 2, 0.95], [0.95, 1.0]])
                               * float(g @ g), rtol=1e-13)
