"""16-bit parameters with float32 master weights (issue 10 item 4, ALGORITHMS.md
section 7): ``master_weights=True`` keeps a float32 master of every bf16/fp16
parameter and float32 rings; the 16-bit parameter is the master rounded to
nearest. Checked against independent runs:

* on every backend, the master equals BITWISE a plain float32 optimizer run
  on float32 parameters fed the same (upcast) gradients, and the 16-bit
  parameter is that run rounded;
* a bf16 model at lr 1e-3 tracks the float32 model: its distance to the
  float32 trajectory is under a quarter of plain bf16's;
* ``state_dict`` carries the master: a resumed run continues bitwise;
* GradScaler's skipped step leaves master and parameter unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _sixteen_bit import assert_skipped_step_writes_nothing, make_data, make_model, make_optimizer
from optimizers import BACKENDS, need_backend

from interpolatron.optim import Interpolatron


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_equals_float32_run_on_the_same_gradients(backend, algo, dtype):
    need_backend(backend, dtype)
    m = make_model(dtype)
    shadow = [p.detach().float().clone().requires_grad_() for p in m.parameters()]
    opt = make_optimizer(algo, m.parameters(), backend, master_weights=True)
    ref = make_optimizer(algo, shadow, backend)
    x, y = make_data(dtype)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x).float(), y.float()).backward()
        for s, p in zip(shadow, m.parameters()):
            s.grad = p.grad.float()
        opt.step()
        ref.step()
        for s, p in zip(shadow, m.parameters()):
            assert p.dtype == dtype
            assert torch.equal(opt.state[p]["master"], s.detach())
            assert torch.equal(p.detach(), s.detach().to(dtype))  # the rounded master
            assert opt.state[p]["x_hist"].dtype == torch.float32
            assert torch.equal(opt.state[p]["x_hist"], ref.state[s]["x_hist"])
            assert torch.equal(opt.state[p]["g_hist"], ref.state[s]["g_hist"])


def _train(dtype: torch.dtype, steps: int, backend: str = "native", **kw) -> list[torch.Tensor]:
    m = make_model(dtype)
    opt = Interpolatron(m.parameters(), lr=1e-3, alphas=(0.1, 0.9), backend=backend, **kw)
    x, y = make_data(dtype)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x).float(), y.float()).backward()
        opt.step()
    return [p.detach().float() for p in m.parameters()]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(((u - v) ** 2).sum() for u, v in zip(a, b)).sqrt())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_master_tracks_float32_at_small_lr(backend):
    need_backend(backend, torch.bfloat16)
    steps = 60 if backend == "triton" else 200
    start = [p.detach().float() for p in make_model(torch.float32).parameters()]
    fp32 = _train(torch.float32, steps, backend)
    plain = _train(torch.bfloat16, steps, backend)
    master = _train(torch.bfloat16, steps, backend, master_weights=True)
    moved = _distance(fp32, start)
    gap_plain, gap_master = _distance(plain, fp32), _distance(master, fp32)
    assert moved > 0.05  # the float32 run does move
    # Plain bf16 loses most of its small updates to rounding; the master keeps them.
    assert gap_master < 0.25 * gap_plain, (moved, gap_plain, gap_master)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["interpolatron", "anderson"])
def test_state_dict_carries_the_master(backend, algo):
    need_backend(backend, torch.bfloat16)
    x, y = make_data(torch.bfloat16)

    def run(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x).float(), y.float()).backward()
            opt.step()

    m = make_model(torch.bfloat16)
    opt = make_optimizer(algo, m.parameters(), backend, master_weights=True)
    run(m, opt, 4)
    sd = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    assert all(sd["state"][i]["master"].dtype == torch.float32 for i in sd["state"])
    run(m, opt, 3)
    opt2 = make_optimizer(algo, m2.parameters(), backend, master_weights=True)
    opt2.load_state_dict(sd)
    run(m2, opt2, 3)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], opt2.state[q]["master"])
    plain = make_optimizer(algo, copy.deepcopy(m2).parameters(), backend)
    with pytest.raises(ValueError, match="master"):
        plain.load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_keeps_master(backend):
    need_backend(backend, torch.float16)
    assert_skipped_step_writes_nothing("interpolatron", backend, master_weights=True)


def test_master_weights_leaves_wide_params_alone():
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(p.detach().clone())
    a = Interpolatron([p], lr=0.1, master_weights=True, backend="torch")
    b = Interpolatron([q], lr=0.1, backend="torch")
    for _ in range(3):
        p.grad = torch.sin(p.detach())
        q.grad = torch.sin(q.detach())
        a.step()
        b.step()
    assert torch.equal(p, q) and "master" not in a.state[p]
    with pytest.raises(ValueError, match="master_weights"):
        Interpolatron([p], master_weights=1)


def test_master_weights_refused_inside_torch_compile():
    """The p.data swap cannot be compiled: a clear error, not a silent other trajectory."""
    m = torch.nn.Linear(4, 2).to(torch.bfloat16)
    opt = Interpolatron(m.parameters(), lr=1e-3, master_weights=True, backend="torch")
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    m(x).float().sum().backward()
    opt.step()
    m(x).float().sum().backward()
    with pytest.raises(Exception, match="master_weights=True is not supported inside torch.compile"):
        torch.compile(opt.step, fullgraph=True)()
