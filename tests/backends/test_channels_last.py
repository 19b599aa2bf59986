"""Dense non-contiguous parameters (channels_last) stay on the fused path of every
backend: elementwise in storage order, state views strided like the parameter."""

from __future__ import annotations

import pytest
import torch
from optimizers import ALGORITHMS, backend_params, make

from interpolatron import ring


def _model(channels_last: bool, dtype=torch.float32):
    torch.manual_seed(5)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(6, 4, 3),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 1)).to(dtype)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _run(model, opt, steps=5):
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(next(model.parameters()).dtype)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.to(memory_format=torch.channels_last)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.fixture
def no_fallback(monkeypatch):
    """The C++ backend would run such a call on the torch backend (and warn)."""
    from interpolatron.backends import native_backend

    def refuse(op):
        raise AssertionError(f"{op} fell back to the torch backend")

    monkeypatch.setattr(native_backend, "_fallback", refuse)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ALGORITHMS)
def test_channels_last_matches_the_contiguous_torch_run(name, backend):
    ref = _model(False)
    ref_opt = make(name, ref.parameters(), "torch", weight_decay=1e-3)
    _run(ref, ref_opt)
    model = _model(True)
    conv = model[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    opt = make(name, model.parameters(), backend, weight_decay=1e-3)
    _run(model, opt)
    for a, b in zip(model.parameters(), ref.parameters()):
        # Same elementwise math; the Gram (Anderson) sums in storage order, so
        # its rounding differs from the contiguous run's.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    xv = opt.state[conv]["x_hist"]
    assert xv.shape[1:] == conv.shape and xv[0].stride() == conv.stride()
    for p, q in zip(model.parameters(), ref.parameters()):  # the state reads like the parameter's
        torch.testing.assert_close(opt.state[p]["g_hist"], ref_opt.state[q]["g_hist"], rtol=1e-5, atol=1e-6)


def test_layout_helpers_round_trip():
    t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    order = ring.dim_order(t)
    assert order == (0, 2, 3, 1)
    v = ring.flat(t, order)
    assert v.data_ptr() == t.data_ptr()  # a view: storage order
    assert torch.equal(ring.unflat(v, t, order), t)
    assert ring.dim_order(torch.randn(3, 4)) is None
    assert ring.dim_order(torch.randn(4, 3).t()) == (1, 0)
    assert ring.dim_order(torch.randn(4, 6)[:, ::2]) is None  # not dense: row-major
