"""bf16 master weights under DDP and FSDP1 (issue 17 item 1), 2 gloo ranks, each
rank on its own data, compared with one process stepping on the exact mean of
the ranks' gradients (see tests/_support/_master_dist.py).

The step never reassigns ``p.data``: reassigning it to the float32 master (the
old swap) made autograd drop the parameter's AccumulateGrad node, where DDP
hooks its all-reduce and FSDP1 its post-backward reduce-scatter; from the
second step on each rank then trained on its own gradients, with no error."""

from __future__ import annotations

import _master_dist as M
import pytest
import torch
import torch.distributed as dist
from _dist import max_abs_diff, rank_results, run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 6
NAMES = ("interpolatron-k3", "anderson-k3")


@pytest.fixture(scope="module")
def world2():
    cases = []
    for name in NAMES:
        cases += [(f"ddp-{name}", M.ddp, (name, STEPS)), (f"fsdp1-{name}", M.fsdp1, (name, STEPS)),
                  (f"fsdp2-{name}", M.fsdp2, (name, STEPS))]
    return run_ranks(M.suite, 2, cases, timeout=240)


@pytest.fixture(scope="module")
def plain():
    return {name: M.run_plain(name, STEPS, 2) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_ddp_bf16_master_weights_equal_the_averaged_single_process_run(world2, plain, name):
    """Same layout as the single process (whole parameters): bitwise equal,
    parameters (bf16) and Anderson's coefficients, on every rank."""
    ref = plain[name]
    for res in rank_results(world2, f"ddp-{name}"):
        assert all(p.dtype == torch.bfloat16 for p in res["params"])
        assert max_abs_diff(res["params"], ref["params"]) == 0.0
        for p, q in zip(res["params"], ref["params"]):
            assert torch.equal(p, q)
        if ref["coefs"] is not None:
            assert torch.equal(res["coefs"], ref["coefs"])


@pytest.mark.parametrize("name", NAMES)
def test_fsdp1_bf16_master_weights_equal_the_averaged_single_process_run(world2, plain, name):
    """Flat parameter shards: Anderson's Gram is summed over the ranks
    (``process_group``), so its coefficients agree to float64 rounding and the
    parameters to the rounding that can move (one float32 ulp of a master can
    flip its bf16 rounding); Interpolatron's elementwise step is bitwise."""
    ref = plain[name]
    results = rank_results(world2, f"fsdp1-{name}")
    for res in results:
        assert all(p.dtype == torch.bfloat16 for p in res["params"])
        if ref["coefs"] is None:
            for p, q in zip(res["params"], ref["params"]):
                assert torch.equal(p, q)
        else:
            assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-12
            for p, q in zip(res["params"], ref["params"]):
                ulp = torch.finfo(torch.bfloat16).eps * q.double().abs().clamp_min(1e-2)
                assert bool(((p.double() - q.double()).abs() <= ulp).all()), (p, q)
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_bf16_master_weights_on_dtensor_shards(world2, plain, name):
    """FSDP2 (DTensor shards, uneven): the masters are DTensors sharded like
    their parameters; Interpolatron's parameters and masters are bitwise the
    single process's, Anderson's coefficients agree to float64 rounding (the
    Gram is summed over the shards) and its masters to the float32 rounding
    that a coefficient's last bit can move."""
    ref = plain[name]
    for res in rank_results(world2, f"fsdp2-{name}"):
        assert res["master_type"] == "DTensor"
        if ref["coefs"] is None:
            for got, want in zip(res["params"] + res["masters"], ref["params"] + ref["masters"]):
                assert torch.equal(got, want)
        else:
            assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-12
            for got, want in zip(res["masters"], ref["masters"]):
                assert (got - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())
