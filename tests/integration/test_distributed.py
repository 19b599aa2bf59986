"""Sharded training on several local ranks (gloo on the CPU), every result
compared with a single-process run fed the same global gradients: DTensor
layouts on 1-4 ranks (uneven shards, a replicated parameter), FSDP2, DDP,
ZeroRedundancyOptimizer, FSDP1 flat parameters, RNA on FSDP2, the collectives
a step issues, and distributed checkpoints resharded from 2 to 3 ranks.

One process group per rank count runs all of its cases (spawning ranks is
the expensive part); each test checks its case's numbers."""

from __future__ import annotations

import os

import _dist_cases as C
import pytest
import torch
import torch.distributed as dist
from _dist import max_abs_diff, rank_results, run_ranks
from optimizers import available_backends

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

STEPS = 6
MODEL_STEPS = 5
SAVED_AT, TOTAL = 3, 7
# The C++ extension's CPU kernels, when built.
CPP = "native" if "native" in available_backends() else None
EPS32 = torch.finfo(torch.float32).eps


def _layout_cases():
    cases = [("layout-f32", C.anderson_dtensor, (torch.float32, "torch", STEPS)),
             ("layout-f64", C.anderson_dtensor, (torch.float64, "torch", STEPS)),
             ("layout-skips", C.anderson_dtensor,
              (torch.float32, "torch", STEPS, 3, 0.01, "cpu", "1d", C.SKIPS))]
    if CPP:
        cases.append(("layout-cpp-f32", C.anderson_dtensor, (torch.float32, CPP, STEPS)))
    return cases


def _amp_cases():
    """GradScaler's scale and inf flag on shards (power-of-two scale, two inf steps)."""
    amp = (torch.float32, "torch", STEPS, 3, 0.01, "cpu", "1d", None, True)
    cases = [("amp-torch", C.anderson_dtensor, amp)]
    if CPP:
        cases.append(("amp-cpp", C.anderson_dtensor, (torch.float32, CPP) + amp[2:]))
    return cases


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def world1():
    return run_ranks(C.suite, 1, _layout_cases())


@pytest.fixture(scope="module")
def world2(checkpoints):
    cases = _layout_cases()
    for name in ("anderson", "interpolatron"):
        cases += [(f"fsdp2-{name}", C.fsdp2, (name, MODEL_STEPS)),
                  (f"ddp-{name}", C.ddp, (name, MODEL_STEPS)),
                  (f"zero-{name}", C.zero, (name, MODEL_STEPS)),
                  (f"dcp-save-{name}", C.dcp_save, (name, SAVED_AT, TOTAL, os.path.join(checkpoints, name)))]
    cases += _amp_cases()
    cases.append(("compiled", C.anderson_dtensor,
                  (torch.float32, "torch", STEPS, 3, 0.01, "cpu", "1d", None, False, True)))
    cases += [("zero-nogroup-anderson", C.zero, ("anderson", MODEL_STEPS, False)),
              ("fsdp1-anderson", C.fsdp1, ("anderson", MODEL_STEPS)),
              ("rna-iterates", C.rna_fsdp2, ("iterates",)),
              ("rna-gradients", C.rna_fsdp2, ("gradients",)),
              ("rna-fsdp1", C.rna_fsdp1, ("iterates",)),
              ("diagnostics", C.interpolatron_diagnostics_dtensor, (STEPS,)),
              ("partitioned-skips", C.anderson_partitioned, (STEPS, C.SKIPS)),
              ("state-dict-layouts", C.plain_and_sharded_state_dicts, (STEPS, 3)),
              ("collectives", C.count_collectives, (3,))]
    return run_ranks(C.suite, 2, cases, timeout=240)


@pytest.fixture(scope="module")
def world3(checkpoints, world2):  # world2 writes the checkpoints world3 loads
    cases = _layout_cases() + _amp_cases()
    for name in ("anderson", "interpolatron"):
        cases.append((f"dcp-load-{name}", C.dcp_load,
                      (name, SAVED_AT, TOTAL, os.path.join(checkpoints, name))))
    return run_ranks(C.suite, 3, cases, timeout=240)


@pytest.fixture(scope="module")
def world4():
    cases = _layout_cases()
    for kind in ("hsdp", "2d"):
        cases.append((f"layout-{kind}", C.anderson_dtensor,
                      (torch.float32, "torch", STEPS, 3, 0.01, "cpu", kind)))
    return run_ranks(C.suite, 4, cases, timeout=240)


@pytest.fixture(scope="module")
def plain_layout():
    refs = {"layout-f32": C.run_anderson_plain(torch.float32, "torch", STEPS),
            "layout-f64": C.run_anderson_plain(torch.float64, "torch", STEPS),
            "layout-skips": C.run_anderson_plain(torch.float32, "torch", STEPS, skips=C.SKIPS)}
    if CPP:
        refs["layout-cpp-f32"] = C.run_anderson_plain(torch.float32, CPP, STEPS)
    return refs


