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


def _cases(modes=_modes) -> list:
    """Every backend, dtype and mode (``modes(dtype)``); a backend that cannot
    run a dtype here is reported as skipped with the reason."""
    out = []
    for b in [p.values[0] for p in backend_params()]:
        for dt in DTYPES:
            why = unavailable(b, dt)
            marks = [pytest.mark.skip(reason=f"backend {b!r}: {why}")] if why else []
            for m in modes(dt):
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


# -- a parameter's first step when the optimizer is past its own --------------------------------
#
# A parameter that first has a gradient after the optimizer's first step (a
# layer unfrozen later, a group added later) is warm-started like every other:
# its rings hold k copies of x0 and g0. Its step is still the SGD step, rounded
# once. Before: the bucket's coefficients over those copies, up to 4.8e-7 off.

JOIN_NAMES = ["interpolatron-k2", "interpolatron-k3", "anderson-k2", "anderson-k3", "anderson-k2-onepass"]


def _join_modes(dtype):
    sixteen = [{"stochastic_rounding": True, "sr_seed": 5}, {"master_weights": True}]
    return [{}, {"weight_decay": 0.1}] + (sixteen if dtype in SIXTEEN else [])


def _settled_data(dtype, steps):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(29, generator=gen, dtype=torch.float64).to(dtype)
    return x, [torch.randn(29, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]


def _join_run(name, dtype, backend, lr, mode, *, zero_grads=False, before=3, new_group=False):
    """``before`` steps on a settled parameter alone, then one with the joiners
    too (in its group, or in a group added now); the joiners after that step."""
    xs, gs = _data(dtype, zero_grads)
    x, settled_grads = _settled_data(dtype, before + 1)
    settled = x.clone().requires_grad_()
    joiners = [t.clone().requires_grad_() for t in xs]
    opt = make(name, [settled] if new_group else [settled] + joiners, backend, lr=lr, **mode)
    for t in range(before):
        settled.grad = settled_grads[t].clone()
        opt.step()
    if new_group:
        opt.add_param_group({"params": joiners})
    settled.grad = settled_grads[before].clone()
    for p, g in zip(joiners, gs):
        p.grad = g.clone()
    opt.step()
    masters = [opt.state[p]["master"] for p in joiners] if mode.get("master_weights") else []
    return [p.detach() for p in joiners], masters


@pytest.mark.parametrize("backend,dtype,mode", _cases(_join_modes))
@pytest.mark.parametrize("name", JOIN_NAMES)
def test_a_parameter_that_joins_late_takes_the_k1_step_bitwise(name, backend, dtype, mode):
    """Against k = 1 joining at the same step (the same count and columns: the
    same stochastic-rounding draws)."""
    want, want_master = _join_run(SGD, dtype, backend, 0.1, mode)
    got, got_master = _join_run(name, dtype, backend, 0.1, mode)
    assert _same_bits(got, want), max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))
    assert _same_bits(got_master, want_master)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", JOIN_NAMES)
def test_a_parameter_that_joins_late_at_lr_0_on_zero_gradients_stays(name, backend):
    xs, _ = _data(torch.float32)
    got, _ = _join_run(name, torch.float32, backend, 0.0, {}, zero_grads=True)
    assert _same_bits(got, xs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", JOIN_NAMES)
def test_a_group_added_late_takes_the_k1_step_bitwise(name, backend):
    """A new group is a new bucket: its count is 0 but Anderson's coefficients
    are the whole model's, fitted on the settled parameters."""
    want, _ = _first_step(SGD, torch.float32, backend, 0.1)
    got, _ = _join_run(name, torch.float32, backend, 0.1, {}, new_group=True)
    assert _same_bits(got, want)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", JOIN_NAMES)
def test_a_parameter_that_joins_in_a_skipped_step_takes_the_k1_step_at_the_next(name, backend):
    """GradScaler skips the step in which the joiners first have a gradient
    (found_inf), and the one after: the next taken step is their first, the
    k = 1 step from x0 with that step's gradient; the steps after it are the
    bucket's (the joiners then move like the settled parameter's run does)."""
    xs, gs = _data(torch.float32)
    x, settled_grads = _settled_data(torch.float32, 8)
    scale = torch.tensor([4.0])

    def run(config):
        settled = x.clone().requires_grad_()
        joiners = [t.clone().requires_grad_() for t in xs]
        opt = make(config, [settled] + joiners, backend, lr=0.1)
        for t in range(6):
            found = 1.0 if t in (2, 3) else 0.0
            settled.grad = settled_grads[t] * 4.0
            if t >= 2:
                for p, g in zip(joiners, gs):
                    p.grad = torch.full_like(g, float("inf")) if found else g * (4.0 + t)
            opt.step(grad_scale=scale, found_inf=torch.tensor([found]))
            if t == 4:
                first = [p.detach().clone() for p in joiners]
        return first

    sgd_joiners = [t.clone().requires_grad_() for t in xs]
    sgd = make(SGD, sgd_joiners, backend, lr=0.1)
    for p, g in zip(sgd_joiners, gs):
        p.grad = g * 8.0
    sgd.step(grad_scale=scale, found_inf=torch.tensor([0.0]))
    assert _same_bits(run(name), [p.detach() for p in sgd_joiners])


@pytest.mark.parametrize("name", ["interpolatron-k2", "anderson-k2", "anderson-k2-onepass"])
def test_a_parameter_that_joins_late_compiled_equals_eager(name):
    """torch.compile(opt.step): the joiners' first step is the k = 1 step, and
    the steps after it are the bucket's (a compiled graph with the joiners'
    SGD pass is not reused once they are past it)."""
    xs, gs = _data(torch.float32)
    x, settled_grads = _settled_data(torch.float32, 8)

    def run(compiled):
        torch._dynamo.reset()
        settled = x.clone().requires_grad_()
        joiners = [t.clone().requires_grad_() for t in xs]
        opt = make(name, [settled] + joiners, "torch", lr=torch.tensor(0.1))
        step = torch.compile(opt.step) if compiled else opt.step
        out = []
        for t in range(7):
            settled.grad = settled_grads[t].clone()
            if t >= 2:
                for p, g in zip(joiners, gs):
                    p.grad = g * (1.0 + t)
            step()
            out.append([p.detach().clone() for p in [settled] + joiners])
        return out

    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled):
        assert _same_bits(a, b)
    sgd_joiners = [t.clone().requires_grad_() for t in xs]
    sgd = make(SGD, sgd_joiners, "torch", lr=torch.tensor(0.1))
    for p, g in zip(sgd_joiners, gs):
        p.grad = g * 3.0
    sgd.step()
    assert _same_bits(eager[2][1:], [p.detach() for p in sgd_joiners])
