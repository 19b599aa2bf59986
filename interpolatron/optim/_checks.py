"""Checks of settings and gradients, shared by the constructors, ``add_param_group``,
``step`` and ``load_state_dict`` (one rule, whichever way a value arrives).

Every check raises before anything is written, so a refused value leaves the
optimizer as it was."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from ..backends import SUPPORTED_DTYPES


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a float: a real number (not a bool, not a string, not a
    tensor), finite, ``>= 0`` (``> 0`` if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if number < 0 or (positive and number == 0):
        raise ValueError(f"invalid {name}: {value!r} (must be {'> 0' if positive else '>= 0'})")
    return number


def check_lr(lr: Any, devices: set[torch.device], *, read: bool = True) -> None:
    """A learning rate: a real number, or a tensor with one element (0-dim or
    ``[1]``, as torch.optim accepts) on the parameters' device or the CPU;
    finite and non-negative. Reading a tensor's value synchronises with its
    device, so callers check a tensor's value (``read``) once per tensor
    object, not per step; its shape and device are checked every time."""
    if not isinstance(lr, Tensor):
        check_real("learning rate", lr)
        return
    if lr.numel() != 1 or lr.dim() > 1:
        raise ValueError(f"a tensor learning rate must be 0-dim or hold one element, "
                         f"got shape {tuple(lr.shape)}")
    if lr.is_complex() or lr.dtype == torch.bool:
        raise ValueError(f"a tensor learning rate must be real, got dtype {lr.dtype}")
    if lr.device.type != "cpu" and any(d != lr.device for d in devices):
        raise ValueError(f"a tensor learning rate must be on the parameters' device "
                         f"({', '.join(sorted(map(str, devices)))}) or the CPU, got {lr.device}")
    if not read:
        return
    value = float(lr.detach().reshape(()))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid learning rate: {value!r} (a tensor; must be finite and >= 0)")


# Group settings added after checkpoints were first written, with the value
# that reproduces the old behaviour: a saved group without them loads with it.
LATER_GROUP_KEYS: dict[str, Any] = {"stochastic_rounding": False, "sr_seed": 0}


def check_rounding(stochastic: Any, seed: Any) -> None:
    """``stochastic_rounding`` (a bool) and its ``sr_seed`` (an int in [0, 2^32))."""
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic_rounding must be True or False, got {stochastic!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"sr_seed must be an integer in [0, 2**32), got {seed!r}")


def check_maximize(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"maximize must be a bool, got {value!r}")


def check_param(p: Tensor) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"optimizer params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError("interpolatron does not support complex parameters; "
                        "view them as real with torch.view_as_real")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"parameter dtype {p.dtype} is not supported "
                        f"(supported: {', '.join(map(str, SUPPORTED_DTYPES))})")


def check_grad(p: Tensor) -> None:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError("interpolatron does not support sparse gradients")
    if g.is_complex():
        raise RuntimeError("interpolatron does not support complex gradients")
    if g.dtype != p.dtype:
        raise RuntimeError(f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype}")
    if g.device != p.device:
        raise RuntimeError(f"gradient on {g.device} but parameter on {p.device}")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")


def identical(a: Any, b: Any) -> bool:
    """The same value in the same form (0 and 0.0, a list and a tuple, differ):
    a step writes a checked setting back into its group only where it is not."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, Tensor):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b