# -- layout invariance ----------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["layout-f32", "layout-f64", "layout-skips"])
def test_layout_invariance_to_float64_rounding(request, plain_layout, world, case):
    """Same global gradients, DTensor shards on 1-4 ranks (uneven, some ranks
    holding nothing of a parameter, one replicated parameter): Anderson's
    coefficients equal the single-process ones to float64 rounding and the
    parameters agree to the last bits (torch backend, D3's float64 dots)."""
    ref = plain_layout[case]
    for res in rank_results(request.getfixturevalue(f"world{world}"), case):
        dc = (res["coefs"] - ref["coefs"]).abs().max().item()
        dp = max_abs_diff(res["params"], ref["params"])
        print(f"{case} world={world}: max |coef diff| {dc:.3g}, max |param diff| {dp:.3g}")
        assert dc <= 1e-14, dc
        scale = max(p.abs().max().item() for p in ref["params"])
        assert dp <= (1e-15 if case == "layout-f64" else EPS32) * scale, dp


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_grad_scaler_on_shards(request, world, backend):
    """GradScaler's fused contract on DTensor shards: gradients scaled by 8 and
    two steps with an inf in one shard (found_inf set). Each rank's kernels
    unscale, a flagged step writes nothing on any rank (parameters, rings, the
    partial and whole Gram, coefficients, counts), and the run equals the
    single-process run that never saw those two steps (coefficients to
    float64 rounding, parameters to the last bits)."""
    name = "torch" if backend == "torch" else CPP
    if name is None:
        pytest.skip("the C++ extension is not built")
    scaled = C.run_anderson_plain(torch.float32, name, STEPS, amp=True)
    dropped = C.run_anderson_plain(torch.float32, name, STEPS, drop=C.INF_STEPS)
    # Single process: scaling by a power of two is exact, so skipping is all the scaler does.
    assert torch.equal(scaled["coefs"], dropped["coefs"])
    assert all(torch.equal(a, b) for a, b in zip(scaled["params"], dropped["params"]))
    for res in rank_results(request.getfixturevalue(f"world{world}"), f"amp-{backend}"):
        dc = (res["coefs"] - dropped["coefs"]).abs().max().item()
        dp = max_abs_diff(res["params"], dropped["params"])
        print(f"GradScaler on {world} ranks, {name}: max |coef diff| {dc:.3g}, max |param diff| {dp:.3g}")
        assert dc <= 1e-14, dc
        assert dp <= EPS32 * max(p.abs().max().item() for p in dropped["params"]), dp


def test_compiled_step_on_shards(world2, plain_layout):
    """``torch.compile(opt.step, fullgraph=True)`` on DTensor shards (2 ranks,
    the Gram all-reduce inside the graph) after one eager step: the
    single-process eager run's coefficients to float64 rounding."""
    ref = plain_layout["layout-f32"]
    for res in rank_results(world2, "compiled"):
        dc = (res["coefs"] - ref["coefs"]).abs().max().item()
        dp = max_abs_diff(res["params"], ref["params"])
        print(f"compiled on 2 ranks: max |coef diff| {dc:.3g}, max |param diff| {dp:.3g}")
        assert dc <= 1e-14, dc
        assert dp <= EPS32 * max(p.abs().max().item() for p in ref["params"]), dp


@pytest.mark.parametrize("kind", ["hsdp", "2d"])
def test_layout_invariance_on_2d_meshes(world4, plain_layout, kind):
    """A 2 x 2 mesh: HSDP (Replicate, Shard(0)), where the replicated dimension
    must count once, and (Shard(0), Shard(1)), summed over both dimensions."""
    ref = plain_layout["layout-f32"]
    for res in rank_results(world4, f"layout-{kind}"):
        dc = (res["coefs"] - ref["coefs"]).abs().max().item()
        print(f"{kind} on 2x2: max |coef diff| {dc:.3g}")
        assert dc <= 1e-14
        scale = max(p.abs().max().item() for p in ref["params"])
        assert max_abs_diff(res["params"], ref["params"]) <= EPS32 * scale


def test_membership_changes_on_one_rank_only(world2, plain_layout):
    """Whole parameters partitioned over 2 ranks (ZeRO's layout, ``process_group``);
    parameters lose their gradients at some steps, so one rank's set changes
    (once, all of it) while the other's does not: the same single all-reduce
    per step on both, and the single-process coefficients and parameters."""
    ref = plain_layout["layout-skips"]
    results = rank_results(world2, "partitioned-skips")
    params = {}
    for res in results:
        assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-14
        params.update(res["params"])
    assert sorted(params) == list(range(len(C.SHAPES)))
    assert max_abs_diff([params[i] for i in range(len(C.SHAPES))], ref["params"]) <= EPS32 * 4


