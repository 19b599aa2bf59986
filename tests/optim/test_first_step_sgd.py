"""The first step is exactly SGD (issue 17 item 4): ``x1 = x0 - lr * g0`` as
``k = 1`` computes it, bitwise, sign of zero included, on every backend
(torch, native, Triton through its interpreter) and dtype, with weight decay,
``maximize``, stochastic rounding, master weights, and when GradScaler skips
the first step; so a step at lr 0 moves nothing and torch's
``set_optimizer_state_dict`` (which runs such a step to build the state)
leaves a loaded model bitwise unchanged, and a DCP resume continues bitwise.

Before, Interpolatron's first step was ``sum_j a_j x0 - lr * sum_j a_j g0``
over identical copies: up to 2 ulps off ``x0 - lr * g0`` (1 ulp at lr 0)."""

from __future__ import annotations

import pytest
import torch
from optimizers import ALGORITHMS, backend_params, make, unavailable

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}
SIXTEEN = (torch.bfloat16, torch.float16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(BITS[t.dtype])


def _same_bits(a, b) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _data(dtype, zero_grads=False):
    """Two parameters (one odd-sized, past the kernels' vector width) with
    signed zeros, tiny and large values; their gradients."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(37, generator=gen, dtype=torch.float64),
          torch.randn(4, 5, generator=gen, dtype=torch.float64) * 1e3,
          torch.randn(3001, generator=gen, dtype=torch.float64)]  # the BLAS paths of the torch backend
    gs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    for x, g in ((xs[0], gs[0]), (xs[2], gs[2])):
        x[:6] = torch.tensor([0.0, -0.0, -0.0, 0.0, 1e-30, -1e-30], dtype=torch.float64)
        g[:6] = torch.tensor([0.0, 0.0, -0.0, -0.0, 0.0, -0.0], dtype=torch.float64)
    xs[2][1000::7] = -0.0
    xs = [x.to(dtype) for x in xs]
    gs = [torch.zeros_like(x) if zero_grads else g.to(dtype) for x, g in zip(xs, gs)]
    return xs, gs


def _first_step(name, dtype, backend, lr, zero_grads=False, **kw):
    xs, gs = _data(dtype, zero_grads)
    params = [x.clone().requires_grad_() for x in xs]
    opt = make(name, params, backend, lr=lr, **kw)
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    masters = [opt.state[p]["master"] for p in params] if kw.get("master_weights") else []
    return [p.detach() for p in params], masters


# The registry's k >= 2 configurations, each against its k = 1 step.
NAMES = ["interpolatron-k2", "interpolatron-k3", "anderson-k2", "anderson-k3"]
SGD = "interpolatron-k1"


def _modes(dtype):
    modes = [{}, {"weight_decay": 0.1}, {"maximize": True}]
    if dtype in SIXTEEN:
        modes += [{"stochastic_rounding": True, "sr_seed": 5}, {"master_weights": True},
                  {"master_weights": True, "weight_decay": 0.1}]
    return modes


def _mode_id(mode):
    return "-".join(f"{k}={v}" for k, v in mode.items()) or "plain"


def _cases() -> list:
    """Every backend, dtype and mode; a backend that cannot run a dtype here is
    reported as skipped with the reason."""
    out = []
    for b in [p.values[0] for p in backend_params()]:
        for dt in DTYPES:
            why = unavailable(b, dt)
            marks = [pytest.mark.skip(reason=f"backend {b!r}: {why}")] if why else []
            for m in _modes(dt):
                out.append(pytest.param(b, dt, m, id=f"{b}-{str(dt)[6:]}-{_mode_id(m)}", marks=marks))
    return out


CASES = _cases()


@pytest.mark.parametrize("backend,dtype,mode", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_first_step_is_the_k1_step_bitwise(name, backend, dtype, mode):
    want, want_master = _first_step(SGD, dtype, backend, 0.1, **mode)
    got, got_master = _first_step(name, dtype, backend, 0.1, **mode)
    assert _same_bits(got, want), max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))
    assert _same_bits(got_master, want_master)


@pytest.mark.parametrize("backend,dtype,mode", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_a_first_step_at_lr_0_moves_nothing(name, backend, dtype, mode):
    """What torch's set_optimizer_state_dict runs: zero gradients, lr 0. Bitwise;
    with ``maximize`` the gradient is -0.0 and ``x - 0 * -0.0`` turns a -0.0
    parameter into +0.0, as the k = 1 step (and ``x - lr * g`` in IEEE
    arithmetic) does: equal values there."""
    xs, _ = _data(dtype)
    got, masters = _first_step(name, dtype, backend, 0.0, zero_grads=True, **mode)
    if mode.get("maximize"):
        assert all(torch.equal(a, b) for a, b in zip(got, xs))
        assert _same_bits(got, _first_step(SGD, dtype, backend, 0.0, zero_grads=True, **mode)[0])
    else:
        assert _same_bits(got, xs)
    assert all(torch.equal(m, x.float()) for m, x in zip(masters, xs))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_first_step_leaves_the_next_one_sgd(name, backend):
    """GradScaler skips the first step (found_inf): the next, taken step is the
    first one, and exactly the k = 1 step from x0 with its gradient."""
    xs, gs = _data(torch.float32)
    runs = []
    for config in (SGD, name):
        params = [x.clone().requires_grad_() for x in xs]
        opt = make(config, params, backend, lr=0.1)
        for found in (1.0, 0.0):
            for p, g in zip(params, gs):
                p.grad = (g * 4.0 if found == 0 else torch.full_like(g, float("inf")))
            opt.step(grad_scale=torch.tensor([4.0]), found_inf=torch.tensor([found]))
        runs.append([p.detach() for p in params])
    assert _same_bits(runs[1], runs[0])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_dcp_resume_leaves_the_loaded_model_unchanged_and_continues_bitwise(tmp_path, name):
    """Single process, through torch.distributed.checkpoint (dcp.save / dcp.load
    and the state-dict helpers), the model loaded first: the lr-0 step on zero
    gradients that initialises the fresh optimizer must not move the loaded
    parameters, and the resumed run continues the uninterrupted one bitwise
    (before: 3e-8 off after 8 steps). (2 ranks, FSDP2:
    tests/integration/test_stack_distributed.py.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def model_and_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        return model, make(name, model.parameters(), lr=0.05, weight_decay=1e-3)

    def train(model, opt, first, last):
        for t in range(first, last):
            gen = torch.Generator().manual_seed(100 + t)
            x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    straight, straight_opt = model_and_opt()
    train(straight, straight_opt, 0, 8)
    saved, saved_opt = model_and_opt()
    train(saved, saved_opt, 0, 4)
    path = str(tmp_path / "ckpt")
    with pytest.warns(UserWarning):  # dcp without a process group says so
        dcp.save({"model": get_model_state_dict(saved), "optim": get_optimizer_state_dict(saved, saved_opt)},
                 checkpoint_id=path)
    # The model first, then the optimizer: get_optimizer_state_dict initialises
    # the fresh optimizer with an lr-0 step on zero gradients of the loaded model.
    resumed, resumed_opt = model_and_opt()
    model_sd = get_model_state_dict(resumed)
    with pytest.warns(UserWarning):
        dcp.load({"model": model_sd}, checkpoint_id=path)
    set_model_state_dict(resumed, model_sd)
    loaded = [p.detach().clone() for p in resumed.parameters()]
    assert _same_bits(loaded, list(saved.parameters()))
    optim_sd = get_optimizer_state_dict(resumed, resumed_opt)
    assert _same_bits(list(resumed.parameters()), loaded)
    with pytest.warns(UserWarning):
        dcp.load({"optim": optim_sd}, checkpoint_id=path)
    set_optimizer_state_dict(resumed, resumed_opt, optim_sd)
    assert _same_bits(list(resumed.parameters()), loaded)
    train(resumed, resumed_opt, 4, 8)
    assert _same_bits(list(resumed.parameters()), list(straight.parameters()))


def test_set_optimizer_state_dict_on_a_fresh_optimizer_leaves_the_model_unchanged():
    """set_optimizer_state_dict into a fresh optimizer runs the initialising
    lr-0 step itself, on the loaded model."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    fresh_opt = lambda: make("interpolatron", model.parameters(), lr=0.05, weight_decay=1e-3)  # noqa: E731
    opt = fresh_opt()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
    osd = get_optimizer_state_dict(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    fresh = fresh_opt()
    model.zero_grad(set_to_none=True)
    set_optimizer_state_dict(model, fresh, osd)
    assert _same_bits(list(model.parameters()), before)
