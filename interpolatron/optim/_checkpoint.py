"""Validation of a state_dict before ``load_state_dict`` changes anything.

:func:`plan_load` reads the whole state_dict, checks every entry, and returns
the param groups and the per-parameter state the optimizer will hold, as new
objects (every tensor copied to its parameter's device). Only then does the
optimizer swap them in, so a refused checkpoint leaves it bitwise unchanged.

The optimizer describes what it accepts in a :class:`CheckpointSpec` (its
algorithm, settings, ring sizes, state dtypes and its own extra state);
this module reads nothing else of it.

Cast rule: a history tensor may be saved in a wider floating dtype or on
another device when the cast to the parameter's dtype is exact (a float32
history saved as float64 loads; a float64 history that float32 cannot hold
does not, nor does one saved narrower, which lost digits). A ``step`` may be
a Python or NumPy integer, or a tensor of any real dtype holding a
non-negative integer (torch.optim saves float32 steps).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

HISTORY_KEYS = ("step", "x_hist", "g_hist")


@dataclass(frozen=True)
class CheckpointSpec:
    """What an optimizer accepts from a state_dict, as it stands now."""

    #: The ``interpolatron`` tag's algorithm a checkpoint must name (if it has the tag).
    algorithm: str
    #: The optimizer's param groups (the parameters a checkpoint's ids map to).
    param_groups: list[dict]
    #: The settings a saved param group must carry (but ``later_group_keys``).
    hyperparameter_keys: tuple[str, ...]
    #: Settings added after checkpoints were first written, with the value that
    #: reproduces the old behaviour: a saved group may lack them (filled in by
    #: ``validate_group``).
    later_group_keys: Mapping[str, Any]
    #: ``(x slots, g slots)`` of a group's rings.
    ring_slots: Callable[[dict], tuple[int, int]]
    #: The dtype of a parameter's rings.
    state_dtype: Callable[[Tensor], torch.dtype]
    #: Per-parameter state keys besides the histories, by parameter index.
    extra_state_keys: Callable[[int], tuple[str, ...]]
    #: Validates (and normalises, in place) one group's settings; raises ValueError.
    validate_group: Callable[[dict], None]
    #: Validates the rules across groups; raises ValueError.
    validate_groups: Callable[[list[dict]], None]
    #: ``(groups, params, state, bucket_steps)``: validates and copies the extra
    #: keys of the state being loaded, in place in ``state``.
    plan_extra_state: Callable[[list[dict], list[Tensor], dict, dict], None]


class CheckpointError(ValueError):
    """A state_dict this optimizer cannot resume from (nothing was changed)."""


def where(index: int, group: int, position: int) -> str:
    return f"parameter {index} (param group {group}, position {position})"


def load_tensor(value: Any, what: str, *, dtype: torch.dtype, device: torch.device,
                shape: tuple[int, ...], finite: bool = True) -> Tensor:
    """A copy of ``value`` as ``dtype`` on ``device`` with ``shape``, if the cast
    is exact (and the values finite, if ``finite``)."""
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{what} must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise CheckpointError(f"{what} is on the meta device (it holds no values)")
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype.is_floating_point and not value.is_floating_point():
        raise CheckpointError(f"{what} has dtype {value.dtype}, expected a floating dtype ({dtype})")
    if dtype == torch.bool and value.dtype != torch.bool:
        raise CheckpointError(f"{what} has dtype {value.dtype}, expected torch.bool")
    if dtype.is_floating_point and torch.promote_types(dtype, value.dtype) != value.dtype:
        # Narrower than the state it restores: it lost digits (our state_dict never saves that).
        raise CheckpointError(f"{what} has dtype {value.dtype}, which cannot hold every {dtype} value")
    value = value.detach()
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{what} holds non-finite values (NaN or inf)")
    out = value.to(device=device, dtype=dtype, copy=True)
    if value.dtype != dtype and not torch.equal(out.to(device=value.device, dtype=value.dtype), value):
        raise CheckpointError(f"{what} has dtype {value.dtype} and values that {dtype} cannot hold exactly")
    return out


def load_count(value: Any, what: str, device: torch.device) -> Tensor:
    """A step/record count: a non-negative integer, as a 0-dim int64 tensor on ``device``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise CheckpointError(f"{what} must hold one number, got shape {tuple(value.shape)}")
        if value.device.type == "meta" or value.is_complex() or value.dtype == torch.bool:
            raise CheckpointError(f"{what} must be a real number on a real device, got {value.dtype} "
                                  f"on {value.device}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckpointError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if value != value or value in (float("inf"), -float("inf")) or value != int(value) or value < 0:
        raise CheckpointError(f"{what} must be a non-negative integer, got {value!r}")
    if int(value) >= 2 ** 62:
        raise CheckpointError(f"{what} is implausibly large: {value!r}")
    return torch.tensor(int(value), dtype=torch.int64, device=device)


def plan_load(spec: CheckpointSpec, state_dict: Any) -> tuple[list[dict], dict[Tensor, dict]]:
    """The param groups and state the optimizer ``spec`` describes holds after loading ``state_dict``,
    or a :class:`CheckpointError` saying what is wrong (naming the group, the
    parameter and the key)."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise CheckpointError("a state_dict is a mapping with 'state' and 'param_groups'")
    tag = state_dict.get("interpolatron")
    if tag is not None:
        algorithm = tag.get("algorithm") if isinstance(tag, Mapping) else None
        if algorithm != spec.algorithm:
            raise CheckpointError(f"state_dict was saved by {algorithm}, not {spec.algorithm}")
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise CheckpointError(f"state_dict['state'] must be a dict, got {type(saved_state).__name__}")
    if "anderson" in saved_state:
        raise CheckpointError(
            "this checkpoint has the old layout with an optimizer-wide state['anderson'] entry; "
            "it cannot be converted (its param groups lack history, reg, constraint and singular_tol): "
            "resume it with the interpolatron version that wrote it")
    groups = _plan_groups(spec, state_dict["param_groups"])
    params = [p for g in groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    index_of = {sid: i for i, sid in enumerate(saved_ids)}
    if len(index_of) != len(saved_ids):
        raise CheckpointError("state_dict param groups list a parameter id twice")
    position = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]

    state: dict[Tensor, dict] = {}
    bucket_steps: dict[tuple, tuple[int, int]] = {}
    for sid, entry in saved_state.items():
        if isinstance(sid, bool) or sid not in index_of:
            raise CheckpointError(f"state_dict['state'] has an entry {sid!r} that no param group lists "
                                  f"(state is keyed by parameter ids only)")
        index = index_of[sid]
        gi, pi = position[index]
        p, group = params[index], groups[gi]
        name = where(index, gi, pi)
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"state of {name} must be a dict, got {type(entry).__name__}")
        extra = set(spec.extra_state_keys(index))
        ring_dtype = spec.state_dtype(p)  # float32 for a 16-bit parameter with a master copy
        has_master = ring_dtype != p.dtype
        unknown = [k for k in entry if k not in HISTORY_KEYS and k not in extra
                   and not (has_master and k == "master")]
        if unknown:
            raise CheckpointError(f"state of {name} has unknown key {unknown[0]!r} "
                                  f"(a checkpoint of another optimizer?)")
        new: dict[str, Any] = {}
        present = [k for k in HISTORY_KEYS if k in entry]
        if present and len(present) != len(HISTORY_KEYS):
            missing = next(k for k in HISTORY_KEYS if k not in entry)
            raise CheckpointError(f"state of {name} lacks {missing!r} (it has {present})")
        if present:
            x_slots, g_slots = spec.ring_slots(group)
            new["x_hist"] = load_tensor(entry["x_hist"], f"state of {name}, key 'x_hist'", dtype=ring_dtype,
                                        device=p.device, shape=(x_slots, *p.shape))
            new["g_hist"] = load_tensor(entry["g_hist"], f"state of {name}, key 'g_hist'", dtype=ring_dtype,
                                        device=p.device, shape=(g_slots, *p.shape))
            new["step"] = load_count(entry["step"], f"state of {name}, key 'step'", p.device)
            # One count per bucket (group, device, parameter dtype): its members' rings are aligned.
            key, count = (gi, p.device, p.dtype), int(new["step"])
            other = bucket_steps.setdefault(key, (index, count))
            if other[1] != count:
                raise CheckpointError(
                    f"state of {name}, key 'step' is {count}, but parameter {other[0]} of the same param "
                    f"group, device and dtype has step {other[1]}: their histories cannot be aligned")
        if "master" in entry and has_master:
            new["master"] = load_tensor(entry["master"], f"state of {name}, key 'master'",
                                        dtype=torch.float32, device=p.device, shape=tuple(p.shape))
        for k in extra & set(entry):
            new[k] = entry[k]  # validated and copied by the subclass below
        state[p] = new
    spec.plan_extra_state(groups, params, state, {k: v[1] for k, v in bucket_steps.items()})
    return groups, state


def _plan_groups(spec: CheckpointSpec, saved_groups: Any) -> list[dict]:
    if not isinstance(saved_groups, (list, tuple)):
        raise CheckpointError(f"state_dict['param_groups'] must be a list, got {type(saved_groups).__name__}")
    if len(saved_groups) != len(spec.param_groups):
        raise CheckpointError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                              f"{len(spec.param_groups)}")
    groups = []
    for i, (mine, saved) in enumerate(zip(spec.param_groups, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise CheckpointError(f"param group {i} of the state_dict is not a dict with a 'params' list")
        if len(saved["params"]) != len(mine["params"]):
            raise CheckpointError(f"param group {i}: the state_dict has {len(saved['params'])} parameters, "
                                  f"the optimizer {len(mine['params'])}")
        missing = [k for k in spec.hyperparameter_keys if k not in saved and k not in spec.later_group_keys]
        if missing:
            raise CheckpointError(f"param group {i} of the state_dict lacks {missing[0]!r} "
                                  f"(saved by another optimizer?)")
        # (a later setting missing here is filled in by _validate_group)
        trial = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
        trial["params"] = mine["params"]
        if "param_names" in mine and "param_names" not in trial:
            trial["param_names"] = mine["param_names"]
        try:
            spec.validate_group(trial)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"param group {i} of the state_dict: {exc}") from exc
        if spec.ring_slots(trial) != spec.ring_slots(mine):
            raise CheckpointError(
                f"param group {i}: the state_dict's settings need ring sizes {list(spec.ring_slots(trial))}, "
                f"this optimizer {list(spec.ring_slots(mine))} (a different number of steps k: build the "
                f"optimizer with the k it was saved with)")
        groups.append(trial)
    try:
        spec.validate_groups(groups)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the state_dict's param groups: {exc}") from exc
    ids = [id(p) for p in chain.from_iterable(g["params"] for g in groups)]
    assert len(ids) == len(set(ids))  # add_param_group refuses duplicates
    return groups
