"""Settings of the pytest-benchmark runs (see conftest.py), from environment variables."""

from __future__ import annotations

import os

import torch

from interpolatron import benchmark as bm


def bench_device() -> torch.device:
    name = os.environ.get("INTERPOLATRON_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_sets() -> list[bm.ParamSet]:
    default = ("resnet50 gpt2 many-small" if bench_device().type == "cuda"
               else "resnet50:0.25 gpt2:0.05 many-small")
    return [bm.parse_set(t) for t in os.environ.get("INTERPOLATRON_BENCH_SETS", default).split()]


def bench_dtypes() -> list[str]:
    return os.environ.get("INTERPOLATRON_BENCH_DTYPES", "fp32 bf16").split()


def bench_rounds() -> int:
    return int(os.environ.get("INTERPOLATRON_BENCH_ROUNDS", "10"))
