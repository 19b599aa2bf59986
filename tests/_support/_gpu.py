"""Which backends a gpu-marked test runs on."""

from __future__ import annotations

import torch

from interpolatron.backends import availability


def gpu_backends() -> list[str]:
    """The backends that can run float32 CUDA tensors here; without a GPU one
    name, so the parametrized test is collected and then skipped by the gpu marker."""
    if not torch.cuda.is_available():
        return ["torch"]
    return [name for name, why in availability("cuda", torch.float32).items() if why is None]
