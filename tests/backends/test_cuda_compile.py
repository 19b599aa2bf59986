"""Every CUDA kernel compiles for sm_90 without register spills (and the torch
glue compiles with the CUDA path enabled), checked by csrc/check_cuda_compile.sh.
Needs nvcc, not a GPU."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from _nvcc_check import SCRIPT, check_cuda_compile

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("NVCC"),
    reason="nvcc is not on PATH (the CUDA toolkit is needed to compile the kernels)")


def test_kernels_compile_without_spills():
    proc = check_cuda_compile()  # once per session: the SASS tests read the objects it keeps
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    # The report lists every kernel of every .cu file, each with zero spills.
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\w+\.cu\s", line)]
    kernels = {row[0] for row in rows}
    expected = {p.name for p in (SCRIPT.parent / "cuda").glob("*.cu")}
    assert kernels == expected, report
    for row in rows:
        assert row[-2:] == ["0", "0"], report
    assert "launch layer ok" in proc.stdout, report  # compiled and linked without torch
    assert "OK" in proc.stdout, report
