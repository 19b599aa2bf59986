"""Visible failure signals: Anderson's fallback counter and its one-time
warning on many consecutive fallbacks; RNA naming a non-finite snapshot."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import interpolatron
from interpolatron.optim import anderson

pytestmark = pytest.mark.usefixtures("one_thread")


def _collinear_run(steps):
    """In 1-D every pair of gradients is collinear: every step after the first falls back."""
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.01, history=2, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            p.grad = 3.0 * p.detach() + 1.0
            opt.step()
    return opt, [w for w in caught if "fell back" in str(w.message)]


def test_many_consecutive_fallbacks_warn_once_and_say_why():
    opt, caught = _collinear_run(2 * anderson.FALLBACK_CHECK_EVERY - 1)
    assert isinstance(opt.fallbacks, torch.Tensor) and opt.fallbacks.dtype == torch.int64
    assert int(opt.fallbacks) == 2 * anderson.FALLBACK_CHECK_EVERY - 2
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "non-finite" in message and "weight_decay" in message and "collinear" in message
    assert f"last {anderson.FALLBACK_CHECK_EVERY - 1} steps" in message  # the first step is no fallback


def test_no_warning_before_the_check_or_without_fallbacks():
    _, caught = _collinear_run(anderson.FALLBACK_CHECK_EVERY - 1)
    assert caught == []
    rng = np.random.default_rng(0)
    p = torch.tensor(rng.standard_normal(8), requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.01, history=3, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2 * anderson.FALLBACK_CHECK_EVERY + 1):
            p.grad = torch.tensor(rng.standard_normal(8))
            opt.step()
    assert int(opt.fallbacks) == 0


def test_the_warning_reads_the_device_only_at_its_cadence(monkeypatch):
    """One host read of the streak counter per FALLBACK_CHECK_EVERY steps, none in
    between, and that read is no aten::item (no device sync on a GPU)."""
    reads = []
    original = anderson.Anderson._read_streak

    def counting(self):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            value = original(self)
        reads.append([e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")])
        return value

    rng = np.random.default_rng(1)
    p = torch.tensor(rng.standard_normal(4), requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.01, history=2, backend="torch")
    monkeypatch.setattr(anderson.Anderson, "_read_streak", counting)
    for _ in range(2 * anderson.FALLBACK_CHECK_EVERY + 5):
        p.grad = torch.tensor(rng.standard_normal(4))
        opt.step()
    assert reads == [[], []]


def test_a_nan_parameter_with_weight_decay_falls_back_every_step_and_warns():
    p = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64, requires_grad=True)
    opt = interpolatron.Anderson([p], lr=0.01, history=2, weight_decay=1e-2, backend="torch")
    with pytest.warns(RuntimeWarning, match="weight_decay"):
        for _ in range(anderson.FALLBACK_CHECK_EVERY):
            p.grad = torch.ones(3, dtype=torch.float64)
            opt.step()
    assert int(opt.fallbacks) == anderson.FALLBACK_CHECK_EVERY  # the first step too: its 1x1 Gram is NaN


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


def test_rna_names_the_non_finite_snapshot_and_its_age():
    torch.manual_seed(0)
    net = _Net()
    rna = interpolatron.RNA(net, window=3, backend="torch")
    for t in range(4):
        with torch.no_grad():
            net.lin.weight.mul_(0.9).add_(0.01)
            net.lin.bias.add_(0.1)
            if t == 2:
                net.lin.bias[1] = float("inf")
        rna.record()
        if t == 2:
            with torch.no_grad():
                net.lin.bias[1] = 0.0
    with pytest.raises(FloatingPointError, match=r"snapshot of age 1 .*'lin\.bias'"):
        rna.extrapolate()


def test_rna_names_a_non_finite_average_gradient():
    torch.manual_seed(1)
    w = torch.randn(4, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    rna = interpolatron.RNA([w], window=2, residual="gradients", optimizer=opt, backend="torch")
    for t in range(3):
        w.grad = torch.randn(4)
        if t == 2:
            w.grad[0] = float("nan")
        opt.step()
        rna.record()
    with pytest.raises(FloatingPointError, match=r"average gradient of age 0 \(the newest"):
        rna.extrapolate()
