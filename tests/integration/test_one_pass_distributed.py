"""One-pass Anderson on sharded parameters (gloo on the CPU, 2 and 3 ranks):
the cases of tests/integration/test_distributed.py (DTensor layouts with uneven shards and
a replicated parameter, parameters without gradients, GradScaler's inf steps,
a compiled step, ZeRO's layout where one rank's set changes, FSDP2, DDP,
ZeroRedundancyOptimizer, a DCP checkpoint saved on 2 ranks and loaded on 3,
the collectives per step) with ``Anderson(one_pass=True)``, each compared
with the single-process one-pass run fed the same global gradients: the
coefficients to float64 rounding, the parameters to the last float32 bits."""

from __future__ import annotations

import os

import _dist_cases as C
import _dist_one_pass as O
import pytest
import torch
import torch.distributed as dist
from _dist import max_abs_diff, rank_results, run_ranks

from interpolatron.backends import availability

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 6
MODEL_STEPS = 5
SAVED_AT, TOTAL = 3, 7
CPP = "native" if availability("cpu", torch.float32)["native"] is None else None
EPS32 = torch.finfo(torch.float32).eps
AMP = (3, 0.01, "cpu", "1d", None, True)


def _layout_cases():
    cases = [("layout-f32", C.anderson_dtensor, (torch.float32, "torch", STEPS)),
             ("layout-f64", C.anderson_dtensor, (torch.float64, "torch", STEPS)),
             ("layout-skips", C.anderson_dtensor,
              (torch.float32, "torch", STEPS, 3, 0.01, "cpu", "1d", C.SKIPS)),
             ("amp-torch", C.anderson_dtensor, (torch.float32, "torch", STEPS) + AMP)]
    if CPP:
        cases += [("layout-cpp-f32", C.anderson_dtensor, (torch.float32, CPP, STEPS)),
                  ("amp-cpp", C.anderson_dtensor, (torch.float32, CPP, STEPS) + AMP)]
    return cases


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp-one-pass")


@pytest.fixture(scope="module")
def world2(checkpoints):
    cases = _layout_cases() + [
        ("compiled", C.anderson_dtensor,
         (torch.float32, "torch", STEPS, 3, 0.01, "cpu", "1d", None, False, True)),
        ("partitioned-skips", C.anderson_partitioned, (STEPS, C.SKIPS)),
        ("fsdp2", C.fsdp2, ("anderson", MODEL_STEPS)),
        ("ddp", C.ddp, ("anderson", MODEL_STEPS)),
        ("zero", C.zero, ("anderson", MODEL_STEPS)),
        ("dcp-save", C.dcp_save, ("anderson", SAVED_AT, TOTAL, os.path.join(checkpoints, "anderson"))),
        ("collectives", C.count_collectives, (3,)),
    ]
    return run_ranks(O.suite, 2, cases, timeout=240)


@pytest.fixture(scope="module")
def world3(checkpoints, world2):  # world2 writes the checkpoint world3 loads
    cases = _layout_cases() + [
        ("dcp-load", C.dcp_load, ("anderson", SAVED_AT, TOTAL, os.path.join(checkpoints, "anderson")))]
    return run_ranks(O.suite, 3, cases, timeout=240)


@pytest.fixture(scope="module")
def plain():
    refs = {"layout-f32": O.reference("run_anderson_plain", torch.float32, "torch", STEPS),
            "layout-f64": O.reference("run_anderson_plain", torch.float64, "torch", STEPS),
            "layout-skips": O.reference("run_anderson_plain", torch.float32, "torch", STEPS, skips=C.SKIPS),
            "amp-torch": O.reference("run_anderson_plain", torch.float32, "torch", STEPS, drop=C.INF_STEPS),
            "exact-f32": C.run_anderson_plain(torch.float32, "torch", STEPS)}
    if CPP:
        refs["layout-cpp-f32"] = O.reference("run_anderson_plain", torch.float32, CPP, STEPS)
        refs["amp-cpp"] = O.reference("run_anderson_plain", torch.float32, CPP, STEPS, drop=C.INF_STEPS)
    return refs


def _check(results: list, ref: dict, label: str, f64: bool = False) -> None:
    scale = max(p.abs().max().item() for p in ref["params"])
    for res in results:
        dc = (res["coefs"] - ref["coefs"]).abs().max().item()
        dp = max_abs_diff(res["params"], ref["params"])
        print(f"{label}: max |coef diff| {dc:.3g}, max |param diff| {dp:.3g}")
        assert dc <= 1e-14, dc
        assert dp <= (1e-15 if f64 else EPS32) * scale, dp


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["layout-f32", "layout-f64", "layout-skips", "amp-torch", "layout-cpp-f32",
                                  "amp-cpp"])
def test_sharded_equals_single_process(request, plain, world, case):
    """DTensor shards (uneven, a replicated parameter): float32 and float64,
    parameters without gradients on some steps, GradScaler's scale with two
    inf steps (the reference never saw them), the C++ kernels."""
    if case not in plain:
        pytest.skip("the C++ extension is not built")
    results = rank_results(request.getfixturevalue(f"world{world}"), case)
    _check(results, plain[case], f"{case} world={world}", f64=case == "layout-f64")


def test_the_cases_ran_one_pass(world2, plain):
    """The control: the exact single-process run is far from these."""
    ref = plain["exact-f32"]
    assert plain["layout-f32"]["coefs"][:2].equal(ref["coefs"][:2].new_tensor([[1, 0, 0]] * 2))
    for res in rank_results(world2, "layout-f32"):
        assert (res["coefs"] - ref["coefs"]).abs().max().item() > 1e-2


def test_compiled_step_on_shards(world2, plain):
    _check(rank_results(world2, "compiled"), plain["layout-f32"], "compiled, 2 ranks")


def test_membership_changes_on_one_rank_only(world2, plain):
    ref = plain["layout-skips"]
    params = {}
    for res in rank_results(world2, "partitioned-skips"):
        assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-14
        params.update(res["params"])
    assert sorted(params) == list(range(len(C.SHAPES)))
    assert max_abs_diff([params[i] for i in range(len(C.SHAPES))], ref["params"]) <= EPS32 * 4


@pytest.fixture(scope="module")
def plain_model():
    return O.reference("run_model_plain", "anderson", MODEL_STEPS)


@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp", "zero"])
def test_wrappers_match_single_process(world2, plain_model, wrapper):
    for res in rank_results(world2, wrapper):
        assert max_abs_diff(res["params"], plain_model["params"]) <= 1e-13
        assert (res["coefs"] - plain_model["coefs"]).abs().max().item() <= 1e-13


def test_one_all_reduce_per_step(world2):
    for counts in rank_results(world2, "collectives"):
        assert counts == {"interpolatron": 0, "anderson": 3, "probe": 1}


def test_dcp_save_on_2_ranks_load_on_3_continues_the_trajectory(world2, world3):
    ref = O.reference("run_model_plain", "anderson", TOTAL)
    for res in rank_results(world2, "dcp-save"):
        assert max_abs_diff(res["params"], ref["params"]) <= 1e-13
    for res in rank_results(world3, "dcp-load"):
        assert max_abs_diff(res["params"], ref["params"]) <= 1e-13
        assert (res["coefs"] - ref["coefs"][SAVED_AT:]).abs().max().item() <= 1e-13
