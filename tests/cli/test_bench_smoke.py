"""Every benchmark row, on tiny parameter sets, through the same library the
real benchmark uses (``interpolatron.benchmark``): each row well-formed, the
writers produce their files, the command line runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interpolatron import benchmark as bm

# Tiny versions of every set: the real tensor counts (161, 148, 1,152) with
# the leading dimensions shrunk, so the per-tensor paths are exercised.
TINY = {"resnet50": 0.002, "gpt2": 0.0005, "many-small": 0.05}


@pytest.fixture(scope="module")
def result() -> bm.BenchResult:
    sets = [bm.param_set(name, scale) for name, scale in TINY.items()]
    # One thread: tiny steps gain nothing from two, and on a busy CPU two
    # threads wait on each other for whole scheduler slices.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bm.run_benchmark(sets, [torch.float32, torch.bfloat16], "cpu", warmup=0, reps=1,
                                copy_mib=4, log=None)
    finally:
        torch.set_num_threads(threads)


def test_real_shapes():
    # The documented sizes of the real models (torchvision ResNet-50; GPT-2 small, tied head).
    assert (bm.param_set("resnet50").n_tensors, bm.param_set("resnet50").numel) == (161, 25_557_032)
    assert (bm.param_set("gpt2").n_tensors, bm.param_set("gpt2").numel) == (148, 124_439_808)
    assert bm.param_set("many-small").n_tensors >= 1000
    half = bm.parse_set("gpt2:0.5", 0.5)
    assert half.scale == 0.25 and half.n_tensors == 148
    assert abs(half.numel / 124_439_808 - 0.25) < 0.01


def test_bytes_per_element_follow_algorithms_md():
    expect = {"sgd": 3, "momentum": 5, "nesterov": 5, "adam": 7, "interpolatron-2": 7,
              "interpolatron-3": 9, "anderson-2": 9, "anderson-3": 12,
              f"rna-record-w{bm.RNA_WINDOW}": bm.RNA_WINDOW + 2,
              f"rna-extrapolate-w{bm.RNA_WINDOW}": bm.RNA_WINDOW + 1,
              "interpolatron-2-master": 7, "anderson-2-master": 9,
              "interpolatron-2-sr": 7, "anderson-2-sr": 9,
              "anderson-2-onepass": 7, "anderson-3-onepass": 9, "interpolatron-2-diag": 7}
    assert {name: bm.accesses(name) for name in bm.OPTIMIZER_NAMES} == expect
    # master weights on 16-bit parameters: the float32 step, the gradient's
    # upcast and the rounded write-back (bytes per element)
    assert bm.bytes_per_element("interpolatron-2", 2) == 14
    # The fused master step: master 4 + gradient 2 + rings 4 + 4 read, master 4 +
    # parameter 2 + ring slots 4 + 4 written (the p.data swap moved 40 and 48).
    assert bm.bytes_per_element("interpolatron-2-master", 2) == (4 + 2 + 4 + 4) + (4 + 2 + 4 + 4) == 28
    assert bm.bytes_per_element("anderson-2-master", 2) == 28 + (2 + 4) == 34
    assert bm.bytes_per_element("interpolatron-2-master", 4) == 28
    # stochastic rounding: the plain step's bytes (arithmetic in registers)
    assert bm.bytes_per_element("interpolatron-2-sr", 2) == 14
    assert bm.bytes_per_element("anderson-2-sr", 2) == 18


def test_every_case_runs(result):
    rows = result.rows
    for dtype in (torch.float32, torch.bfloat16):
        cases, _ = bm.enumerate_cases("cpu", dtype)
        # the torch backend and torch.optim's foreach always exist
        assert {c.optimizer for c in cases if c.impl == "torch"} == set(bm.OUR_OPTIMIZERS)
        assert {c.optimizer for c in cases if c.impl == "foreach"} == set(bm.TORCH_OPTIMIZERS)
        name = str(dtype).removeprefix("torch.")
        got = {(r["set_name"], r["optimizer"], r["impl"]) for r in rows if r["dtype"] == name}
        assert got == {(s, c.optimizer, c.impl) for s in TINY for c in cases}
    assert not any(r["impl"] == "triton" for r in rows)  # never timed in the CPU interpreter


def test_rows_well_formed(result):
    for r in result.rows:
        where = f"{r['set']} {r['dtype']} {r['optimizer']} [{r['impl']}]"
        assert r["reps"] == 1 and 0 < r["time_min_s"] <= r["time_s"] <= r["time_max_s"], where
        elem = 4 if r["dtype"] == "float32" else 2
        assert r["bytes"] == bm.bytes_per_element(r["optimizer"], elem) * r["numel"], where
        if not r["optimizer"].endswith("-master") or elem == 4:
            assert r["bytes"] == r["accesses_per_elem"] * r["numel"] * elem, where
        assert math.isclose(r["bytes_per_s"], r["bytes"] / r["time_s"]), where
        assert r["copy_bytes_per_s"] == result.meta["copy_bytes_per_s"] > 0, where
        assert 0 < r["fraction_of_copy"] and math.isfinite(r["fraction_of_copy"]), where
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0, where
        assert r["state_bytes"] is not None and r["state_bytes"] >= 0, where
        assert r["finite"], where
    # The measured state holds at least the buffers each algorithm must keep
    # (the torch backend adds persistent work buffers on purpose), and exactly
    # those for torch.optim's fused kernels (Adam's 0-dim step counters aside).
    one = {(r["set_name"], r["dtype"], r["optimizer"], r["impl"]): r for r in result.rows}
    for (s, dt, opt, impl), buffers in {("gpt2", "float32", "momentum", "fused"): 1,
                                        ("gpt2", "float32", "adam", "fused"): 2,
                                        ("gpt2", "bfloat16", "interpolatron-2", "torch"): 2,
                                        ("gpt2", "bfloat16", "anderson-3", "torch"): 5}.items():
        r = one[(s, dt, opt, impl)]
        need = buffers * r["numel"] * (4 if dt == "float32" else 2)
        assert r["state_bytes"] >= need, r
        if impl == "fused":
            assert r["state_bytes"] <= need + 4096, r


def test_writers(result, tmp_path):
    paths = bm.write_all(result, tmp_path, "smoke")
    assert [p.name for p in paths] == ["smoke.json", "smoke.md", "smoke.png"]
    data = json.loads(paths[0].read_text())
    assert len(data["rows"]) == len(result.rows)
    for key in ("device_name", "torch", "triton", "git_commit", "date", "command", "copy_bytes_per_s"):
        assert key in data["meta"]
    md = paths[1].read_text()
    assert md.count("\n| ") == len(result.rows) + 1  # header + one line per row
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = bm.load_json(paths[0])  # a result file can be re-tabulated later
    assert bm.markdown_table(again.rows) == bm.markdown_table(result.rows)


def test_command_line(tmp_path, capsys):
    # Through `interpolatron bench`, flags first, as a user types it.
    from interpolatron import cli

    assert cli.main(["bench", "--device", "cpu", "--sets", "many-small:0.02", "resnet50:0.001",
                     "--dtype", "fp32", "--optimizers", "sgd", "interpolatron-2",
                     "--reps", "1", "--warmup", "0", "--copy-mib", "2",
                     "--out", str(tmp_path), "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "| many-smallx0.02 | float32 | interpolatron-2 | torch |" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.json", "cli.md", "cli.png"]
    meta = json.loads((tmp_path / "cli.json").read_text())["meta"]
    assert meta["command"].startswith("interpolatron bench --device cpu")
