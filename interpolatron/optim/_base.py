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
from ..backends import BACKEND_NAMES, canonical_name, layout, resolve
from ..layout import padded_offsets
from ..sharding import (
    as_history,
    check_grad_layout,
    group_key,
    history_placements,
    is_dtensor,
    local,
    reduction_key,
)
from ._amp import NO_AMP, AmpStep, StaleWarmStart
from ._checkpoint import plan_load
from ._checks import (
    LATER_GROUP_KEYS,
    check_grad,
    check_lr,
    check_maximize,
    check_param,
    check_real,
    check_rounding,
)

__all__ = ["Bucket", "BucketedOptimizer", "Work", "check_grad", "check_param"]

# (group index, device, dtype, reduction key): the reduction key (the process
# groups that hold the other shards, () for none) keeps parameters whose dot
# products are summed over different groups in different buckets.
BucketKey = tuple[int, torch.device, torch.dtype, tuple]

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Columns per chunk when a skipped parameter's ring entries move one slot on.
ROTATE_CHUNK = 1 << 16


class Bucket:
    """The parameters of one (group, device, dtype, reduction) and their flat
    history. The rings hold each member's local shard (the whole tensor when
    it is not sharded); ``members`` are the optimizer's parameters themselves."""

    def __init__(self, key: BucketKey, backend, members: list[Tensor], x_slots: int, g_slots: int,
                 count: Tensor, coef_len: int):
        device, dtype = key[1], key[2]
        self.key = key
        self.reduction = key[3] if len(key) > 3 else ()
        self.backend = backend
        self.members = members
        self.device = device
        self.sharded = any(is_dtensor(p) for p in members)
        # Each member's columns start on a 128-byte boundary (aligned vector accesses).
        self.offsets, self.numel = padded_offsets([local(p).numel() for p in members], dtype.itemsize)
        self.offset_of = {id(p): off for p, off in zip(members, self.offsets)}
        self.x_hist = torch.zeros(x_slots, self.numel, dtype=dtype, device=device)
        self.g_hist = torch.zeros(g_slots, self.numel, dtype=dtype, device=device)
        self.count = count
        self.coefs = torch.zeros(coef_len, dtype=torch.float64, device=device)
        self.coefs_seen: tuple | None = None
        self.gram = torch.zeros(coef_len, dtype=torch.float64, device=device)
        # The backend's private cache (pointer tables, work buffers), by handle:
        # a dict cannot cross a custom op's boundary.
        self.cache = ops.new_cache(self)

    def rotate(self, p: Tensor, skip: Tensor | None = None) -> None:
        """Move ``p``'s ring entries one slot on (slot ``s`` takes slot ``s - 1``'s
        entry, slot 0 the last's), column chunk by column chunk: the only
        temporary is one chunk, whatever the parameter's size. ``skip`` (a
        device bool, GradScaler's skipped step): the entries stay where they are."""
        off, n = self.offset_of[id(p)], local(p).numel()
        for ring in (self.x_hist, self.g_hist):
            slots = ring.shape[0]
            if slots < 2:
                continue
            for start in range(off, off + n, ROTATE_CHUNK):
                cols = ring[:, start:min(start + ROTATE_CHUNK, off + n)]
                if skip is not None:
                    cols.copy_(torch.where(skip, cols, cols.roll(1, 0)))
                    continue
                last = cols[slots - 1].clone()
                for s in range(slots - 1, 0, -1):
                    cols[s].copy_(cols[s - 1])
                cols[0].copy_(last)

    def views(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The ring slots of ``p``'s local shard (``p`` itself when it is not
        sharded) as ``(S, *local_shape)``, each slot strided like the shard (a
        dense non-contiguous tensor keeps its columns in storage order)."""
        off, t = self.offset_of[id(p)], local(p)
        n = t.numel()
        order = layout.dim_order(t)
        return (layout.ring_view(self.x_hist[:, off:off + n], t, order),
                layout.ring_view(self.g_hist[:, off:off + n], t, order))


class Work:
    """One bucket's share of a step: the members that have a gradient now
    (``keys``, the optimizer's parameters) and those that have none (``idle``:
    their rings are rotated to stay aligned). ``params`` and ``grads`` are the
    local shards the backends work on (``keys`` and their gradients when the
    bucket is not sharded). It is kept between steps while the set does not
    change, so that a compiled step guards on one object."""

    __slots__ = ("bucket", "group", "keys", "params", "offsets", "idle")

    def __init__(self, bucket: Bucket, group: dict, keys: list[Tensor], idle: list[Tensor]):
        self.bucket, self.group, self.keys, self.idle = bucket, group, keys, idle
        # A DTensor's local tensor is a fixed attribute: the list stays valid.
        self.params = [local(p) for p in keys] if bucket.sharded else keys
        self.offsets = [bucket.offset_of[id(p)] for p in keys]

    @property
    def grads(self) -> list[Tensor]:
        if self.bucket.sharded:
            return [local(p.grad) for p in self.keys]
        return [p.grad for p in self.params]


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
    the step; this class owns buckets, validation and checkpoints.

    What is checked when (no check reads a device value inside ``step``, so a
    step never waits for the device):

    * ``add_param_group`` and ``load_state_dict``: every setting, a tensor
      ``lr``'s shape, device and value included (reading the value syncs once).
    * ``step``, before anything is written: every setting again (they are
      plain Python values a user may change between steps), the gradients,
      that k has not changed, and a tensor ``lr``'s value only when the group
      holds a different tensor object than at the last check. A value written
      in place into the same tensor (a scheduler on a captured graph) is not
      re-read: that would cost a host sync per step.
    """

    _algorithm = "base"
    # Settings a saved group may lack (added later), with their old behaviour's value.
    _later_group_keys = LATER_GROUP_KEYS
    # GradScaler's fused contract: step() takes grad_scale / found_inf (see _amp.py).
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str,
                 master_weights: bool = False, process_group: Any = None):
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be True or False, got {master_weights!r}")
        self.master_weights = master_weights
        backend = canonical_name(backend)
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend
        self.process_group = process_group
        # id(p) -> (p, its reduction key): computed once per parameter (placements
        # do not change), not per parameter per step.
        self._reduction_of: dict[int, tuple[Tensor, tuple]] = {}
        self._has_dtensors = False  # else every parameter's key is the process group's (the fast path)
        self._buckets: dict[BucketKey, Bucket] = {}
        # The settings a saved param group must carry (not what torch adds later).
        self._hyperparameter_keys = tuple(defaults)
        self._lr_checked: dict[int, Tensor] = {}  # group index -> the tensor lr last validated
        self._stale_warm: list[StaleWarmStart] = []
        self._amp = NO_AMP
        self._plan: list[Work] = []
        self._plan_key: tuple | None = None
        self._has_grad: list[list[bool]] = []
        self._settled = False
        super().__init__(params, defaults)

    def _reduction(self, p: Tensor) -> tuple:
        """The process groups ``p``'s dot products are summed over (cached)."""
        if not getattr(self, "_has_dtensors", True):
            return self._plain_reduction()
        cache = self.__dict__.get("_reduction_of")
        if cache is None:
            cache = self._reduction_of = {}
        entry = cache.get(id(p))
        if entry is None or entry[0] is not p:
            entry = cache[id(p)] = (p, reduction_key(p, getattr(self, "process_group", None)))
        return entry[1]

    def _plain_reduction(self) -> tuple:
        key = self.__dict__.get("_plain_key")
        if key is None:
            key = self._plain_key = group_key(getattr(self, "process_group", None))
        return key

    def _reductions(self) -> list[tuple]:
        """Every reduction key of this optimizer's parameters, in parameter order
        (the same on every rank: collectives are issued in this order), plus the
        ``process_group``'s own (a ZeRO rank may own no parameter, yet it must
        join the sum)."""
        if not getattr(self, "_has_dtensors", True):
            plain = self._plain_reduction()
            return [plain] if plain else []
        params = tuple(id(p) for g in self.param_groups for p in g["params"])
        cached = self.__dict__.get("_reduction_list")
        if cached is None or cached[0] != params:
            keys = [self._reduction(p) for g in self.param_groups for p in g["params"]]
            group = getattr(self, "process_group", None)
            if group is not None:
                keys.append(group_key(group))
            cached = self._reduction_list = (params, [k for k in dict.fromkeys(keys) if k])
        return cached[1]

    # -- subclass hooks -------------------------------------------------
    def _ring_slots(self, group: dict) -> tuple[int, int]:
        raise NotImplementedError

    def _coef_len(self, group: dict) -> int:
        raise NotImplementedError

    def _validate_group(self, group: dict, read_lr: bool = True) -> None:
        """Every setting of one group (raises ValueError); may normalise values.
        ``read_lr=False``: a tensor lr's value is not read (see the class doc)."""
        check_lr(group["lr"], {p.device for p in group["params"]}, read=read_lr)
        group["weight_decay"] = check_real("weight_decay", group["weight_decay"])
        check_maximize(group["maximize"])
        for key, value in self._later_group_keys.items():  # a group added as a dict without them
            group.setdefault(key, value)
        check_rounding(group["stochastic_rounding"], group["sr_seed"])
        if group["stochastic_rounding"] and getattr(self, "master_weights", False):
            raise ValueError("stochastic_rounding and master_weights exclude each other: a master copy "
                             "keeps the small updates already (its 16-bit parameter is rounded to nearest)")

    @staticmethod
    def _sr_seed(group: dict) -> int | None:
        """The seed ``combine`` rounds this group's 16-bit writes with (None: to nearest)."""
        return group["sr_seed"] if group["stochastic_rounding"] else None

    def _validate_groups(self, groups: list[dict]) -> None:
        """Rules across groups (Anderson's optimizer-wide settings)."""

    def _extra_state_keys(self, index: int) -> tuple[str, ...]:
        """Per-parameter state keys besides the histories (Anderson's anchor)."""
        return ()

    def _plan_extra_state(self, groups: list[dict], params: list[Tensor], state: dict,
                          bucket_steps: dict) -> None:
        """Validate and copy the extra keys of a state being loaded (in place in ``state``)."""

    def _check_k_unchanged(self) -> None:
        """The groups' settings still fit the histories that exist."""
        for gi, group in enumerate(self.param_groups):
            slots = self._ring_slots(group)
            for (bgi, *_), b in self._buckets.items():
                if bgi == gi and (b.x_hist.shape[0], b.g_hist.shape[0]) != slots:
                    raise ValueError(f"param group {gi}: the number of steps k cannot change once the "
                                     f"history exists; build a new optimizer instead")
            if not any(key[0] == gi for key in self._buckets):  # loaded, no step yet
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "x_hist" in st and (st["x_hist"].shape[0], st["g_hist"].shape[0]) != slots:
                        raise ValueError(f"param group {gi}: the number of steps k cannot change once "
                                         f"the history exists; build a new optimizer instead")

    # -- param groups ---------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (Tensor, set)):
            param_group["params"] = list(param_group.get("params", ()))
            seen: set[int] = set()
            for p in param_group["params"]:
                t = p[1] if isinstance(p, tuple) else p
                if id(t) in seen:
                    raise ValueError("a parameter group lists the same parameter twice "
                                     "(it would be updated twice per step)")
                seen.add(id(t))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                check_param(p)
                if is_dtensor(p):
                    reduction_key(p)  # a Partial placement fails now
                    self._has_dtensors = True
                resolve(self.backend, p.device, p.dtype)  # fail now, not at the first step
            self._validate_group(group)
            self._validate_groups(self.param_groups)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        self._tensor_lr(group)
        self._plan_key = None
        if isinstance(group["lr"], Tensor):
            self._lr_checked[len(self.param_groups) - 1] = group["lr"]

    def _check_step(self) -> None:
        """Everything a step needs, before it writes anything."""
        has_dtensors = getattr(self, "_has_dtensors", True)
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            try:
                self._validate_group(group, read_lr=self._lr_checked.get(gi) is not lr)
            except ValueError as exc:
                raise ValueError(f"param group {gi}: {exc}") from exc
            if isinstance(lr, Tensor):
                self._lr_checked[gi] = lr
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    if has_dtensors:
                        check_grad_layout(p)
        self._validate_groups(self.param_groups)
        self._check_k_unchanged()

    # -- 16-bit parameters: float32 master weights --------------------------
    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s rings (float32 for a 16-bit parameter with a master copy)."""
        return torch.float32 if self.master_weights and p.dtype in LOW_PRECISION else p.dtype

    def _enter_master(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """For the step, a 16-bit parameter with a master copy *is* its float32
        master (``p.data`` swapped) with a float32 copy of its gradient, so every
        backend runs the float32 math on float32 rings unchanged. Returns what
        :meth:`_exit_master` puts back."""
        swapped: list[tuple[Tensor, Tensor, Tensor | None]] = []
        if not self.master_weights:
            return swapped
        if torch.compiler.is_compiling():
            # The swap rebinds parameters' storage (p.data), which a compiled
            # graph cannot express; refuse instead of training something else.
            raise NotImplementedError("master_weights=True is not supported inside torch.compile: "
                                      "step this optimizer eagerly")
        fresh: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in LOW_PRECISION:
                    continue
                master = self.state[p].get("master") if p in self.state else None
                if master is None:
                    if p.grad is None:
                        continue
                    master = self.state[p]["master"] = torch.empty_like(p, dtype=torch.float32)
                    fresh.append((master, p.detach()))
                swapped.append((p, master, p.grad))
        # One multi-tensor copy per direction: per-tensor casting copies measured
        # 20-50x slower on the CPU (ResNet-50 x 0.25, bf16: 229 ms against 4.6 ms).
        if fresh:
            torch._foreach_copy_([m for m, _ in fresh], [v for _, v in fresh])
        with_grad = [(p, g) for p, _, g in swapped if g is not None]
        grads32 = [torch.empty_like(g, dtype=torch.float32) for _, g in with_grad]
        if grads32:
            torch._foreach_copy_(grads32, [g for _, g in with_grad])
        up = {id(p): g32 for (p, _), g32 in zip(with_grad, grads32)}
        out = []
        for p, master, grad in swapped:
            low = p.data
            p.data = master
            if grad is not None:
                p.grad = up[id(p)]
            out.append((p, low, grad))
        return out

    @staticmethod
    def _exit_master(swapped: list[tuple[Tensor, Tensor, Tensor | None]]) -> None:
        """Put the 16-bit parameters back, each the rounded (nearest-even) master."""
        lows, masters = [], []
        for p, low, grad in swapped:
            masters.append(p.data)
            lows.append(low)
            p.data = low
            p.grad = grad
        if lows:
            torch._foreach_copy_(lows, masters)

    # -- buckets --------------------------------------------------------
    def _group_index(self) -> dict[int, tuple[int, int]]:
        return {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}

    def _amp_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> AmpStep:
        """GradScaler's inputs of this step: the keyword arguments, else the
        attributes ``GradScaler.step`` sets on the optimizer. Checked (shapes,
        not values) before anything is written."""
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return NO_AMP
        return AmpStep(grad_scale, found_inf)

    def _begin_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> AmpStep:
        """A step's GradScaler inputs (kept for the warm starts of :meth:`_init_group`);
        with master weights the checks run first, before a parameter becomes its master."""
        amp = self._amp_step(grad_scale, found_inf)
        if self.master_weights and not torch.compiler.is_compiling():
            self._check_step()
        self._amp = amp
        return amp

    def _end_step(self, swapped: list) -> None:
        self._amp = NO_AMP
        self._exit_master(swapped)

    def _refresh_stale_warm_starts(self, amp: AmpStep) -> None:
        """Refill the g rings warm-started in steps that were (maybe) skipped
        from this step's gradient, where the device flag says so."""
        if not self._stale_warm:
            return
        where = {id(p): g for g in self.param_groups for p in g["params"]}
        kept = []
        for entry in self._stale_warm:
            p = entry.param
            if entry.cleared():
                continue
            kept.append(entry)
            st = self.state.get(p, {})
            if p.grad is None or "g_hist" not in st or st["g_hist"].shape[0] == 0:
                continue
            gv = st["g_hist"]
            fresh = torch.empty_like(gv[0])
            self._effective_grad_into(fresh, p, where[id(p)], amp)
            gv.copy_(torch.where(entry.stale, fresh.unsqueeze(0).expand_as(gv), gv))
            entry.update(amp.skip(p.device))
        self._stale_warm = kept
        if kept:
            # A ring may have changed: what was derived from the rings (Anderson's
            # kept Gram matrix) is recomputed, as after a change of members.
            self._membership_changed = True

    @staticmethod
    def _tensor_lr(group: dict) -> None:
        """Keep the group's (validated) learning rate in a 0-dim float64 tensor on
        its parameters' device: the kernels read it from memory, schedulers
        update it in place (``fill_``), and a compiled step reads it as an input
        instead of specialising on (and recompiling for) every float value."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group["lr"] = torch.tensor(float(lr), dtype=torch.float64, device=device)

    @staticmethod
    def _lr(w: Work) -> Tensor:
        """The group's lr on the bucket's device (a device copy if elsewhere; no state write)."""
        lr = w.group["lr"]
        if not isinstance(lr, Tensor):  # a float assigned between compiled steps
            return torch.full((), lr, dtype=torch.float64, device=w.bucket.device)
        lr = lr.detach().reshape(())
        return lr if lr.device == w.bucket.device else lr.to(w.bucket.device)

    def _init_group(self) -> None:
        """Host-side setup of a step: every check (:meth:`_check_step`, before
        anything is written), then grow buckets and list the work
        (``self._plan``). Nothing here reads a device value but what
        :meth:`_check_step` reads.

        Under ``torch.compile`` Dynamo runs a method of this name eagerly while
        tracing (as it does for torch.optim's ``_init_group``) and guards on
        which parameters have gradients, so the compiled graph holds only the
        per-step device work. A step in which a member has no gradient is not
        supported there: it raises."""
        self._opt_called = True  # what an LR scheduler's step wrapper would record
        self._settled = not torch.compiler.is_compiling()
        self._check_step()
        for gi, group in enumerate(self.param_groups):
            if not isinstance(group["lr"], Tensor):  # a float assigned since: validated above
                self._tensor_lr(group)
                self._lr_checked[gi] = group["lr"]
        wanted: dict[BucketKey, list[Tensor]] = defaultdict(list)
        plain = None if getattr(self, "_has_dtensors", True) else self._plain_reduction()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    wanted[(gi, p.device, p.dtype, self._reduction(p) if plain is None else plain)].append(p)
        if torch.compiler.is_compiling():
            for key, active in wanted.items():
                bucket = self._buckets.get(key)
                if bucket is not None and len(active) < len(bucket.members):
                    raise NotImplementedError(
                        "interpolatron under torch.compile: every parameter that has a history must "
                        "have a gradient at every step (this one has none for some); step this "
                        "optimizer eagerly for such steps")
        self._membership_changed = False
        plan_key = []
        for key, active in wanted.items():
            group = self.param_groups[key[0]]
            bucket = self._buckets.get(key)
            if bucket is None or any(id(p) not in bucket.offset_of for p in active):
                bucket = self._rebuild(key, group, active, bucket)
            if len(active) != len(bucket.members):
                self._membership_changed = True
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
        self._refresh_stale_warm_starts(self._amp)

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

    def _prepare(self, amp: AmpStep = NO_AMP) -> list[Work]:
        """The work of this step after :meth:`_init_group` (which also refills warm
        starts made in skipped steps); rotates the rings of members without a
        gradient (device work, so it is traced; a skipped step rotates nothing)."""
        for w in self._plan:
            for p in w.idle:  # no gradient: keep its history aligned with the ring
                w.bucket.rotate(p, amp.skip(w.bucket.device))
        return self._plan

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
                        and self._reduction(p) == key[3]):
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
                self._warm_start(p, group, xv, gv, self._amp)
                if self._amp.may_skip and gv.shape[0]:
                    self._stale_warm.append(StaleWarmStart(p, self._amp.skip(device)))
            st["step"], st["x_hist"], st["g_hist"] = count, as_history(xv, p), as_history(gv, p)
        self._buckets[key] = bucket
        return bucket

    @staticmethod
    def _effective_grad_into(out: Tensor, p: Tensor, group: dict, amp: AmpStep) -> None:
        """``out = sign * grad / grad_scale + weight_decay * p`` (as the kernels form it)."""
        out.copy_(local(p.grad))
        inv = amp.inv_scale(p.device, torch.float32 if out.dtype != torch.float64 else torch.float64)
        if inv is not None:
            out.mul_(inv)
        if group["maximize"]:
            out.neg_()
        if group["weight_decay"] != 0:
            out.add_(local(p).detach(), alpha=group["weight_decay"])

    @classmethod
    def _warm_start(cls, p: Tensor, group: dict, xv: Tensor, gv: Tensor, amp: AmpStep = NO_AMP) -> None:
        """Fill every slot with ``x^(0)`` and the effective ``g^(0)``, computed
        in place in the first slot (no parameter-sized temporary)."""
        x = local(p).detach()
        if xv.shape[0]:
            xv.copy_(x.unsqueeze(0).expand_as(xv))
        if gv.shape[0]:
            first = gv[0]
            cls._effective_grad_into(first, p, group, amp)
            if gv.shape[0] > 1:
                gv[1:].copy_(first.unsqueeze(0).expand_as(gv[1:]))

    @staticmethod
    def _closure_loss(closure):
        """The loss of ``closure`` evaluated with gradients on (``step`` runs under no_grad)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _advance(work: list[Work], amp: AmpStep = NO_AMP) -> None:
        counts = [w.bucket.count for w in work]
        if not counts:
            return
        if not amp.may_skip:
            torch._foreach_add_(counts, 1)
            return
        for c in counts:  # a skipped step leaves the count (decided on the device)
            c.add_(amp.taken(c.device))

    # -- checkpoints ----------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"algorithm": self._algorithm,
                "ring_slots": [list(self._ring_slots(g)) for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # Informative only: loading validates from the groups and the
        # per-parameter state (distributed checkpoints drop this key).
        sd["interpolatron"] = self._config()
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict after validating all of it (see
        :mod:`interpolatron.optim._checkpoint`): a refused one raises
        :class:`~interpolatron.optim._checkpoint.CheckpointError` (a
        ``ValueError``) naming the group, parameter and key, and changes nothing."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = plan_load(self, state_dict)
        # Nothing above wrote to the optimizer; now swap the new state in.
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        self._forget_buckets()  # rebuilt at the next step from the per-parameter state
        self._stale_warm = []
        self._lr_checked = {gi: g["lr"] for gi, g in enumerate(groups) if isinstance(g["lr"], Tensor)}
        self._after_load()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _after_load(self) -> None:
        pass

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

    # -- introspection --------------------------------------------------
    def backends_in_use(self) -> dict[str, str]:
        """Which backend serves each bucket (after the first step)."""
        return {f"group{gi}/{dev}/{str(dt).removeprefix('torch.')}": b.backend.name
                for (gi, dev, dt, *_), b in self._buckets.items()}
