"""The code holds bit for bit to the golden record (tests/golden/golden.pt):
parameters after every step and every state tensor of each optimizer x backend
x dtype x feature case (see golden_record.py, which also regenerates it).

All cases run in one subprocess whose environment pins what the bits depend on
(one thread, ATen's and the extension's DEFAULT CPU kernels, MKL's
reproducible mode, Triton's interpreter and block size); each case is its own
test here, so a failure names the case and the first tensor that differs. An
intended change of behaviour re-records: ``python tests/golden/golden_record.py --write``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from golden_record import CASE_NAMES

SCRIPT = Path(__file__).with_name("golden_record.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("golden") / "report.json"
    # The script pins its environment itself (it re-executes under PINNED_ENV).
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", str(out)], capture_output=True, text=True,
                          timeout=900)
    if not out.exists():
        raise RuntimeError(f"golden_record.py --check failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASE_NAMES)
def test_golden(report: dict, case: str) -> None:
    assert case in report, f"{case} did not run"
    assert report[case] is None, f"{case} differs from the golden record: {report[case]}"

