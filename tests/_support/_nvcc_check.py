"""csrc/check_cuda_compile.sh, run once per test session: the compile test
reads its report, the SASS tests read the kernel objects it keeps (the same
nvcc flags as setup.py's build, so compiling them a second time would only
cost minutes of CI)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "csrc" / "check_cuda_compile.sh"


@dataclass(frozen=True)
class CheckRun:
    returncode: int
    stdout: str
    stderr: str
    #: NAME.cu.o (sm_90 SASS inside) and NAME.cu.log (ptxas -v) of every kernel that compiled.
    kept: Path


@functools.cache
def check_cuda_compile() -> CheckRun:
    kept = Path(tempfile.mkdtemp(prefix="interpolatron-nvcc-"))
    env = dict(os.environ, PYTHON=sys.executable, INTERPOLATRON_CHECK_KEEP=str(kept))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1800)
    return CheckRun(proc.returncode, proc.stdout, proc.stderr, kept)