def test_state_dict_between_plain_and_sharded_layouts(world2, plain_layout):
    """``state_dict()`` of a plain optimizer loaded into one over DTensor shards,
    and the reverse, mid-run: the single-process trajectory continues."""
    ref = plain_layout["layout-f32"]
    for res in rank_results(world2, "state-dict-layouts"):
        for first in ("plain", "sharded"):
            assert (res[first]["coefs"] - ref["coefs"]).abs().max().item() <= 1e-14, first
            scale = max(p.abs().max().item() for p in ref["params"])
            assert max_abs_diff(res[first]["params"], ref["params"]) <= EPS32 * scale, first


def test_interpolatron_diagnostics_are_the_whole_models(world2):
    ref = C.run_diagnostics_plain(STEPS)
    for res in rank_results(world2, "diagnostics"):
        torch.testing.assert_close(res["norms"], ref["norms"], rtol=1e-14, atol=0)
        torch.testing.assert_close(res["cosines"], ref["cosines"], rtol=1e-13, atol=1e-15)


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_invariance_cpp_backend(request, plain_layout, world):
    """The C++ kernels, with weight decay: float64 dots (D3) and the same
    rounding of ``grad + wd * x`` in their vectorised bodies and scalar tails
    (built with -ffp-contract=off; before that a shard boundary moved the
    coefficients by 4e-10 and the parameters by 1-4 float32 ulps): the
    coefficients agree to float64 rounding (measured 1.1e-16) and the
    parameters to the last bits (measured: bitwise)."""
    ref = plain_layout["layout-cpp-f32"]
    for res in rank_results(request.getfixturevalue(f"world{world}"), "layout-cpp-f32"):
        dc = (res["coefs"] - ref["coefs"]).abs().max().item()
        dp = max_abs_diff(res["params"], ref["params"])
        print(f"C++ backend world={world}: max |coef diff| {dc:.3g}, max |param diff| {dp:.3g}")
        assert dc <= 1e-14, dc
        scale = max(p.abs().max().item() for p in ref["params"])
        assert dp <= EPS32 * scale, dp


@pytest.mark.parametrize("world", [2, 3])
def test_histories_are_dtensors_sharded_like_their_parameter(request, world):
    results = rank_results(request.getfixturevalue(f"world{world}"), "layout-f32")
    shape = (2,) + C.SHAPES[0]  # history 3: two ring slots
    local_rows = [res["hist_local"][1] for res in results]
    for res in results:
        assert res["hist_type"] == "DTensor"
        assert res["hist_placements"] == "(Shard(dim=1),)"
        assert res["hist_shape"] == shape
    assert sum(local_rows) == shape[1]
    assert local_rows == [len(c) for c in torch.arange(shape[1]).chunk(world)]


# -- wrappers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_models():
    return {name: C.run_model_plain(name, MODEL_STEPS) for name in ("anderson", "interpolatron")}


def _check_model_case(results, ref, tol=1e-13):
    for res in results:
        assert max_abs_diff(res["params"], ref["params"]) <= tol
        if ref["coefs"] is not None:
            assert (res["coefs"] - ref["coefs"]).abs().max().item() <= tol


@pytest.mark.parametrize("name", ["anderson", "interpolatron"])
def test_fsdp2_matches_single_process(world2, plain_models, name):
    results = rank_results(world2, f"fsdp2-{name}")
    assert all(res["hist_type"] == "DTensor" for res in results)
    _check_model_case(results, plain_models[name])


@pytest.mark.parametrize("name", ["anderson", "interpolatron"])
def test_ddp_matches_single_process(world2, plain_models, name):
    _check_model_case(rank_results(world2, f"ddp-{name}"), plain_models[name])


@pytest.mark.parametrize("name", ["anderson", "interpolatron"])
def test_zero_redundancy_optimizer_matches_single_process(world2, plain_models, name):
    results = rank_results(world2, f"zero-{name}")
    owned = [res["owned"] for res in results]
    assert min(owned) >= 1 and sum(owned) == 4  # each rank's optimizer holds a part of the model
    _check_model_case(results, plain_models[name])


def test_zero_without_process_group_takes_zeros_group(world2, plain_models):
    """Without ``process_group`` the optimizer takes the group of the
    ZeroRedundancyOptimizer building it (it used to fit a per-rank Gram
    silently: coefficients 2.6 apart between ranks)."""
    _check_model_case(rank_results(world2, "zero-nogroup-anderson"), plain_models["anderson"])


