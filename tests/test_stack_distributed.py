"""Issue 17 on several local ranks (gloo on the CPU, spawned, bounded time):
Anderson compiled from its first step on DTensor shards (item 3). Every case
is compared with an eager, a single-process or an uninterrupted run.

One process group per rank count runs all cases (spawning is the expensive
part); each test checks its case's numbers."""

from __future__ import annotations

import _dist_cases as C
import _dist_stack_cases as S
import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

STEPS = 5


@pytest.fixture(scope="module")
def world2():
    cases = [(f"compiled-{c}", S.anderson_dtensor_compiled, (c, STEPS)) for c in ("aot_eager", "inductor")]
    return run_ranks(C.suite, 2, cases, timeout=400)


def _case(results: list, name: str) -> list:
    for rank, res in enumerate(results):
        if "error" in res[name]:
            pytest.fail(f"rank {rank} of case {name!r} raised:\n{res[name]['error']}")
    return [res[name] for res in results]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_anderson_on_dtensor_shards_compiles_from_its_first_step(world2, compiler):
    """``torch.compile(opt.step, fullgraph=True)`` on a fresh Anderson over
    DTensor shards (2 ranks, uneven, one replicated parameter; the Gram
    all-reduce inside the graph), no eager step first: every step's
    coefficients and the final parameters equal the eager run's bitwise."""
    for res in _case(world2, f"compiled-{compiler}"):
        eager, compiled = res["eager"], res["compiled"]
        diff = (compiled["coefs"] - eager["coefs"]).abs().max()
        assert torch.equal(compiled["coefs"], eager["coefs"]), diff
        assert all(torch.equal(a, b) for a, b in zip(compiled["params"], eager["params"]))
        assert not torch.equal(eager["coefs"][-1], eager["coefs"][0])
