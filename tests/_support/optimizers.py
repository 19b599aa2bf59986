"""One registry of optimizer configurations and one backend helper, which the
convention tests iterate (as torch's ``optim_db`` in
torch/testing/_internal/common_optimizers.py) instead of each building its own
factories and backend lists.

A configuration fixes what makes an optimizer what it is (the class, k, the
constraint); a test passes what its problem needs (``lr``, weight decay, param
groups) to :func:`make`. ``"interpolatron"`` and ``"anderson"`` name the
default k = 3 configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import interpolatron
from interpolatron.backends import BACKEND_NAMES, availability


@dataclass(frozen=True)
class OptimizerInfo:
    """One configuration: the class and the settings that define it."""

    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return self.cls.__name__.lower()

    def make(self, params, backend: str = "torch", **overrides):
        """The optimizer on ``params`` (lr 0.05 unless given)."""
        kw = {"lr": 0.05, **self.kwargs, **overrides}
        return self.cls(params, backend=backend, **kw)


_INFOS = (
    OptimizerInfo("interpolatron-k1", interpolatron.Interpolatron, {"alphas": (1.0,)}),
    OptimizerInfo("interpolatron-k2", interpolatron.Interpolatron, {"alphas": (0.3, 0.7)}),
    OptimizerInfo("interpolatron-k3", interpolatron.Interpolatron, {"alphas": (0.2, 0.3, 0.5)}),
    OptimizerInfo("anderson-k2", interpolatron.Anderson, {"history": 2}),
    OptimizerInfo("anderson-k3", interpolatron.Anderson, {"history": 3, "reg": 1e-3}),
    OptimizerInfo("anderson-k2-simplex", interpolatron.Anderson, {"history": 2, "constraint": "simplex"}),
    OptimizerInfo("anderson-k3-simplex", interpolatron.Anderson, {"history": 3, "constraint": "simplex"}),
    # ALGORITHMS.md 2b: coefficients one step old, the Gram row from the update pass.
    OptimizerInfo("anderson-k2-onepass", interpolatron.Anderson, {"history": 2, "one_pass": True}),
)
OPTIMIZERS: dict[str, OptimizerInfo] = {info.name: info for info in _INFOS}
# The default configuration of each algorithm: what a test means by "interpolatron".
DEFAULTS = {"interpolatron": "interpolatron-k3", "anderson": "anderson-k3"}
ALGORITHMS = tuple(DEFAULTS)


def info(name: str) -> OptimizerInfo:
    return OPTIMIZERS[DEFAULTS.get(name, name)]


def make(name: str, params, backend: str = "torch", **overrides):
    """The optimizer of configuration ``name`` (or an algorithm's default)."""
    return info(name).make(params, backend, **overrides)


# -- backends ----------------------------------------------------------------------------------

BACKENDS = BACKEND_NAMES
"""Every backend: a test parametrized over these runs or says why it cannot."""


def unavailable(backend: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> str | None:
    """Why ``backend`` cannot run ``dtype`` tensors on ``device`` here (None: it can)."""
    return availability(device, dtype)[backend]


def available_backends(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[str]:
    return [name for name in BACKENDS if unavailable(name, dtype, device) is None]


def need_backend(backend: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
    """Skip the calling test, saying why, when ``backend`` cannot run here."""
    why = unavailable(backend, dtype, device)
    if why is not None:
        pytest.skip(f"backend {backend!r}: {why}")


def backend_params(backends: tuple[str, ...] = BACKENDS, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> list:
    """One pytest param per backend; one that cannot run here is reported as
    skipped with the reason (never silently left out of the run)."""
    out = []
    for name in backends:
        why = unavailable(name, dtype, device)
        marks = [pytest.mark.skip(reason=f"backend {name!r}: {why}")] if why else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out
