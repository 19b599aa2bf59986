"""ZeroRedundancyOptimizer.load_state_dict into a wrapped optimizer that has
already stepped. ZeRO assigns ``optim.state[p]`` directly instead of calling
the optimizer's load_state_dict; the old buckets used to keep stepping their
rings while ``state`` showed the loaded ones (a silently wrong resume: 6e-3
(Interpolatron) and 2e-2 (Anderson) off the fresh-optimizer resume after 3
steps, on both ranks). The single-process case is
tests/optim/test_state_assignment.py."""

from __future__ import annotations

import _zero_resume as Z
import pytest
import torch.distributed as dist
from _dist import run_ranks
from optimizers import ALGORITHMS

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def world2():
    return run_ranks(Z.suite, 2, ALGORITHMS, timeout=240)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_zero_load_into_stepped_optimizer_equals_fresh_load(world2, name):
    """Bitwise on every rank: both resumes rebuild the buckets from the same
    loaded state (the partial Grams from the rings: ZeRO's consolidated
    state_dict does not carry them)."""
    for rank, res in enumerate(world2):
        diff = max((a - b).abs().max().item() for a, b in zip(res[name]["same"], res[name]["fresh"]))
        assert diff == 0.0, f"rank {rank}: the resume into the stepped optimizer is {diff:.3g} off"
