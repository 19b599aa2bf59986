"""backend="auto" on CUDA puts the native kernels first only for the dtypes whose
kernels passed the simulated-GPU matrix (interpolatron/backends/_simulated.py).
Runs everywhere (no simulator needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import interpolatron.backends as backends
from interpolatron.backends import _simulated

ROOT = Path(__file__).resolve().parents[2]


def test_the_verification_names_this_simulator_patch():
    patch = ROOT / "tools" / "gpusim" / "gpgpu-sim.patch"
    assert hashlib.sha256(patch.read_bytes()).hexdigest()[:16] == _simulated.PATCH_SHA256_16, (
        "tools/gpusim/gpgpu-sim.patch changed: rebuild (tools/gpusim/build.sh), rerun `pytest -m gpusim "
        "tests/gpusim` and update interpolatron/backends/_simulated.py")
    build = (ROOT / "tools" / "gpusim" / "build.sh").read_text()
    assert f"COMMIT={_simulated.SIMULATOR_COMMIT}" in build


def _order(monkeypatch, device: str, dtype: torch.dtype) -> list[str]:
    tried = []

    def fake_reason(name, device, dtype):
        tried.append(name)
        return None, "not here"

    monkeypatch.setattr(backends, "_reason", fake_reason)
    with pytest.raises(backends.BackendUnavailable):
        backends.resolve("auto", torch.device(device), dtype)
    return tried


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_auto_tries_native_first_on_cuda_only_when_verified(monkeypatch, dtype):
    name = str(dtype).removeprefix("torch.")
    verified = name in _simulated.NATIVE_CUDA_VERIFIED
    assert _order(monkeypatch, "cuda", dtype)[0] == ("native" if verified else "triton")
    monkeypatch.setattr(backends, "NATIVE_CUDA_VERIFIED", frozenset() if verified else frozenset({name}))
    assert _order(monkeypatch, "cuda", dtype)[0] == ("triton" if verified else "native")
    # CPU buckets are not affected
    assert _order(monkeypatch, "cpu", dtype)[0] == "native"
