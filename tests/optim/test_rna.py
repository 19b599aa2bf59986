"""RNA: the formula of ALGORITHMS.md section 3, acceleration on a quadratic,
warm-up, buffers, swapping, shadows, online mode, gradient residuals, adaptive
lambda and the errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _oracle import rna_coefficients, rna_gradients, rna_iterates
from torch import nn

import interpolatron


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {n: t.detach().clone() for n, t in named.items()}


def _train_step(model, opt, X, Y):
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()


def _expected_from_snapshots(snaps: list[dict], lam: float) -> tuple[dict, np.ndarray]:
    """The section-3 formula over all floating tensors (parameters and float
    buffers, as the paper's CNN experiments do), integers from the newest."""
    floats = [n for n, t in snaps[-1].items() if t.is_floating_point()]
    flat = [np.concatenate([s[n].numpy().reshape(-1) for n in floats]) for s in snaps]
    _, c = rna_iterates(flat, lam)
    out = {}
    for n, t in snaps[-1].items():
        if t.is_floating_point():
            out[n] = sum(ci * s[n].numpy() for ci, s in zip(c, snaps[1:]))
        else:
            out[n] = t.numpy()
    return out, c


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        assert torch.equal(a[n], b[n]), n


@pytest.fixture
def trained():
    """A BatchNorm model trained for 7 steps with a record after each (window 4)."""
    torch.manual_seed(0)
    model = _bn_model()
    X, Y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rna = interpolatron.RNA(model, window=4, reg=1e-6, backend="torch")
    snaps = []
    for _ in range(7):
        _train_step(model, opt, X, Y)
        rna.record()
        snaps.append(_state(model))
    return model, rna, snaps, opt, (X, Y)


# -- the formula ----------------------------------------------------------------------

def test_extrapolation_equals_the_formula_on_recorded_snapshots(trained):
    model, rna, snaps, _, _ = trained
    before = _state(model)
    out = rna.extrapolate()
    expected, c = _expected_from_snapshots(snaps[-5:], 1e-6)
    assert set(out) == set(expected)
    for n, t in out.items():
        np.testing.assert_allclose(t.numpy(), expected[n], rtol=1e-10, atol=1e-12, err_msg=n)
    np.testing.assert_allclose(rna.coefficients.numpy()[::-1], c, rtol=1e-9, atol=1e-12)
    assert abs(float(rna.coefficients.sum()) - 1) < 1e-12
    _assert_bitwise_equal(_state(model), before)  # offline: the model is untouched


def test_float_buffers_are_extrapolated_and_integer_buffers_copied(trained):
    model, rna, snaps, _, _ = trained
    out = rna.extrapolate()
    expected, _ = _expected_from_snapshots(snaps[-5:], 1e-6)
    mean, count = "1.running_mean", "1.num_batches_tracked"
    assert out[count].dtype == torch.int64
    assert int(out[count]) == int(snaps[-1][count]) == 7
    np.testing.assert_allclose(out[mean].numpy(), expected[mean], rtol=1e-10, atol=1e-12)
    # it really is an extrapolation, not the newest snapshot
    assert not torch.allclose(out[mean], snaps[-1][mean], rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reg", [0.0, 1e-12])
def test_extrapolating_gradient_descent_on_a_quadratic_gains_orders_of_magnitude(seed, reg):
    rng = np.random.default_rng(seed)
    d = 30
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (q * np.linspace(0.1, 1.0, d)) @ q.T  # condition number 10
    b = rng.standard_normal(d)
    x_star = np.linalg.solve(A, b)
    x = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=1.0)
    rna = interpolatron.RNA([x], window=10, reg=reg, backend="torch")
    rna.record()
    for _ in range(30):
        x.grad = torch.tensor(A @ x.detach().numpy() - b)
        opt.step()
        rna.record()
    err_last = np.linalg.norm(x.detach().numpy() - x_star)
    err_rna = np.linalg.norm(rna.extrapolate()[0].numpy() - x_star)
    assert err_rna * 100 <= err_last, (err_last, err_rna)


# -- warm-up ------------------------------------------------------------------------------

def test_window_warm_up_uses_the_records_there_are():
    window = 4
    x = torch.randn(5, dtype=torch.float64)
    rna = interpolatron.RNA([x], window=window, reg=1e-9, backend="torch")
    with pytest.raises(RuntimeError, match="at least 2 records"):
        rna.extrapolate()
    snaps = []
    for r in range(window + 4):
        x.mul_(0.7).add_(torch.randn(5, dtype=torch.float64) * 0.1)
        rna.record()
        snaps.append(x.numpy().copy())
        if r == 0:
            assert rna.residuals == 0
            with pytest.raises(RuntimeError, match="at least 2 records"):
                rna.extrapolate()
            continue
        m = min(r, window)
        assert rna.residuals == m
        out = rna.extrapolate()[0]
        expected, c = rna_iterates(snaps[-(m + 1):], 1e-9)
        assert rna.coefficients.shape == (m,)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # with a single residual the only weight is 1: the newest snapshot
    rna1 = interpolatron.RNA([torch.ones(3)], window=1, backend="torch")
    rna1.record()
    rna1._named["0"].mul_(2)  # a new iterate
    rna1.record()
    np.testing.assert_array_equal(rna1.extrapolate()[0].numpy(), [2.0, 2.0, 2.0])


# -- swapping, shadows, online ---------------------------------------------------------------

def test_swapped_puts_the_extrapolation_in_and_restores_bitwise(trained):
    model, rna, _, opt, (X, Y) = trained
    before = _state(model)
    param_ids = [id(p) for p in model.parameters()]
    expected = rna.extrapolate()
    with rna.swapped():
        inside = _state(model)
        for n, t in expected.items():
            assert torch.equal(inside[n], t), n
    _assert_bitwise_equal(_state(model), before)
    assert [id(p) for p in model.parameters()] == param_ids
    # training continues as if nothing happened
    _train_step(model, opt, X, Y)


def test_swapped_restores_bitwise_when_the_body_raises(trained):
    model, rna, _, _, _ = trained
    before = _state(model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with rna.swapped():
            assert not torch.equal(model[0].weight, before["0.weight"])
            raise Boom
    _assert_bitwise_equal(_state(model), before)


def test_swapped_with_bn_loader_recomputes_statistics_and_restores(trained):
    model, rna, _, _, (X, _) = trained
    before = _state(model)
    loader = [X]
    with rna.swapped(bn_loader=loader):
        model.eval()
        pre_bn = model[0](X).detach()
        np.testing.assert_allclose(model[1].running_mean.numpy(), pre_bn.mean(0).numpy(), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(model[1].running_var.numpy(), pre_bn.var(0, unbiased=True).numpy(),
                                   rtol=1e-10, atol=1e-12)
        model.train()
    _assert_bitwise_equal(_state(model), before)


def test_extrapolate_into_a_shadow_module(trained):
    model, rna, _, _, (X, _) = trained
    before = _state(model)
    shadow = copy.deepcopy(model)
    for p in shadow.parameters():
        p.data.fill_(123.0)
    result = rna.extrapolate(into=shadow)
    assert result is shadow
    expected = rna.extrapolate()
    got = _state(shadow)
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    _assert_bitwise_equal(_state(model), before)
    # bn_loader: the shadow's statistics are recomputed from the data
    rna.extrapolate(into=shadow, bn_loader=[X])
    pre_bn = shadow[0](X).detach()
    np.testing.assert_allclose(shadow[1].running_mean.numpy(), pre_bn.mean(0).numpy(), rtol=1e-10, atol=1e-12)


def test_extrapolate_into_a_mismatched_shadow_is_refused(trained):
    model, rna, _, _, _ = trained
    before = _state(model)
    with pytest.raises(ValueError, match="lacks"):
        rna.extrapolate(into=nn.Linear(4, 6).double())
    wrong = _bn_model()
    wrong[3] = nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match="cannot write"):
        rna.extrapolate(into=wrong)
    with pytest.raises(TypeError, match="nn.Module"):
        rna.extrapolate(into={"0.weight": torch.zeros(6, 4)})
    _assert_bitwise_equal(_state(model), before)


def test_online_mode_writes_the_extrapolation_into_the_model_and_resets_the_optimizer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rna = interpolatron.RNA(model, window=3, reg=1e-6, mode="online", optimizer=opt, reset_optimizer=True,
                            backend="torch")
    snaps = []
    rna.record()
    snaps.append(_state(model))
    _assert_bitwise_equal(_state(model), snaps[-1])  # one record: nothing to extrapolate
    for _ in range(6):
        _train_step(model, opt, X, Y)
        assert len(opt.state) > 0
        snaps.append(_state(model))
        rna.record()
        expected, _ = _expected_from_snapshots(snaps[-4:], 1e-6)
        for n, t in _state(model).items():
            np.testing.assert_allclose(t.numpy(), expected[n], rtol=1e-10, atol=1e-12, err_msg=n)
        assert len(opt.state) == 0  # momentum reset after the jump


# -- gradient residuals ------------------------------------------------------------------------

def test_gradient_residuals_average_the_steps_between_records():
    torch.manual_seed(2)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    rna = interpolatron.RNA([x], window=3, reg=1e-8, residual="gradients", optimizer=opt, backend="torch")
    with pytest.raises(RuntimeError, match="no optimizer step"):
        rna.record()
    iterates, means = [], []
    for r, n_steps in enumerate([1, 3, 2, 4]):
        grads = []
        for _ in range(n_steps):
            g = torch.randn(6, dtype=torch.float64) + r
            x.grad = g.clone()
            grads.append(g.numpy())
            opt.step()
        rna.record()
        iterates.append(x.detach().numpy().copy())
        means.append(np.mean(grads, axis=0))
    expected, c = rna_gradients(iterates[-3:], means[-3:], 1e-8)
    np.testing.assert_allclose(rna.extrapolate()[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rna.coefficients.numpy()[::-1], c, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="no optimizer step"):
        rna.record()
    rna.close()
    x.grad = torch.ones(6, dtype=torch.float64)
    opt.step()
    with pytest.raises(RuntimeError, match="no optimizer step"):
        rna.record()  # closed: the step was not followed


# -- adaptive lambda ---------------------------------------------------------------------------

def test_adaptive_lambda_picks_the_best_grid_value():
    """Minibatch SGD on least squares (noisy residuals: a well-conditioned
    window); the full-data loss is the objective."""
    window = 5
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(64, 8, dtype=torch.float64, generator=gen)
    Y = X @ torch.randn(8, 1, dtype=torch.float64, generator=gen) + 0.1 * torch.randn(
        64, 1, dtype=torch.float64, generator=gen)
    model = nn.Linear(8, 1).double()

    def objective(m):
        return nn.functional.mse_loss(m(X), Y).item()

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    adaptive = interpolatron.RNA(model, window=window, objective=objective, backend="torch")
    plain = interpolatron.RNA(model, window=window, backend="torch")  # the default reg
    snaps = []
    for _ in range(window + 3):
        for _ in range(4):
            idx = torch.randint(0, 64, (8,), generator=gen)
            _train_step(model, opt, X[idx], Y[idx])
        adaptive.record()
        plain.record()
        snaps.append(_state(model))
    before = _state(model)
    out = adaptive.extrapolate()
    _assert_bitwise_equal(_state(model), before)  # the search swapped in and out exactly
    grid = [0.0] + list(np.logspace(-15, 1, window))
    assert any(adaptive.reg_used == pytest.approx(lam, rel=1e-12, abs=0) for lam in grid)

    def value_at(lam):
        params, _ = _expected_from_snapshots(snaps[-(window + 1):], lam)
        probe = nn.Linear(8, 1).double()
        with torch.no_grad():
            probe.weight.copy_(torch.tensor(params["weight"]))
            probe.bias.copy_(torch.tensor(params["bias"]))
        return objective(probe)

    best = min(value_at(lam) for lam in grid)
    chosen = value_at(adaptive.reg_used)
    assert chosen <= best * (1 + 1e-12)
    # the returned point is the extrapolation at the chosen lambda
    expected, _ = _expected_from_snapshots(snaps[-(window + 1):], adaptive.reg_used)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(out[name].numpy(), expected[name], rtol=1e-10, atol=1e-12)
    # not worse than the default lambda, and better than the last iterate
    default = plain.extrapolate()
    probe = nn.Linear(8, 1).double()
    with torch.no_grad():
        probe.weight.copy_(default["weight"])
        probe.bias.copy_(default["bias"])
    assert chosen <= objective(probe) * (1 + 1e-12)
    assert chosen < objective(model)


def test_objective_needs_a_module():
    rna = interpolatron.RNA([torch.randn(3)], window=2, objective=lambda m: 0.0, backend="torch")
    rna.record()
    rna.record()
    with pytest.raises(RuntimeError, match="nn.Module"):
        rna.extrapolate()


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [0, -1, 2.5, "3"])
def test_bad_window_is_refused(window):
    with pytest.raises(ValueError, match="window"):
        interpolatron.RNA([torch.randn(3)], window=window)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reg=-1e-3), "reg"),
    (dict(residual="momentum"), "residual"),
    (dict(mode="sometimes"), "mode"),
    (dict(residual="gradients"), "optimizer"),
    (dict(backend="nonexistent"), "backend"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpolatron.RNA([torch.randn(3)], window=2, **kwargs)


def test_complex_tensors_are_refused():
    with pytest.raises(TypeError, match="complex"):
        interpolatron.RNA([torch.randn(3), torch.randn(3, dtype=torch.complex64)], window=2)


def test_nothing_to_track_is_refused():
    with pytest.raises(ValueError, match="at least one tensor"):
        interpolatron.RNA([], window=2)


def test_too_few_records_is_a_clear_error():
    rna = interpolatron.RNA(_bn_model(), window=3, backend="torch")
    with pytest.raises(RuntimeError, match="at least 2 records to extrapolate, has 0"):
        rna.extrapolate()
    rna.record()
    with pytest.raises(RuntimeError, match="at least 2 records to extrapolate, has 1"):
        with rna.swapped():
            pass


def test_rna_coefficients_oracle_self_check():
    """The oracle's solve: orthogonal equal-norm residuals give uniform weights,
    and the weights always sum to one."""
    R = np.eye(4)[:, :3] * 2.0
    np.testing.assert_allclose(rna_coefficients(R, 0.0), np.full(3, 1 / 3), rtol=1e-15)
    R = np.random.default_rng(0).standard_normal((7, 4))
    assert abs(rna_coefficients(R, 1e-3).sum() - 1) < 1e-12
