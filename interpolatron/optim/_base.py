"""What Interpolatron and Anderson share: parameter buckets with flat ring
histories, input validation, backend resolution and checkpointing.

A bucket holds the parameters of one param group on one device with one dtype
that have state. Its rings are two flat buffers; each parameter's state holds
*views* into them (``state[p]["x_hist"]`` has shape ``(S, *p.shape)``), so
``state_dict()`` looks like any ``torch.optim`` state and ``load_state_dict``
can rebuild the buckets from it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends import BACKEND_NAMES, SUPPORTED_DTYPES, resolve
from ..sharding import (
    as_history,
    check_grad_layout,
    group_key,
    history_placements,
    is_dtensor,
    local,
    reduction_key,
)

# (group index, device, dtype, reduction key): the reduction key (the process
# groups that hold the other shards, () for none) keeps parameters whose dot
# products are summed over different groups in different buckets.
BucketKey = tuple[int, torch.device, torch.dtype, tuple]


class Bucket:
    """The parameters of one (group, device, dtype, reduction) and their flat
    history. The rings hold each member's local shard (the whole tensor when
    it is not sharded); ``members`` are the optimizer's parameters themselves."""

    def __init__(self, key: BucketKey, backend, members: list[Tensor], x_slots: int, g_slots: int,
                 count: Tensor, coef_len: int):
        device, dtype = key[1], key[2]
        self.key = key
        self.reduction = key[3]
        self.backend = backend
        self.members = members
        self.locals = [local(p) for p in members]
        numels = [t.numel() for t in self.locals]
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        self.offset_of = {id(p): off for p, off in zip(members, self.offsets)}
        self.numel = sum(numels)
        self.x_hist = torch.zeros(x_slots, self.numel, dtype=dtype, device=device)
        self.g_hist = torch.zeros(g_slots, self.numel, dtype=dtype, device=device)
        self.count = count
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.lr_seen: float | None = None
        self.coefs = torch.zeros(coef_len, dtype=torch.float64, device=device)
        self.coefs_seen: tuple | None = None
        self.gram = torch.zeros(coef_len, dtype=torch.float64, device=device)
        self.cache: dict = {}

    def views(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``p``'s local history views ``(S, *local_shape)``."""
        off, t = self.offset_of[id(p)], local(p)
        n = t.numel()
        return (self.x_hist[:, off:off + n].view(self.x_hist.shape[0], *t.shape),
                self.g_hist[:, off:off + n].view(self.g_hist.shape[0], *t.shape))


class Work:
    """One bucket's share of a step: the members that have a gradient now.
    ``params`` and ``grads`` are the local shards the backends work on, ``keys``
    the optimizer's parameters they belong to."""

    __slots__ = ("bucket", "group", "keys", "params", "grads", "offsets")

    def __init__(self, bucket: Bucket, group: dict, keys: list[Tensor]):
        self.bucket, self.group, self.keys = bucket, group, keys
        self.params = [local(p) for p in keys]
        self.grads = [local(p.grad) for p in keys]
        self.offsets = [bucket.offset_of[id(p)] for p in keys]


def effective_grad(p: Tensor, group: dict, grad: Tensor | None = None) -> Tensor:
    grad = p.grad if grad is None else grad
    g = -grad if group["maximize"] else grad
    return g + group["weight_decay"] * p.detach() if group["weight_decay"] != 0 else g


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
    check_grad_layout(p)


def _local_history(saved: Tensor, p: Tensor) -> Tensor:
    """The local rows of a saved history for ``p``'s shard: a DTensor is first
    laid out like ``p`` (a checkpoint may come from another layout); a plain
    tensor saved unsharded is split like ``p``."""
    if not is_dtensor(p):
        return local(saved) if not is_dtensor(saved) else saved.full_tensor()
    from torch.distributed.tensor import distribute_tensor

    target = history_placements(p)
    if is_dtensor(saved):
        if saved.device_mesh != p.device_mesh or tuple(saved.placements) != tuple(target):
            saved = saved.redistribute(p.device_mesh, target)
        return saved.to_local()
    return distribute_tensor(saved, p.device_mesh, target).to_local()


class BucketedOptimizer(Optimizer):
    """Base of the ring-history optimizers. Subclasses set the ring sizes and
    the step; this class owns buckets, validation and checkpoints."""

    _algorithm = "base"

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str, process_group: Any = None):
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend
        self.process_group = process_group
        self._buckets: dict[BucketKey, Bucket] = {}
        super().__init__(params, defaults)

    def _reductions(self) -> list[tuple]:
        """Every reduction key of this optimizer's parameters, in parameter order
        (the same on every rank: collectives are issued in this order), plus the
        ``process_group``'s own (a ZeRO rank may own no parameter, yet it must
        join the sum)."""
        keys = [reduction_key(p, self.process_group) for g in self.param_groups for p in g["params"]]
        if self.process_group is not None:
            keys.append(group_key(self.process_group))
        return [k for k in dict.fromkeys(keys) if k]

    # -- subclass hooks -------------------------------------------------
    def _ring_slots(self, group: dict) -> tuple[int, int]:
        raise NotImplementedError

    def _coef_len(self, group: dict) -> int:
        raise NotImplementedError

    def _validate_group(self, group: dict) -> None:
        pass

    # -- param groups ---------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                check_param(p)
                reduction_key(p, self.process_group)  # a Partial placement fails now
                resolve(self.backend, p.device, p.dtype)  # fail now, not at the first step
            if not (isinstance(group["lr"], Tensor) or group["lr"] >= 0):
                raise ValueError(f"invalid learning rate: {group['lr']}")
            if group["weight_decay"] < 0:
                raise ValueError(f"invalid weight_decay: {group['weight_decay']}")
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    # -- buckets --------------------------------------------------------
    def _group_index(self) -> dict[int, tuple[int, int]]:
        return {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}

    def _prepare(self) -> list[Work]:
        """Validate every gradient, then (only then) grow buckets, advance the
        rings of members without a gradient, and list the work of this step."""
        wanted: dict[BucketKey, list[Tensor]] = defaultdict(list)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    wanted[(gi, p.device, p.dtype, reduction_key(p, self.process_group))].append(p)
        self._membership_changed = False
        work = []
        for key, active in wanted.items():
            group = self.param_groups[key[0]]
            bucket = self._buckets.get(key)
            if bucket is None or any(id(p) not in bucket.offset_of for p in active):
                bucket = self._rebuild(key, group, active, bucket)
            if len(active) != len(bucket.members):
                self._membership_changed = True
                have = {id(p) for p in active}
                for p in bucket.members:
                    if id(p) not in have:  # no gradient: keep its history aligned with the ring
                        for view in bucket.views(p):
                            view.copy_(view.roll(1, 0))
            work.append(Work(bucket, group, active))
        return work

    def _rebuild(self, key: BucketKey, group: dict, active: list[Tensor], old: Bucket | None) -> Bucket:
        order = self._group_index()
        present = {id(p): p for p in (old.members if old else [])}
        if old is None:
            # After load_state_dict every parameter with a saved history is a
            # member again (as it was when saved), gradient or not: its ring
            # stays aligned and the saved Gram stays valid.
            device, dtype = key[1], key[2]
            for p in group["params"]:
                st = self.state.get(p)
                if (st and "x_hist" in st and p.device == device and p.dtype == dtype
                        and reduction_key(p, self.process_group) == key[3]):
                    present[id(p)] = p
        present.update({id(p): p for p in active})
        # A new member (a first gradient) changes the optimizer's x; a bucket
        # rebuilt from a checkpoint with exactly its saved members does not.
        if old is not None or any("x_hist" not in self.state.get(p, {}) for p in present.values()):
            self._membership_changed = True
        members = sorted(present.values(), key=lambda p: order[id(p)])
        x_slots, g_slots = self._ring_slots(group)
        device = key[1]
        if old is not None:
            count = old.count
        else:
            loaded = [self.state[p]["step"] for p in members if "step" in self.state[p]]
            count = (loaded[0].to(device=device, dtype=torch.int64).clone() if loaded
                     else torch.zeros((), dtype=torch.int64, device=device))
        bucket = Bucket(key, resolve(self.backend, device, key[2]), members, x_slots, g_slots,
                        count, self._coef_len(group))
        for p in members:
            st = self.state[p]
            xv, gv = bucket.views(p)
            if "x_hist" in st:
                xv.copy_(_local_history(st["x_hist"], p))
                gv.copy_(_local_history(st["g_hist"], p))
            else:  # warm start: every missing slot holds x^(0), g^(0)
                x = local(p).detach()
                xv.copy_(x.unsqueeze(0).expand_as(xv))
                gv.copy_(effective_grad(x, group, local(p.grad)).unsqueeze(0).expand_as(gv))
            st["step"], st["x_hist"], st["g_hist"] = count, as_history(xv, p), as_history(gv, p)
        self._buckets[key] = bucket
        return bucket

    @staticmethod
    def _closure_loss(closure):
        """The loss of ``closure`` evaluated with gradients on (``step`` runs under no_grad)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _sync_lr(bucket: Bucket, group: dict) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            bucket.lr.copy_(lr)  # a device copy: a captured graph replays the current value
        elif lr != bucket.lr_seen:
            bucket.lr.fill_(lr)
            bucket.lr_seen = lr

    @staticmethod
    def _advance(work: list[Work]) -> None:
        counts = [w.bucket.count for w in work]
        if counts:
            torch._foreach_add_(counts, 1)

    # -- checkpoints ----------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"algorithm": self._algorithm,
                "ring_slots": [list(self._ring_slots(g)) for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["interpolatron"] = self._config()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        theirs = state_dict.get("interpolatron")
        if theirs is None:
            raise ValueError(f"this state_dict was not saved by an interpolatron optimizer; "
                             f"{type(self).__name__} cannot resume from it")
        ours = self._config()
        if theirs["algorithm"] != ours["algorithm"]:
            raise ValueError(f"state_dict was saved by {theirs['algorithm']}, not {ours['algorithm']}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for i, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {i}: the state_dict has {len(saved['params'])} parameters, "
                                 f"the optimizer {len(mine['params'])}")
            trial = dict(mine, **{k: v for k, v in saved.items() if k != "params"})
            self._validate_group(trial)
            # Both this optimizer's configuration and the saved hyperparameters
            # (which loading restores) must fit the saved history.
            for needed in (list(self._ring_slots(mine)), list(self._ring_slots(trial))):
                if needed != theirs["ring_slots"][i]:
                    raise ValueError(
                        f"param group {i}: the state_dict's history has ring sizes "
                        f"{theirs['ring_slots'][i]}, this configuration needs {needed} "
                        f"(a different number of steps k, or a checkpoint of an older layout)")
        self._check_state_shapes(state_dict, theirs)
        state_dict = {k: v for k, v in state_dict.items() if k != "interpolatron"}
        super().load_state_dict(state_dict)
        # Optimizer-wide entries pass through torch's loader uncopied: detach
        # them from the source optimizer.
        for key, value in list(self.state.items()):
            if not isinstance(key, Tensor) and isinstance(value, dict):
                self.state[key] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in value.items()}
        self._buckets = {}  # rebuilt at the next step from the per-parameter state

    def _check_state_shapes(self, state_dict: dict, config: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for index, st in state_dict["state"].items():
            if not isinstance(index, int) or "x_hist" not in st:
                continue
            p = params[index]
            if tuple(st["x_hist"].shape[1:]) != tuple(p.shape):
                raise ValueError(f"state_dict history of parameter {index} has shape "
                                 f"{tuple(st['x_hist'].shape[1:])}, the parameter {tuple(p.shape)}")

    # -- introspection --------------------------------------------------
    def backends_in_use(self) -> dict[str, str]:
        """Which backend serves each bucket (after the first step)."""
        return {f"group{gi}/{dev}/{str(dt).removeprefix('torch.')}": b.backend.name
                for (gi, dev, dt, *_), b in self._buckets.items()}
