"""GradScaler's fused contract (ALGORITHMS.md section 7, issue 10 item 3).

Interpolatron and Anderson set ``_step_supports_amp_scaling``: GradScaler hands
them ``grad_scale`` and ``found_inf`` and the kernels of every backend divide
the gradient by the scale and write nothing on a step with an inf/NaN
gradient, decided on the device. Checked against independent runs:

* ``Interpolatron(alphas=(1.0,))`` against ``torch.optim.SGD(fused=True)``
  under the same scaler, inf steps injected (the scale backs off and grows:
  the same scale sequence, the same skipped steps);
* k = 2 Interpolatron and Anderson under a scaler against the same run fed
  the pre-unscaled gradients (GradScaler's scales are powers of two, so
  dividing by them is exact: bitwise equal);
* a skipped step leaves every parameter and state tensor bitwise unchanged,
  a skipped FIRST step included (its warm start is refilled at the next one);
* ``unscale_`` + ``clip_grad_norm_`` + ``step`` (GradScaler then passes only
  ``found_inf``);
* a scaled step reads no device value on the host (profiler).
"""

from __future__ import annotations

import pytest
import torch
from _gpu import gpu_backends
from optimizers import BACKENDS, need_backend

from interpolatron.optim import Anderson, Interpolatron

INF_STEPS = (0, 3, 7)  # the first step too: its warm start must not keep the inf gradient




def _model(dtype=torch.float32, device="cpu") -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(device=device, dtype=dtype)


def _data(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g).to(device), torch.randn(64, 3, generator=g).to(device)


def _scaler(device="cpu") -> torch.amp.GradScaler:
    # A short growth interval: the scale both backs off (inf steps) and grows.
    return torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)


def _scaled_run(make_opt, steps: int = 10, inf_steps=INF_STEPS, clip: float | None = None, device="cpu",
                dtype=torch.float32):
    """Train under a GradScaler, an inf injected into one gradient at ``inf_steps``."""
    m = _model(dtype, device)
    opt = make_opt(m.parameters())
    scaler = _scaler(device)
    x, y = _data(device)
    scales = []
    for t in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x.to(dtype)).float(), y)
        scaler.scale(loss).backward()
        if t in inf_steps:
            m[0].weight.grad[1, 2] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    return m, opt, scales


def _unscaled_run(make_opt, scales, steps: int = 10, inf_steps=INF_STEPS, clip: float | None = None,
                  device="cpu", dtype=torch.float32):
    """The same training fed pre-unscaled gradients (``grad * (1 / scale)``, as
    GradScaler.unscale_ forms them), the inf steps not taken at all."""
    m = _model(dtype, device)
    opt = make_opt(m.parameters())
    x, y = _data(device)
    for t in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x.to(dtype)).float(), y)
        (loss * scales[t]).backward()
        if t in inf_steps:
            continue
        inv = torch.tensor(scales[t], dtype=torch.float64).reciprocal().float().to(device)
        for p in m.parameters():
            p.grad.mul_(inv)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
    return m, opt


def _state_tensors(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in enumerate(opt.state.values()):
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{i}/{key}"] = v.detach().clone()
    return out


def test_flag_is_set():
    assert Interpolatron._step_supports_amp_scaling is True
    assert Anderson._step_supports_amp_scaling is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1_equals_fused_sgd_under_grad_scaler(backend):
    need_backend(backend)
    ref, _, ref_scales = _scaled_run(lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True))
    got, opt, scales = _scaled_run(lambda ps: Interpolatron(ps, lr=0.1, alphas=(1.0,), backend=backend))
    assert scales == ref_scales  # the same skipped steps, the same scale sequence
    assert len(set(scales)) >= 2  # it backed off and grew again
    for a, b in zip(ref.parameters(), got.parameters()):
        # One rounding apart per step at most: torch's SGD forms p - lr * g
        # with a fused multiply-add where the torch backend rounds lr * g
        # first (10 steps, |p| <= 1.5: 1e-6 is a few ulps).
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert int(opt.state[next(iter(got.parameters()))]["step"]) == 10 - len(INF_STEPS)


