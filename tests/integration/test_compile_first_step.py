"""``torch.compile(opt.step)`` on a fresh Anderson, from the very first step
(issue 17 item 3): no eager warm-up, with and without ``fullgraph`` and a
scheduler, with the AOT backends; every step's parameters and coefficients
equal the eager run's bitwise (the seam ops are opaque custom ops running the
same kernels; the small float64 solve compiles to the same results here).
Before, Dynamo's analysis restarted and diverged (SpeculationLogDivergence)
because the reduction keys were cached while it traced. DTensor shards:
tests/integration/test_stack_distributed.py."""

from __future__ import annotations

import pytest
import torch
from optimizers import available_backends, make

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(compiler: str | None, fullgraph: bool, sched: bool, backend: str, steps: int = 6,
         config: str = "anderson"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    opt = make(config, model.parameters(), backend, lr=0.05, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if sched else None
    step = torch.compile(opt.step, backend=compiler, fullgraph=fullgraph) if compiler else opt.step
    params, coefs = [], []
    for t in range(steps):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        params.append([p.detach().clone() for p in model.parameters()])
        coefs.append(opt.coefficients.detach().clone())
        if scheduler is not None:
            scheduler.step()
    return params, coefs


CASES = ([("aot_eager", True, sched, "torch") for sched in (False, True)]
         + [("aot_eager", False, True, "torch"), ("inductor", True, True, "torch")]
         + [("inductor", True, False, b) for b in BACKENDS if b != "torch"])


@pytest.mark.parametrize("compiler,fullgraph,sched,backend", CASES)
def test_anderson_compiles_from_its_first_step_and_equals_eager(compiler, fullgraph, sched, backend):
    ref_params, ref_coefs = _run(None, False, sched, backend)
    params, coefs = _run(compiler, fullgraph, sched, backend)
    for t, (a, b) in enumerate(zip(params, ref_params)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {t}"
    for t, (a, b) in enumerate(zip(coefs, ref_coefs)):
        assert torch.equal(a, b), f"step {t}: {a} != {b}"
    # the run moved (a compiled step that did nothing would not be caught otherwise)
    assert not torch.equal(coefs[-1], coefs[0])


# One-pass Anderson (its solve reads the kept Gram, its rows come from the update pass).
ONE_PASS_CASES = [("aot_eager", True, True, "torch")] + [("inductor", True, False, b) for b in BACKENDS]


@pytest.mark.parametrize("compiler,fullgraph,sched,backend", ONE_PASS_CASES)
def test_one_pass_anderson_compiles_from_its_first_step_and_equals_eager(compiler, fullgraph, sched, backend):
    ref_params, ref_coefs = _run(None, False, sched, backend, config="anderson-k2-onepass")
    params, coefs = _run(compiler, fullgraph, sched, backend, config="anderson-k2-onepass")
    for t, (a, b) in enumerate(zip(params, ref_params)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {t}"
    for t, (a, b) in enumerate(zip(coefs, ref_coefs)):
        assert torch.equal(a, b), f"step {t}: {a} != {b}"
    assert not torch.equal(coefs[-1], coefs[0])
