"""The whole run: every case on every (set, dtype), with the environment a
result file must state about itself."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cases import enumerate_cases
from .measure import copy_bandwidth, run_case
from .shapes import ParamSet, make_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    meta: dict[str, Any]


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), "unknown" outside git."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str, command: str | None = None) -> dict[str, Any]:
    """Device, versions, commit, date: what a result file must say about itself."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    from .. import __version__

    meta: dict[str, Any] = {
        "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version, "interpolatron": __version__,
        "python": platform.python_version(), "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = os.getloadavg()
    try:
        from ..backends.native_backend import extension_status
        meta["cuda_extension"] = {k: str(v) for k, v in extension_status().items()}
    except Exception:  # noqa: BLE001 - the extension is optional
        meta["cuda_extension"] = "not importable"
    return meta


def run_benchmark(sets: Sequence[ParamSet], dtypes: Sequence[torch.dtype], device: torch.device | str = "cpu",
                  *, optimizers: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                  warmup: int = 3, reps: int = 10, copy_mib: int = 256, measure_peak: bool = True,
                  cuda_ms: tuple[float, float] = (25.0, 200.0), command: str | None = None,
                  log: Callable[[str], None] | None = print, compile_steps: bool = False) -> BenchResult:
    """Run every available case on every (set, dtype) and return the rows.

    The copy bandwidth is measured before and after the cases; the higher of
    the two is the reference (the best the device showed in this run; on a
    shared machine the other one says how much the load moved)."""
    device = torch.device(device)
    meta = environment(device, command)
    copy_bytes = copy_mib << 20
    bw_before = copy_bandwidth(device, copy_bytes)
    if log:
        log(f"copy bandwidth ({copy_mib} MiB buffers): {bw_before / 1e9:.2f} GB/s")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    pending: list[dict[str, Any]] = []
    for dtype in dtypes:
        cases, skip = enumerate_cases(device, dtype, optimizers, backends)
        skipped += [dict(s, dtype=str(dtype).removeprefix("torch.")) for s in skip]
        for pset in sets:
            params = make_params(pset, device, dtype)
            # gc.collect() costs ~0.1 s with torch's modules loaded: only worth it for large sets.
            big = pset.numel * params[0].element_size() > (64 << 20)
            runs = [(c, False) for c in cases]
            if compile_steps:  # our optimizers' steps compiled, next to eager
                runs = [r for c in cases for r in ([(c, False), (c, True)] if c.family != "torch.optim"
                                                   and not c.optimizer.startswith("rna") else [(c, False)])]
            for case, compiled in runs:
                row = run_case(case, pset, params, device, warmup, reps, bw_before, measure_peak, cuda_ms,
                               compiled)
                pending.append(row)
                if log:
                    label = case.label + (" compiled" if compiled else "")
                    log(f"{pset.label:<16} {row['dtype']:<9} {label:<32} "
                        f"{row['time_s'] * 1e3:10.3f} ms  {row['bytes_per_s'] / 1e9:7.2f} GB/s")
                if big:  # optimizers can sit in reference cycles: free their buffers before the next
                    gc.collect()
            del params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bw_after = copy_bandwidth(device, copy_bytes)
    copy_bps = max(bw_before, bw_after)
    for row in pending:  # every row against the same reference
        row["copy_bytes_per_s"] = copy_bps
        row["fraction_of_copy"] = row["bytes_per_s"] / copy_bps
        row["floor_s"] = row["bytes"] / copy_bps
        rows.append(row)
    meta.update(copy_bytes_per_s=copy_bps, copy_bytes_per_s_before=bw_before, copy_bytes_per_s_after=bw_after,
                copy_buffer_bytes=copy_bytes, warmup=warmup, reps=reps,
                sets=[{"name": s.name, "scale": s.scale, "n_tensors": s.n_tensors, "numel": s.numel,
                       "description": s.description} for s in sets])
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = os.getloadavg()
    if log:
        log(f"copy bandwidth after the cases: {bw_after / 1e9:.2f} GB/s")
    return BenchResult(rows, skipped, meta)