def _k2_factory(algo: str, backend: str):
    """k = 2 with weight decay: Interpolatron or Anderson on ``backend``."""
    if algo == "interpolatron":
        return lambda ps: Interpolatron(ps, lr=0.05, alphas=(0.3, 0.7), weight_decay=0.01, backend=backend)
    return lambda ps: Anderson(ps, lr=0.05, history=2, reg=1e-3, weight_decay=0.01, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
def test_k2_scaled_equals_pre_unscaled(backend, algo):
    need_backend(backend)
    make = _k2_factory(algo, backend)
    got, opt, scales = _scaled_run(make)
    want, ref_opt = _unscaled_run(make, scales)
    # Power-of-two scales: dividing by them is exact, so bitwise.
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    s_got, s_want = _state_tensors(opt), _state_tensors(ref_opt)
    assert s_got.keys() == s_want.keys()
    for key in s_want:
        assert torch.equal(s_got[key], s_want[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
def test_skipped_step_writes_nothing(backend, algo):
    need_backend(backend)
    m = _model()
    if algo == "interpolatron":
        opt = Interpolatron(m.parameters(), lr=0.05, alphas=(0.1, 0.3, 0.6), backend=backend)
    else:
        opt = Anderson(m.parameters(), lr=0.05, history=3, backend=backend)
    x, y = _data()
    scale = torch.tensor(2.0 ** 8)
    for _ in range(3):
        opt.zero_grad()
        (torch.nn.functional.mse_loss(m(x), y) * scale).backward()
        opt.step(grad_scale=scale, found_inf=torch.tensor(0.0))
    params = [p.detach().clone() for p in m.parameters()]
    state = _state_tensors(opt)
    opt.zero_grad()
    (torch.nn.functional.mse_loss(m(x), y) * scale).backward()
    m[2].bias.grad[0] = float("nan")
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    for a, b in zip(params, m.parameters()):
        assert torch.equal(a, b)
    after = _state_tensors(opt)
    assert after.keys() == state.keys()
    for key in state:
        assert torch.equal(after[key], state[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_clip_step(backend):
    need_backend(backend)

    def make(ps):
        return Anderson(ps, lr=0.05, history=2, backend=backend)

    got, opt, scales = _scaled_run(make, clip=0.5)
    want, ref_opt = _unscaled_run(make, scales, clip=0.5)
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attributes_and_keywords_agree(backend):
    """GradScaler passes optimizer attributes; a direct call passes keywords."""
    need_backend(backend)
    runs = []
    for how in ("attr", "kw"):
        m = _model()
        opt = Interpolatron(m.parameters(), lr=0.1, alphas=(0.5, 0.5), backend=backend)
        x, y = _data()
        for _ in range(3):
            opt.zero_grad()
            (torch.nn.functional.mse_loss(m(x), y) * 64.0).backward()
            scale, found = torch.tensor(64.0), torch.tensor(0.0)
            if how == "attr":
                opt.grad_scale, opt.found_inf = scale, found
                opt.step()
                del opt.grad_scale, opt.found_inf
            else:
                opt.step(grad_scale=scale, found_inf=found)
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bad_scaler_input_changes_nothing():
    m = _model()
    opt = Interpolatron(m.parameters(), lr=0.1, alphas=(0.5, 0.5), backend="torch")
    x, y = _data()
    torch.nn.functional.mse_loss(m(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=torch.ones(2))
    with pytest.raises(ValueError, match="found_inf"):
        opt.step(found_inf=torch.zeros(3))
    assert not opt.state
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
def test_scaled_step_reads_nothing_on_the_host(backend, algo):
    need_backend(backend)
    m = _model()
    if algo == "interpolatron":
        opt = Interpolatron(m.parameters(), lr=0.05, alphas=(0.3, 0.7), backend=backend)
    else:
        opt = Anderson(m.parameters(), lr=0.05, history=2, backend=backend)
    scaler = _scaler()
    x, y = _data()

    def train_step(inf: bool):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        if inf:
            m[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    train_step(True)  # a skipped first step: its warm start is pending until a taken one
    train_step(False)
    train_step(False)
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
    # GradScaler.step itself included: with the fused contract it reads nothing
    # either (its non-fused path would call found_inf.item()).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scaler.step(opt)
    names = {e.name for e in prof.events()}
    assert "aten::item" not in names and "aten::_local_scalar_dense" not in names
    assert any("Optimizer.step" in n for n in names)  # the step did run under the profiler


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
def test_cuda_scaled_equals_pre_unscaled(backend, algo):
    """The CUDA kernels' scale and skip flag (each block returns on the flag)."""
    make = _k2_factory(algo, backend)
    got, opt, scales = _scaled_run(make, device="cuda")
    want, ref_opt = _unscaled_run(make, scales, device="cuda")
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    s_got, s_want = _state_tensors(opt), _state_tensors(ref_opt)
    for key in s_want:
        assert torch.equal(s_got[key], s_want[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_with_parameters_without_gradient(backend):
    """Members without a gradient have their rings rotated on a taken step; a
    skipped step leaves them where they are (decided on the device)."""
    need_backend(backend)
    m = _model()
    opt = Anderson(m.parameters(), lr=0.05, history=3, backend=backend)
    x, y = _data()
    scale = torch.tensor(2.0 ** 5)
    for t in range(4):
        opt.zero_grad()
        (torch.nn.functional.mse_loss(m(x), y) * scale).backward()
        if t >= 2:
            m[2].bias.grad = None  # from here on one member has no gradient
        if t == 3:
            params = [p.detach().clone() for p in m.parameters()]
            state = _state_tensors(opt)
            m[0].bias.grad[0] = float("inf")
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(t == 3)))
    for a, b in zip(params, m.parameters()):
        assert torch.equal(a, b)
    after = _state_tensors(opt)
    for key in state:
        assert torch.equal(after[key], state[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_k2_scaled_equals_pre_unscaled_bf16(backend):
    """16-bit parameters, gradients and rings: the unscaling happens in float32
    registers; a power-of-two scale keeps it exact."""
    need_backend(backend)

    def make(ps):
        return Anderson(ps, lr=0.05, history=2, weight_decay=0.01, backend=backend)

    got, opt, scales = _scaled_run(make, dtype=torch.bfloat16)
    want, ref_opt = _unscaled_run(make, scales, dtype=torch.bfloat16)
    for a, b in zip(want.parameters(), got.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    s_got, s_want = _state_tensors(opt), _state_tensors(ref_opt)
    for key in s_want:
        assert torch.equal(s_got[key], s_want[key]), key
