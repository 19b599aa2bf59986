"""Issue 17 on several local ranks (gloo on the CPU, spawned, bounded time):
Anderson compiled from its first step on DTensor shards (item 3), the
process group taken or checked when none is given (item 2), sharded
resumes on the same layout (items 4 and 5), copies of optimizers with process
groups and of DTensor state (item 7). Every case is
compared with an eager, a single-process or an uninterrupted run.

One process group per rank count runs all cases (spawning is the expensive
part); each test checks its case's numbers."""

from __future__ import annotations

import _dist_cases as C
import _dist_stack_cases as S
import pytest
import torch
import torch.distributed as dist
from _dist import rank_results, run_ranks
from optimizers import ALGORITHMS, backend_params, unavailable

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

STEPS = 5
MODEL_STEPS = 5
DCP_SAVED_AT, DCP_TOTAL = 3, 11
# The backends whose sharded resume is checked (the C++ one where built;
# Triton's interpreter is slow on shards here, its kernels are checked elsewhere).
RESUME_BACKENDS = ("torch", "native")
# (label, save_at, skips): saved with the same parameters having gradients
# before and after, so that the uninterrupted run keeps its partial Grams
# where the resumed one must rebuild them; "skips" changes the set at steps
# 1 and 2 (rebuilt there in both runs) before the save at 4.
RESUMES = [("plain", 3, {}), ("skips", 4, {1: (1,), 2: (1, 3)})]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("dcp-same-layout")
    cases = [(f"compiled-{c}", S.anderson_dtensor_compiled, (c, STEPS)) for c in ("aot_eager", "inductor")]
    for name in ALGORITHMS:
        cases += [(f"zero-auto-{name}", S.zero_auto, (name, MODEL_STEPS)),
                  (f"fsdp1-auto-{name}", S.fsdp1_auto, (name, MODEL_STEPS)),
                  (f"fsdp1-orig-auto-{name}", S.fsdp1_auto, (name, MODEL_STEPS, True))]
    cases += [("ddp-collectives", S.ddp_collectives, (MODEL_STEPS,)),
              ("partitioned-anderson", S.partitioned_without_group, ("anderson",)),
              ("partitioned-anderson-local", S.partitioned_without_group, ("anderson", "local")),
              ("partitioned-interpolatron", S.partitioned_without_group, ("interpolatron",)),
              ("partitioned-diagnostics", S.partitioned_without_group, ("interpolatron", None, True)),
              ("copies", S.copies, (STEPS,))]
    for name in ALGORITHMS:
        path = str(ckpt / name)
        cases += [(f"dcp-save-{name}", C.dcp_save, (name, DCP_SAVED_AT, DCP_TOTAL, path)),
                  (f"dcp-load-{name}", S.dcp_load_model_first, (name, DCP_SAVED_AT, DCP_TOTAL, path))]
    for backend in [b for b in RESUME_BACKENDS if unavailable(b) is None]:
        for dtype in (torch.float32, torch.float64):
            for label, save_at, skips in RESUMES:
                cases.append((f"resume-{backend}-{dtype}-{label}", S.sharded_resume,
                              (backend, dtype, 7, save_at, skips)))
    return run_ranks(C.suite, 2, cases, timeout=500)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_anderson_on_dtensor_shards_compiles_from_its_first_step(world2, compiler):
    """``torch.compile(opt.step, fullgraph=True)`` on a fresh Anderson over
    DTensor shards (2 ranks, uneven, one replicated parameter; the Gram
    all-reduce inside the graph), no eager step first: every step's
    coefficients and the final parameters equal the eager run's bitwise."""
    for res in rank_results(world2, f"compiled-{compiler}"):
        eager, compiled = res["eager"], res["compiled"]
        diff = (compiled["coefs"] - eager["coefs"]).abs().max()
        assert torch.equal(compiled["coefs"], eager["coefs"]), diff
        assert all(torch.equal(a, b) for a, b in zip(compiled["params"], eager["params"]))
        assert not torch.equal(eager["coefs"][-1], eager["coefs"][0])


