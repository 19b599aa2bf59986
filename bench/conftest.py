"""pytest-benchmark runs of one optimizer step: ``pytest bench/ --benchmark-only``.

Kept out of the default test run (``testpaths = ["tests"]``); the default run
smoke-tests every row on tiny sets instead (``tests/cli/test_bench_smoke.py``).

Settings (environment variables, so they also work from scripts):

- ``INTERPOLATRON_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda if available)
- ``INTERPOLATRON_BENCH_SETS``: space-separated ``NAME[:SCALE]`` (default
  ``resnet50 gpt2 many-small`` on CUDA, ``resnet50:0.25 gpt2:0.05 many-small``
  on the CPU)
- ``INTERPOLATRON_BENCH_DTYPES``: ``fp32 bf16`` by default
- ``INTERPOLATRON_BENCH_ROUNDS``: timed rounds per test (default 10)
"""

from __future__ import annotations

import pytest
from bench_settings import bench_device, bench_dtypes, bench_rounds, bench_sets

from interpolatron import benchmark as bm


def pytest_report_header(config) -> str:
    sets = ", ".join(f"{s.label} ({s.numel:,} elements, {s.n_tensors} tensors)" for s in bench_sets())
    return (f"interpolatron step benchmark: device {bench_device()} ({bm.device_name(bench_device())}), "
            f"dtypes {' '.join(bench_dtypes())}, {bench_rounds()} rounds; sets {sets}")


@pytest.fixture(scope="session")
def copy_bps() -> float:
    """The device's copy bandwidth (bytes/s), measured once per session."""
    device = bench_device()
    return bm.copy_bandwidth(device, (1024 if device.type == "cuda" else 256) << 20)
