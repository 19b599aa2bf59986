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

from .. import ops
from ..backends import BACKEND_NAMES, SUPPORTED_DTYPES, layout, resolve

BucketKey = tuple[int, torch.device, torch.dtype]


class Bucket:
    """The parameters of one (group, device, dtype) and their flat history."""

    def __init__(self, key: BucketKey, backend, members: list[Tensor], x_slots: int, g_slots: int,
                 count: Tensor, coef_len: int):
        _, device, dtype = key
        self.key = key
        self.backend = backend
        self.members = members
        self.device = device
        numels = [p.numel() for p in members]
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        self.offset_of = {id(p): off for p, off in zip(members, self.offsets)}
        self.numel = sum(numels)
        self.x_hist = torch.zeros(x_slots, self.numel, dtype=dtype, device=device)
        self.g_hist = torch.zeros(g_slots, self.numel, dtype=dtype, device=device)
        self.count = count
        self.coefs = torch.zeros(coef_len, dtype=torch.float64, device=device)
        self.coefs_seen: tuple | None = None
        self.gram = torch.zeros(coef_len, dtype=torch.float64, device=device)
        # The backend's private cache (pointer tables, work buffers), by handle:
        # a dict cannot cross a custom op's boundary.
        self.cache = ops.new_cache(self)

    def views(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The ring slots of ``p`` as ``(S, *p.shape)``, each slot strided like ``p``
        (a dense non-contiguous parameter keeps its columns in storage order)."""
        off, n = self.offset_of[id(p)], p.numel()
        order = layout.dim_order(p)
        return (layout.ring_view(self.x_hist[:, off:off + n], p, order),
                layout.ring_view(self.g_hist[:, off:off + n], p, order))


class Work:
    """One bucket's share of a step: the members that have a gradient now
    (``params``) and those that have none (``idle``: their rings are rolled to
    stay aligned). It is kept between steps while the set does not change, so
    that a compiled step guards on one object."""

    __slots__ = ("bucket", "group", "params", "offsets", "idle")

    def __init__(self, bucket: Bucket, group: dict, params: list[Tensor], idle: list[Tensor]):
        self.bucket, self.group, self.params, self.idle = bucket, group, params, idle
        self.offsets = [bucket.offset_of[id(p)] for p in params]

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


def effective_grad(p: Tensor, group: dict) -> Tensor:
    g = -p.grad if group["maximize"] else p.grad
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


def scheduler_ready(step):
    """Mark ``step`` as already tracked for torch's LR schedulers.

    A scheduler otherwise replaces ``optimizer.step`` by a wrapper (defined in
    torch/optim/lr_scheduler.py, a file Dynamo refuses to trace) that only sets
    ``optimizer._opt_called``; the step sets that itself (in ``_init_group``),
    so a compiled training step that calls ``opt.step()`` stays one graph."""
    step._wrapped_by_lr_sched = True
    return step


class BucketedOptimizer(Optimizer):
    """Base of the ring-history optimizers. Subclasses set the ring sizes and
    the step; this class owns buckets, validation and checkpoints."""

    _algorithm = "base"

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str):
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend
        self._buckets: dict[BucketKey, Bucket] = {}
        self._plan: list[Work] = []
        self._plan_key: tuple | None = None
        self._has_grad: list[list[bool]] = []
        self._settled = False
        super().__init__(params, defaults)

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
                resolve(self.backend, p.device, p.dtype)  # fail now, not at the first step
            if not (isinstance(group["lr"], Tensor) or group["lr"] >= 0):
                raise ValueError(f"invalid learning rate: {group['lr']}")
            self._tensor_lr(group)
            if group["weight_decay"] < 0:
                raise ValueError(f"invalid weight_decay: {group['weight_decay']}")
            self._validate_group(group)
            self._plan_key = None
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    # -- buckets --------------------------------------------------------
    def _group_index(self) -> dict[int, tuple[int, int]]:
        return {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}

    @staticmethod
    def _tensor_lr(group: dict) -> None:
        """Keep the group's learning rate in a 0-dim float64 tensor on its
        parameters' device: the kernels read it from memory, schedulers update
        it in place (``fill_``), and a compiled step reads it as an input instead
        of specialising on (and recompiling for) every float value."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["lr"] = torch.tensor(float(lr), dtype=torch.float64, device=device)

    @staticmethod
    def _lr(w: Work) -> Tensor:
        """The group's lr on the bucket's device (a device copy if elsewhere; no state write)."""
        lr = w.group["lr"]
        if not isinstance(lr, Tensor):  # a float assigned inside a compiled region
            return torch.full((), lr, dtype=torch.float64, device=w.bucket.device)
        return lr if lr.device == w.bucket.device else lr.to(w.bucket.device)

    def _init_group(self) -> None:
        """Host-side setup of a step: validate every gradient, then (only then)
        grow buckets and list the work (``self._plan``). Nothing here depends on
        the values of device tensors.

        Under ``torch.compile`` Dynamo runs a method of this name eagerly while
        tracing (as it does for torch.optim's ``_init_group``) and guards on
        which parameters have gradients, so the compiled graph holds only the
        per-step device work. A step in which a member has no gradient is not
        supported there: it raises."""
        self._opt_called = True  # what an LR scheduler's step wrapper would record
        self._settled = not torch.compiler.is_compiling()
        for group in self.param_groups:
            self._tensor_lr(group)
        wanted: dict[BucketKey, list[Tensor]] = defaultdict(list)
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    wanted[(gi, p.device, p.dtype)].append(p)
        self._membership_changed = False
        plan_key = []
        for key, active in wanted.items():
            group = self.param_groups[key[0]]
            bucket = self._buckets.get(key)
            if bucket is None or any(id(p) not in bucket.offset_of for p in active):
                bucket = self._rebuild(key, group, active, bucket)
            if len(active) != len(bucket.members):
                self._membership_changed = True
                if torch.compiler.is_compiling():
                    raise NotImplementedError(
                        "interpolatron under torch.compile: every parameter that has a history must "
                        "have a gradient at every step (this one has none for some); step this "
                        "optimizer eagerly for such steps")
            plan_key.append((id(bucket), tuple(id(p) for p in active)))
        plan_key = tuple(plan_key)
        if plan_key != self._plan_key:  # the same objects while nothing changes (compile guards)
            plan = []
            for key, active in wanted.items():
                bucket = self._buckets[key]
                have = {id(p) for p in active}
                plan.append(Work(bucket, self.param_groups[key[0]], active,
                                 [p for p in bucket.members if id(p) not in have]))
            self._plan, self._plan_key = plan, plan_key
        self._has_grad = [[p.grad is not None for p in g["params"]] for g in self.param_groups]

    def _setup(self) -> None:
        """:meth:`_init_group`, except in a compiled step that changes nothing.

        Under ``torch.compile`` the check below is traced (so the graph guards
        on which parameters have a gradient) and the host setup is skipped when
        it would do nothing: a whole training step (forward, backward, step)
        then compiles into one graph once the optimizer has taken a step (its
        first step must see real gradients: it builds the state)."""
        if torch.compiler.is_compiling():
            if self._ready():
                return
            self._init_group()
            # A traced attribute write: applied once the compiled step has run.
            # Until then _ready() stays False, so that a restarted analysis
            # (Dynamo retraces after some passes) takes the same path.
            self._settled = True
            return
        self._init_group()

    def _ready(self) -> bool:
        if not self._settled:
            return False
        if self._plan_key is None or len(self._has_grad) != len(self.param_groups):
            return False
        for group, expect in zip(self.param_groups, self._has_grad):
            if not isinstance(group["lr"], Tensor) or len(expect) != len(group["params"]):
                return False
            for p, e in zip(group["params"], expect):
                if (p.grad is not None) != e:
                    return False
        return True

    def _prepare(self) -> list[Work]:
        """The work of this step after :meth:`_init_group`; advances the rings of
        members without a gradient (device work, so it is traced)."""
        for w in self._plan:
            for p in w.idle:  # no gradient: keep its history aligned with the ring
                for view in w.bucket.views(p):
                    view.copy_(view.roll(1, 0))
        return self._plan

    def _rebuild(self, key: BucketKey, group: dict, active: list[Tensor], old: Bucket | None) -> Bucket:
        order = self._group_index()
        present = {id(p): p for p in (old.members if old else [])}
        if old is None:
            # After load_state_dict every parameter with a saved history is a
            # member again (as it was when saved), gradient or not: its ring
            # stays aligned and the saved Gram stays valid.
            _, device, dtype = key
            for p in group["params"]:
                st = self.state.get(p)
                if st and "x_hist" in st and p.device == device and p.dtype == dtype:
                    present[id(p)] = p
        present.update({id(p): p for p in active})
        # A new member (a first gradient) changes the optimizer's x; a bucket
        # rebuilt from a checkpoint with exactly its saved members does not.
        if old is not None or any("x_hist" not in self.state.get(p, {}) for p in present.values()):
            self._membership_changed = True
        members = sorted(present.values(), key=lambda p: order[id(p)])
        x_slots, g_slots = self._ring_slots(group)
        _, device, _ = key
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
                xv.copy_(st["x_hist"])
                gv.copy_(st["g_hist"])
            else:  # warm start: every missing slot holds x^(0), g^(0)
                xv.copy_(p.detach().unsqueeze(0).expand_as(xv))
                gv.copy_(effective_grad(p, group).unsqueeze(0).expand_as(gv))
            st["step"], st["x_hist"], st["g_hist"] = count, xv, gv
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
        self._forget_buckets()  # rebuilt at the next step from the per-parameter state

    def _forget_buckets(self) -> None:
        self._buckets = {}
        self._plan, self._plan_key, self._has_grad = [], None, []
        self._settled = False

    # -- copies (copy.deepcopy, pickle) ---------------------------------
    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups
    # only: keep this optimizer's own settings too, but not the buckets (their
    # rings are rebuilt from the per-parameter state, whose views the copy
    # holds, at the next step) nor the step hooks.
    _TRANSIENT = ("_buckets", "_plan", "_plan_key", "_has_grad", "_settled")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if key not in state and key not in self._TRANSIENT and not key.startswith("_optimizer_"):
                state[key] = value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forget_buckets()

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
                for (gi, dev, dt), b in self._buckets.items()}