# -- item 2: no silent per-rank Gram ----------------------------------------------------

@pytest.fixture(scope="module")
def plain_models():
    return {name: C.run_model_plain(name, MODEL_STEPS) for name in ALGORITHMS}


def _same_as_single_process(results, ref, tol=1e-13):
    for res in results:
        dp = max((a - b).abs().max().item() for a, b in zip(res["params"], ref["params"]))
        assert dp <= tol, dp
        if ref["coefs"] is not None:
            dc = (res["coefs"] - ref["coefs"]).abs().max().item()
            assert dc <= tol, dc


@pytest.mark.parametrize("name", ALGORITHMS)
def test_zero_redundancy_optimizer_without_process_group_takes_zeros(world2, plain_models, name):
    """``optimizer_class=Anderson`` as is: the optimizer finds the group of the
    ZeroRedundancyOptimizer that builds it, and the run is the single-process
    one (before: coefficients 2.6 apart between ranks, no signal)."""
    results = rank_results(world2, f"zero-auto-{name}")
    assert min(res["owned"] for res in results) >= 1  # each rank holds a part of the model
    _same_as_single_process(results, plain_models[name])


@pytest.mark.parametrize("orig", ["flat", "orig"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_fsdp1_without_process_group_takes_fsdps(world2, plain_models, name, orig):
    """FSDP1's flat parameters (and their ``use_orig_params=True`` views)
    without process_group: the optimizer finds the group FSDP1 shards them
    over; the single-process run (before: coefficients 1.2 apart)."""
    _same_as_single_process(rank_results(world2, f"fsdp1-{'orig-' if orig == 'orig' else ''}auto-{name}"),
                            plain_models[name])


def test_ddp_without_process_group_is_checked_once(world2, plain_models):
    """DDP replicas, no process_group: Anderson checks once, at its first step,
    that the ranks hold the same parameters (one all-reduce), then issues no
    collective; Interpolatron (no whole-model dot product) never communicates.
    Both equal the single-process run."""
    for res in rank_results(world2, "ddp-collectives"):
        assert res["interpolatron"]["counts"] == [0] * MODEL_STEPS
        assert res["anderson"]["counts"] == [1] + [0] * (MODEL_STEPS - 1)
        for name in ALGORITHMS:
            _same_as_single_process([res[name]], plain_models[name])


@pytest.mark.parametrize("case", ["partitioned-anderson", "partitioned-diagnostics"])
def test_slices_without_process_group_raise_and_change_nothing(world2, case):
    """Plain tensors partitioned over the ranks by hand, no process_group: the
    first step raises on every rank, naming the fix, and writes nothing."""
    for res in rank_results(world2, case):
        assert res["error_text"] is not None
        assert "process_group=<the group whose ranks hold the other slices>" in res["error_text"]
        assert "'local'" in res["error_text"]
        assert res["unchanged"]


def test_partitioned_interpolatron_needs_no_group(world2):
    """Interpolatron's update is elementwise: without diagnostics a hand
    partition needs no group, no check runs, and each rank's parameters are
    the single-process ones bitwise."""
    import interpolatron

    x0, grads = C.global_data(torch.float32, 2)
    params = [x.clone().requires_grad_() for x in x0]
    opt = interpolatron.Interpolatron(params, lr=0.1, backend="torch")
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    seen = {}
    for res in rank_results(world2, "partitioned-interpolatron"):
        assert res["error_text"] is None
        seen.update(res["params"])
    assert sorted(seen) == list(range(len(C.SHAPES)))
    assert all(torch.equal(seen[i], params[i].detach()) for i in seen)


def test_local_says_each_rank_is_its_own_model(world2):
    """``process_group='local'``: no check, no sum (independent models per rank)."""
    for res in rank_results(world2, "partitioned-anderson-local"):
        assert res["error_text"] is None


# -- item 7: copies ---------------------------------------------------------------------

def test_deepcopy_and_pickle_with_a_process_group(world2):
    """``copy.deepcopy`` of an Anderson with ``process_group=`` shares the group
    and continues bitwise like the original; ``pickle`` raises a TypeError that
    names the way out (before: both failed, "cannot pickle ProcessGroup")."""
    for res in rank_results(world2, "copies"):
        assert res["same_group"]
        assert res["group_copy_bitwise"] and res["group_copy_moved"]
        assert res["pickle"] is not None and "state_dict()" in res["pickle"]
        assert "copy.deepcopy(optimizer) works" in res["pickle"]


def test_deepcopy_of_dtensor_state(world2):
    """``copy.deepcopy(opt.state_dict())`` on DTensor parameters (histories are
    views into the flat rings; before: "invalid python storage"): equal
    values, its own memory; ``copy.deepcopy(opt)`` continues bitwise."""
    for res in rank_results(world2, "copies"):
        assert res["sd_copy_equal"] and res["sd_copy_independent"]
        assert res["dtensor_copy_bitwise"]


def test_pickle_of_sharded_anderson(world2):
    """``pickle`` of an Anderson over DTensor shards after a step: its partial
    Grams (kept per reduction key, a tuple of the mesh's process groups) go
    by layout, as in a checkpoint, so the unpickled copy continues the
    original bitwise (before: the TypeError about process groups)."""
    for res in rank_results(world2, "copies"):
        assert res["dtensor_pickle"] is None, res["dtensor_pickle"]
        assert res["dtensor_pickle_bitwise"]


# -- item 5: bitwise resume on the same layout -----------------------------------------

@pytest.mark.parametrize("label", [label for label, *_ in RESUMES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backend_params(RESUME_BACKENDS))
def test_sharded_anderson_resumes_bitwise_on_the_same_layout(world2, backend, dtype, label):
    """Anderson on DTensor shards (2 ranks), saved with ``state_dict()`` and
    loaded into a new optimizer on the same layout without the carried
    partial Grams (as from a distributed checkpoint): every later coefficient
    and the final parameters equal the uninterrupted run's bitwise. Each rank
    rebuilds its partial Gram from the rings with the kernels' own dot
    products, the newer gradient in the role it had when the running sums
    took it, the buckets summed in the same order (before: 1e-17 to 1e-15
    off, from a chunked matrix product in another order). 16-bit rings:
    tests/integration/test_sharded_resume.py."""
    for res in rank_results(world2, f"resume-{backend}-{dtype}-{label}"):
        straight, resumed = res["straight"], res["resumed"]
        diff = (straight["coefs"] - resumed["coefs"]).abs().max().item()
        assert torch.equal(straight["coefs"], resumed["coefs"]), diff
        assert all(torch.equal(a, b) for a, b in zip(straight["params"], resumed["params"]))


# -- item 4: a DCP resume on the same layout is bitwise ------------------------------------

@pytest.mark.parametrize("name", ALGORITHMS)
def test_dcp_resume_on_the_same_layout_is_bitwise(world2, name):
    """FSDP2 on 2 ranks, saved with dcp.save after DCP_SAVED_AT steps and
    loaded on 2 ranks (the model first, then the optimizer, whose template
    torch initialises with an lr-0 step on zero gradients): the initialising
    step leaves the loaded model bitwise as it was, and training continues the
    uninterrupted run bitwise (parameters and Anderson's coefficients)."""
    straight = rank_results(world2, f"dcp-save-{name}")
    for res, ref in zip(rank_results(world2, f"dcp-load-{name}"), straight):
        assert res["moved"] == 0.0
        assert all(torch.equal(a, b) for a, b in zip(res["params"], ref["params"]))
        if ref["coefs"] is not None:
            assert torch.equal(res["coefs"], ref["coefs"][DCP_SAVED_AT:])
