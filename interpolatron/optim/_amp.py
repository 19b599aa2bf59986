"""GradScaler's fused contract (ALGORITHMS.md section 7) on the optimizer side.

``torch.amp.GradScaler.step`` sees ``_step_supports_amp_scaling = True``, sets
the optimizer attributes ``grad_scale`` (None after a user ``unscale_``) and
``found_inf`` and calls ``step()``; the kernels divide the gradient by the scale
and skip every write when ``found_inf`` is set. What the kernels do not write
(step counts, Anderson's Gram, coefficients and fallbacks) advances through
``torch.where`` on the device: nothing here reads a device value on the host.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def check_amp_input(name: str, t: Tensor | None) -> None:
    """A GradScaler input is a one-element floating tensor (or None)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a one-element floating tensor, got shape {tuple(t.shape)} "
                         f"and dtype {t.dtype}")


class AmpStep:
    """This step's ``grad_scale`` / ``found_inf``, per device (float32, 0-dim),
    and the device-side decisions derived from them."""

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None):
        check_amp_input("grad_scale", grad_scale)
        check_amp_input("found_inf", found_inf)
        self._grad_scale = grad_scale
        self._found_inf = found_inf
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    @property
    def active(self) -> bool:
        return self._grad_scale is not None or self._found_inf is not None

    @property
    def may_skip(self) -> bool:
        return self._found_inf is not None

    def _on(self, name: str, device: torch.device, make: Callable[[], Tensor]) -> Tensor:
        key = (name, device)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = make()
        return t

    def grad_scale(self, device: torch.device) -> Tensor | None:
        if self._grad_scale is None:
            return None
        src = self._grad_scale
        return self._on("scale", device, lambda: src.detach().reshape(()).to(
            device=device, dtype=torch.float32, non_blocking=True))

    def found_inf(self, device: torch.device) -> Tensor | None:
        if self._found_inf is None:
            return None
        src = self._found_inf
        return self._on("found", device, lambda: src.detach().reshape(()).to(
            device=device, dtype=torch.float32, non_blocking=True))

    def skip(self, device: torch.device) -> Tensor | None:
        """A 0-dim bool: this step is skipped (None: it cannot be)."""
        found = self.found_inf(device)
        if found is None:
            return None
        return self._on("skip", device, lambda: found != 0)

    def taken(self, device: torch.device) -> Tensor | None:
        """A 0-dim int64, 1 when this step is taken, 0 when skipped (None: always 1)."""
        skip = self.skip(device)
        if skip is None:
            return None
        return self._on("taken", device, lambda: (~skip).to(torch.int64))

    def inv_scale(self, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """``1 / grad_scale`` (formed in float64, as GradScaler.unscale_) in ``dtype``."""
        scale = self.grad_scale(device)
        if scale is None:
            return None
        return self._on(f"inv{dtype}", device, lambda: scale.to(torch.float64).reciprocal().to(dtype))

    def kernel_args(self, device: torch.device) -> dict:
        return {"grad_scale": self.grad_scale(device), "found_inf": self.found_inf(device)}


NO_AMP = AmpStep(None, None)


class StaleWarmStart:
    """A parameter's g ring, warm-started in a step that may have been skipped
    (the gradient it copied may be inf). Until a step is taken, each step
    refills the ring from the current gradient, on the device; the host drops
    the entry once a non-blocking copy of the flag says it is clear. ``late``:
    the optimizer was past its first step when the parameter joined (its first
    taken step is then an SGD step of its own, see ``BucketPlan.first_steps``)."""

    __slots__ = ("param", "stale", "late", "host", "event")

    def __init__(self, param: Tensor, stale: Tensor, late: bool = False):
        self.param = param
        self.stale = stale.clone()
        self.late = late
        self.host: Tensor | None = None
        self.event = None
        self._mirror()

    def _mirror(self) -> None:
        cuda = self.stale.is_cuda
        if self.host is None:
            self.host = torch.ones((), dtype=torch.bool, pin_memory=cuda)
        self.host.copy_(self.stale, non_blocking=cuda)
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def __getstate__(self) -> dict:
        # deepcopy / pickle: the flag itself; the host mirror (and its CUDA event) is remade.
        return {"param": self.param, "stale": self.stale, "late": self.late}

    def __setstate__(self, state: dict) -> None:
        self.param, self.stale, self.late = state["param"], state["stale"], state.get("late", False)
        self.host, self.event = None, None
        self._mirror()

    def cleared(self) -> bool:
        """Whether the flag is known (without waiting) to be clear."""
        if self.event is not None and not self.event.query():
            return False
        return not bool(self.host.numpy())  # a host tensor: no device read, no aten::item

    def update(self, skip: Tensor | None) -> None:
        """After a step: still stale only if this step was skipped too."""
        if skip is None:
            self.stale.zero_()
        else:
            self.stale.logical_and_(skip)
        self._mirror()
