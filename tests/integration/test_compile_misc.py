"""torch.compile beyond the scheduler sweep of test_compile.py: aot_eager and
inductor, opt.step compiled from the first step, the lr-0 regression, explain,
and the unsupported partial step. Tolerances as stated in test_compile.py."""

from __future__ import annotations

import pytest
import torch
from optimizers import ALGORITHMS
from test_compile import DATA, _assert_same, _fresh_dynamo, _run, _setup, _train_step  # noqa: F401
from torch._dynamo.testing import CompileCounter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_aot_eager_is_bitwise(name):
    compiled = torch.compile(_train_step, backend="aot_eager", fullgraph=True)
    ref_model, *_ = _run(name, "torch", "CosineAnnealingLR", _train_step, steps=20)
    model, *_ = _run(name, "torch", "CosineAnnealingLR", compiled, steps=20)
    _assert_same(model, ref_model)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_compiled_opt_step_from_the_first_step(name):
    """torch.compile(opt.step, fullgraph=True) from step 1 (the first call sets the
    state up eagerly while tracing): the lr-0 bug is gone (the compiled steps move
    the parameters by lr * update, as eager does), no recompiles after the first."""
    counter = CompileCounter()
    runs = []
    for compiled in (False, True):
        model, opt, sched = _setup(name, "torch", "StepLR")
        step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
        for t in range(30):
            x, y = DATA[t % len(DATA)]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
            sched.step()
            if compiled and t == 0:
                after_first = counter.frame_count
        runs.append(model)
    _assert_same(runs[0], runs[1])
    init, *_ = _setup(name, "torch", None)
    moved = max((a - b).abs().max() for a, b in zip(runs[1].parameters(), init.parameters()))
    assert moved > 1e-3
    # The first call compiles (its setup builds the state while tracing); nothing after it.
    assert counter.frame_count == after_first


@pytest.mark.parametrize("BACKEND", ["eager", "aot_eager"])
def test_eager_steps_after_compiled_ones_keep_the_lr(BACKEND):
    """The issue's report: after compiled steps, eager steps trained with lr 0."""
    model, opt, _ = _setup("interpolatron", "torch", None)
    ref, ref_opt, _ = _setup("interpolatron", "torch", None)
    step = torch.compile(opt.step, backend=BACKEND, fullgraph=True)
    for t in range(6):
        x, y = DATA[t]
        for m, o, fn in ((model, opt, step if t < 3 else opt.step), (ref, ref_opt, ref_opt.step)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            fn()
    _assert_same(model, ref)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_explain_shows_no_graph_breaks(name):
    model, opt, _ = _setup(name, "torch", None)
    x, y = DATA[0]
    _train_step(model, opt, x, y)
    opt.zero_grad()
    explained = torch._dynamo.explain(_train_step)(model, opt, x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_inductor_matches_eager_to_rounding():
    compiled = torch.compile(_train_step, backend="inductor", fullgraph=True)
    ref_model, _, ref_losses, _ = _run("anderson", "torch", "StepLR", _train_step, steps=12)
    model, _, losses, _ = _run("anderson", "torch", "StepLR", compiled, steps=12)
    # Inductor's fused forward/backward round differently from eager's: a few
    # float32 ulps per step, which the trajectory carries.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_partial_step_under_compile_raises_clearly():
    model, opt, _ = _setup("interpolatron", "torch", None)
    x, y = DATA[0]
    _train_step(model, opt, x, y)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].bias.grad = None
    with pytest.raises(Exception, match="every parameter that has a history"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
