"""Exact Anderson under GradScaler when a skipped step changes the set of
parameters with gradients (a parameter gets its gradient back, or loses it).

The skipped step must leave the kept Gram (the last taken step's), yet the
retry, which sees no change of the set any more, must shift its new row into
the older ages of its own set. Before the shift base was kept apart from the
kept Gram, the retry built on the Gram of the previous set: coefficients
0.82 off at the retry and up to 22 later (k = 3, torch and C++ backends),
silently. The run must equal, bitwise, the run that never saw the inf steps."""

from __future__ import annotations

import pytest
import torch
from test_one_pass import BACKENDS, INF_STEPS, _amp_run, _need


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3])
def test_exact_anderson_skipped_step_with_a_set_change(backend, k):
    _need(backend)
    scaled, a = _amp_run(backend, torch.float32, k, amp=True, one_pass=False)
    plain, b = _amp_run(backend, torch.float32, k, amp=False, one_pass=False)
    assert len(a) == len(b) == 12 - len(INF_STEPS)
    for t, ((ca, pa), (cb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(ca, cb), (t, ca, cb)
        assert all(torch.equal(x, y) for x, y in zip(pa, pb)), t
    assert scaled.coefficients[1:].abs().max() > 1e-3
