"""torch.compile: compiled steps equal eager ones, with no recompiles and no graph breaks.

Tolerance: bitwise wherever the compiler backend runs the same kernels in the
same order as eager (Dynamo alone, i.e. a counting backend, and "aot_eager":
the seam ops are opaque custom ops that run the very same backend code, and
the model's forward/backward are the same ATen ops). Inductor generates its
own kernels for the model's forward/backward and the small solves, so there
the trajectory is compared with a tolerance of a few float32 ulps per step.
"""

from __future__ import annotations

import pytest
import torch
from optimizers import ALGORITHMS, backend_params, make
from torch._dynamo.testing import CompileCounter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 100
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.7),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=STEPS + 1,
                                                                 cycle_momentum=False),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=2, factor=0.5),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    old = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.config.trace_autograd_ops = True  # backward() inside the compiled step
    yield
    torch._dynamo.config.trace_autograd_ops = old
    torch._dynamo.reset()


def _setup(name: str, backend: str, sched: str | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    opt = make(name, model.parameters(), backend, weight_decay=1e-3)
    return model, opt, (SCHEDULERS[sched](opt) if sched else None)


DATA = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)),
         torch.randn(16, 1, generator=torch.Generator().manual_seed(1000 + i))) for i in range(8)]


def _train_step(model, opt, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _run(name, backend, sched_name, step_fn, steps=STEPS, eager_first=True):
    model, opt, sched = _setup(name, backend, sched_name)
    losses, lrs = [], []
    for t in range(steps):
        x, y = DATA[t % len(DATA)]
        opt.zero_grad()
        fn = _train_step if (eager_first and t == 0) else step_fn
        loss = fn(model, opt, x, y)
        losses.append(loss)
        lrs.append(float(opt.param_groups[0]["lr"]))
        if sched is None:
            continue
        if sched_name == "ReduceLROnPlateau":
            sched.step(1.0 + 0.01 * (t // 5))  # worsens every 5 steps: the lr drops repeatedly
        else:
            sched.step()
    return model, opt, torch.stack(losses), lrs


def _assert_same(model_a, model_b):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b), (a - b).abs().max()


# Every scheduler on the torch backend; the C++ backend under one (its ops take the same path).
SWEEP = ([(n, s, "torch") for n in ALGORITHMS for s in SCHEDULERS]
         + [pytest.param(n, "OneCycleLR", b.values[0], marks=b.marks, id=f"{n}-OneCycleLR-{b.id}")
            for n in ALGORITHMS for b in backend_params() if b.id != "torch"])


@pytest.mark.parametrize("name,sched,backend", SWEEP)
def test_whole_train_step_compiles_once_and_matches_eager(name, sched, backend):
    counter = CompileCounter()
    compiled = torch.compile(_train_step, backend=counter, fullgraph=True)
    ref_model, _, ref_losses, ref_lrs = _run(name, backend, sched, _train_step)
    model, opt, losses, lrs = _run(name, backend, sched, compiled)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles over {STEPS - 1} compiled steps"
    assert len(set(lrs)) > 3, "the scheduler did not move the learning rate"
    assert lrs == ref_lrs
    assert torch.equal(losses, ref_losses)
    _assert_same(model, ref_model)