def test_fsdp1_flat_parameters_with_process_group(world2, plain_models):
    _check_model_case(rank_results(world2, "fsdp1-anderson"), plain_models["anderson"])


@pytest.mark.parametrize("residual", ["iterates", "gradients"])
def test_rna_on_fsdp2_matches_single_process(world2, residual):
    ref = C.run_rna_plain(residual)
    for res in rank_results(world2, f"rna-{residual}"):
        assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-12
        for name, value in ref["extrapolated"].items():
            assert (res["extrapolated"][name] - value).abs().max().item() <= 1e-13, name


def test_rna_on_fsdp1_flat_shards_with_process_group(world2):
    ref = C.run_rna_plain("iterates")
    names = [n for n, _ in C.make_model().named_parameters()]
    for res in rank_results(world2, "rna-fsdp1"):
        assert (res["coefs"] - ref["coefs"]).abs().max().item() <= 1e-12
        assert max_abs_diff(res["extrapolated"], [ref["extrapolated"][n] for n in names]) <= 1e-13


def test_interpolatron_step_communicates_nothing(world2):
    """Counted with CommDebugMode over optimizer steps on FSDP2 parameters: an
    Interpolatron step issues no collective, an Anderson step exactly one
    (the counter does see a plain all-reduce: the probe)."""
    for counts in rank_results(world2, "collectives"):
        assert counts == {"interpolatron": 0, "anderson": 3, "probe": 1}


# -- distributed checkpoints ------------------------------------------------------------

@pytest.mark.parametrize("name", ["anderson", "interpolatron"])
def test_dcp_save_on_2_ranks_load_on_3_continues_the_trajectory(world2, world3, name):
    """Saved with dcp.save after SAVED_AT steps on 2 ranks (FSDP2), loaded with
    dcp.load + set_optimizer_state_dict on 3 (resharded, uneven), trained on:
    the single-process uninterrupted run, to rounding. A resume that lost the
    optimizer's state is far from it (the control)."""
    ref = C.run_model_plain(name, TOTAL)
    _check_model_case(rank_results(world2, f"dcp-save-{name}"), ref)
    loaded = rank_results(world3, f"dcp-load-{name}")
    assert sorted(res["hist_local"][1] for res in loaded) == [1, 3, 3]  # 7 rows over 3 ranks
    for res in loaded:
        assert max_abs_diff(res["params"], ref["params"]) <= 1e-13
        if ref["coefs"] is not None:
            assert (res["coefs"] - ref["coefs"][SAVED_AT:]).abs().max().item() <= 1e-13
    restarted = C.run_model_plain(name, TOTAL, restart_at=SAVED_AT)
    assert max_abs_diff(restarted["params"], ref["params"]) > 1e-6


# -- GPUs -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_sharded_anderson_on_gpus():
    """The same code on CUDA tensors: NCCL with two GPUs or more, else two ranks
    sharing one GPU over gloo (which carries CUDA tensors). Torch backend: float64
    rounding; the fused backend ('auto'): its kernels' tolerance."""
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    cases = [("torch", C.anderson_dtensor, (torch.float32, "torch", STEPS, 3, 0.01, "cuda")),
             ("auto", C.anderson_dtensor, (torch.float32, "auto", STEPS, 3, 0.01, "cuda"))]
    results = run_ranks(C.suite, 2, cases, timeout=300, backend=backend)
    for name, tol in (("torch", 1e-14), ("auto", 1e-4)):
        ref = C.run_anderson_plain(torch.float32, name, STEPS, device="cuda")
        for res in rank_results(results, name):
            dc = (res["coefs"] - ref["coefs"]).abs().max().item()
            print(f"GPU {backend} backend={name}: max |coef diff| {dc:.3g}")
            assert dc <= tol


# -- the example --------------------------------------------------------------------------

def test_example_fsdp2_train_saves_on_2_ranks_and_resumes_on_3(tmp_path):
    """examples/fsdp2_train.py under torchrun (CPU, gloo): saved after 10 steps
    on 2 ranks, resumed on 3, its held-out loss at step 20 is the uninterrupted
    2-rank run's (to the 5 printed digits)."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(ranks: int, *args: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               os.path.join(root, "examples", "fsdp2_train.py"), *args]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    losses = lambda text: dict(re.findall(r"step +(\d+) +held-out loss ([0-9.]+)", text))
    ckpt = str(tmp_path / "ckpt")
    first = run(2, "--steps", "10", "--save", ckpt)
    assert "saved step 10" in first
    resumed = run(3, "--steps", "20", "--resume", ckpt)
    assert "resumed at step 10 on 3 ranks" in resumed
    straight = run(2, "--steps", "20")
    assert losses(resumed)["20"] == losses(straight)["20"]
