"""The C++ extension's backend is named ``native``; the old name ``cuda`` still
works, with a FutureWarning that names the new one."""

from __future__ import annotations

import pytest
import torch

import interpolatron
from interpolatron.backends import BACKEND_NAMES, availability, canonical_name, resolve


def test_native_is_listed_and_cuda_is_not():
    assert "native" in BACKEND_NAMES and "cuda" not in BACKEND_NAMES
    assert "native" in availability("cpu", torch.float32)


def test_old_name_warns_and_resolves_to_native():
    with pytest.warns(FutureWarning, match="'native'"):
        assert canonical_name("cuda") == "native"
    why = availability("cpu", torch.float32)["native"]
    if why is not None:
        pytest.skip(why)
    with pytest.warns(FutureWarning, match="'native'"):
        backend = resolve("cuda", torch.device("cpu"), torch.float32)
    assert backend is resolve("native", torch.device("cpu"), torch.float32)
    assert backend.name == "native"


def test_optimizer_accepts_the_old_name():
    if availability("cpu", torch.float32)["native"] is not None:
        pytest.skip("the C++ extension is not built")
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    with pytest.warns(FutureWarning, match="'native'"):
        opt = interpolatron.Interpolatron([p], lr=0.1, backend="cuda")
    opt.step()
    assert set(opt.backends_in_use().values()) == {"native"}


def test_old_module_warns_on_import_and_still_works():
    import importlib
    import sys

    from interpolatron.backends import native_backend

    sys.modules.pop("interpolatron.backends.cuda_backend", None)
    with pytest.warns(FutureWarning, match=r"removed in interpolatron 0\.3\.0.*native_backend"):
        old = importlib.import_module("interpolatron.backends.cuda_backend")
    assert old.BACKEND is native_backend.BACKEND
    assert old.unavailable_reason is native_backend.unavailable_reason
