"""``interpolatron bench --compile`` and ``interpolatron demo --compile``: compiled
rows next to eager ones, and (demo) the compiled run trains exactly as the eager one."""

from __future__ import annotations

import json

import pytest
import torch

from interpolatron import benchmark as bm
from interpolatron import cli


def test_bench_compile_rows_next_to_eager():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bm.run_benchmark([bm.param_set("resnet50", 0.001)], [torch.float32], "cpu", warmup=0, reps=1,
                                  copy_mib=4, log=None, optimizers=["interpolatron-2"], backends=["torch"],
                                  compile_steps=True, measure_peak=False)
    finally:
        torch.set_num_threads(threads)
    impls = [r["impl"] for r in result.rows if r["optimizer"] == "interpolatron-2"]
    assert impls == ["torch", "torch+compile"]
    assert all(r["time_s"] > 0 and r["finite"] for r in result.rows)


def test_demo_compile_matches_eager(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    cli.main(["demo", "--epochs", "1", "--out", str(tmp_path), "--only", "Interpolatron-2", "--compile"])
    out = capsys.readouterr().out
    assert "Interpolatron-2 compiled" in out
    record = json.loads((tmp_path / "demo_results.json").read_text())
    eager, compiled = record["results"]
    assert compiled["name"] == "Interpolatron-2 compiled" and compiled["step_ms"] > 0
    # Only the step is compiled; its kernels are the eager ones (opaque custom
    # ops; the step count is inductor's add): the same training.
    assert compiled["losses"] == eager["losses"]
