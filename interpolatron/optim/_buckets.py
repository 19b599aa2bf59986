"""The bucket plan: which parameters share flat ring histories, and the work of
the current step.

A bucket holds the parameters of one param group on one device with one dtype
(and one reduction key) that have state. Its rings are two flat buffers; each
parameter's state holds *views* into them (``state[p]["x_hist"]`` has shape
``(S, *p.shape)``), so ``state_dict()`` looks like any ``torch.optim`` state
and ``load_state_dict`` can rebuild the buckets from it. With master weights
(16-bit parameters, ``master_weights=True``) the rings are float32 and a third
flat buffer holds the float32 masters, ``state[p]["master"]`` a view into it:
the kernels read and rewrite it with the rings, and round it into the
parameter, whose storage (``p.data``) is never replaced.

:class:`BucketPlan` owns the buckets and this step's :class:`Work`, and
declares the flag an algorithm reads: ``membership_changed`` (the members or
their rings changed since the last step, so what was derived from the rings
must be recomputed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..backends import resolve
from ..ring import dim_order, padded_offsets, ring_view
from ..sharding import as_history, history_placements, is_dtensor, local
from ._amp import NO_AMP, AmpStep, StaleWarmStart
from ._master import as_master, has_master, local_master

__all__ = ["Bucket", "BucketKey", "BucketPlan", "PlanRules", "Work"]

# (group index, device, dtype, reduction key): the reduction key (the process
# groups that hold the other shards, () for none) keeps parameters whose dot
# products are summed over different groups in different buckets.
BucketKey = tuple[int, torch.device, torch.dtype, tuple]

# Columns per chunk when a skipped parameter's ring entries move one slot on.
ROTATE_CHUNK = 1 << 16


class Bucket:
    """The parameters of one (group, device, dtype, reduction) and their flat
    history. The rings hold each member's local shard (the whole tensor when
    it is not sharded); ``members`` are the optimizer's parameters themselves."""

    def __init__(self, key: BucketKey, backend, members: list[Tensor], x_slots: int, g_slots: int,
                 count: Tensor, coef_len: int, master: bool = False):
        device = key[1]
        # The rings' dtype: float32 for 16-bit parameters with master copies.
        dtype = torch.float32 if master else key[2]
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
        # The float32 masters in the rings' columns (gaps zero), or None.
        self.master = torch.zeros(self.numel, dtype=torch.float32, device=device) if master else None
        self.count = count
        self.coefs = torch.zeros(coef_len, dtype=torch.float64, device=device)
        self.coefs_seen: tuple | None = None
        # Interpolatron's first step: e_1 (the coefficients of an SGD step) while
        # the count is 0; ``past_first``: a step was taken that GradScaler could
        # not skip, so the count is past 0 (known on the host, no device read).
        self.first_coefs: Tensor | None = None
        self.past_first = False
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
        for rows in (self.x_hist, self.g_hist):
            slots = rows.shape[0]
            if slots < 2:
                continue
            for start in range(off, off + n, ROTATE_CHUNK):
                cols = rows[:, start:min(start + ROTATE_CHUNK, off + n)]
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
        order = dim_order(t)
        return (ring_view(self.x_hist[:, off:off + n], t, order),
                ring_view(self.g_hist[:, off:off + n], t, order))

    def master_view(self, p: Tensor) -> Tensor:
        """The float32 master of ``p``'s local shard, shaped and strided like it
        (a view into :attr:`master`)."""
        off, t = self.offset_of[id(p)], local(p)
        n = t.numel()
        return ring_view(self.master[off:off + n].view(1, n), t, dim_order(t))[0]


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


def local_history(saved: Tensor, p: Tensor) -> Tensor:
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


def effective_grad_into(out: Tensor, p: Tensor, group: dict, amp: AmpStep, x: Tensor | None = None) -> None:
    """``out = sign * grad / grad_scale + weight_decay * x`` (as the kernels form it),
    ``x`` the parameter's local shard or its master."""
    out.copy_(local(p.grad))
    inv = amp.inv_scale(p.device, torch.float32 if out.dtype != torch.float64 else torch.float64)
    if inv is not None:
        out.mul_(inv)
    if group["maximize"]:
        out.neg_()
    if group["weight_decay"] != 0:
        out.add_(local(p).detach() if x is None else x, alpha=group["weight_decay"])


def warm_start(p: Tensor, group: dict, xv: Tensor, gv: Tensor, amp: AmpStep = NO_AMP,
               master: Tensor | None = None) -> None:
    """Fill every slot with ``x^(0)`` (the master, if given) and the effective
    ``g^(0)``, computed in place in the first slot (no parameter-sized temporary)."""
    x = local(p).detach() if master is None else master
    if xv.shape[0]:
        xv.copy_(x.unsqueeze(0).expand_as(xv))
    if gv.shape[0]:
        first = gv[0]
        effective_grad_into(first, p, group, amp, x)
        if gv.shape[0] > 1:
            gv[1:].copy_(first.unsqueeze(0).expand_as(gv[1:]))


def _record(p: Tensor, st: dict) -> tuple:
    """What :meth:`BucketPlan.foreign` compares a parameter's state with."""
    return (p, st, st.get("step"), st.get("x_hist"), st.get("g_hist"), st.get("master"))


@dataclass(frozen=True)
class PlanRules:
    """What the optimizer decides for its buckets, handed to each
    :meth:`BucketPlan.update` (not kept: a plan holding the optimizer's
    methods would make the two a reference cycle, and a dropped optimizer's
    rings would wait for the cycle collector)."""

    #: The backend name new buckets resolve (``"auto"`` or one of the backends).
    backend: str
    #: ``(x slots, g slots)`` of a group's rings.
    ring_slots: Callable[[dict], tuple[int, int]]
    #: How many coefficients a group's step mixes.
    coef_len: Callable[[dict], int]
    #: A parameter's reduction key.
    reduction: Callable[[Tensor], tuple]
    #: Every parameter's reduction key when all share it (no DTensor), else None.
    plain: tuple | None = None
    #: Whether 16-bit parameters keep float32 master copies (``master_weights=True``).
    master_weights: bool = False


class BucketPlan:
    """The optimizer's buckets and the work of the current step."""

    def __init__(self) -> None:
        self.buckets: dict[BucketKey, Bucket] = {}
        self.work: list[Work] = []
        # Per bucket (id, ids of the members with a gradient): the work list is
        # rebuilt only when this changes, so a compiled step guards on the same objects.
        self.key: tuple | None = None
        # Which parameters had a gradient at the last host setup (see ready()).
        self.has_grad: list[list[bool]] = []
        # This step's members or their rings changed since the last step: what
        # was derived from the rings (Anderson's kept Gram) must be recomputed.
        self.membership_changed = False
        # The members whose first step this is while their bucket is past its
        # own (they first have a gradient now, or first since the steps GradScaler
        # skipped): by id, None (this step is their first if it is taken) or a
        # device bool (a warm start in a step that may have been skipped: their
        # first while it is set). See :meth:`parts`. Emptied when the step ends
        # (a traced write under torch.compile: the graph that split a pass for
        # them guards on it, so the next step does not run that graph again).
        self.first_steps: dict[int, Tensor | None] = {}
        # By parameter id: ``(p, its state dict, step, x_hist, g_hist, master)``
        # as this optimizer put them there (the buckets' views, or a state
        # load_state_dict validated). See :meth:`foreign`.
        self.installed: dict[int, tuple] = {}

    def trust(self, groups: list[dict], state: dict) -> None:
        """Record the per-parameter state as it stands as this optimizer's own
        (just validated by ``load_state_dict``, or a copy of its own state)."""
        for g in groups:
            for p in g["params"]:
                st = state.get(p)
                if st:
                    self.installed[id(p)] = _record(p, st)

    def foreign(self, groups: list[dict], state: dict) -> bool:
        """Whether a parameter's state entries are no longer the tensors this
        optimizer put there: ``ZeroRedundancyOptimizer.load_state_dict``
        assigns ``optimizer.state[p]`` directly, and so may a user. The
        buckets would keep stepping their own rings while ``state`` shows
        others. Identity checks on the host only (no device read); a parameter
        whose entry holds no history (Anderson's optimizer-wide state on a
        parameter without a gradient yet) is not checked."""
        installed = self.installed
        for g in groups:
            for p in g["params"]:
                st = state.get(p)
                rec = installed.get(id(p))
                if rec is None:
                    if st and ("x_hist" in st or "g_hist" in st or "step" in st or "master" in st):
                        return True
                    continue
                if (st is not rec[1] or st.get("x_hist") is not rec[3] or st.get("g_hist") is not rec[4]
                        or st.get("step") is not rec[2] or st.get("master") is not rec[5]):
                    return True
        return False

    def ready(self, groups: list[dict]) -> bool:
        """Whether the last host setup still holds: the same parameters have
        gradients and every lr is a tensor (read under ``torch.compile``)."""
        if self.key is None or len(self.has_grad) != len(groups):
            return False
        for group, expect in zip(groups, self.has_grad):
            if not isinstance(group["lr"], Tensor) or len(expect) != len(group["params"]):
                return False
            for p, e in zip(group["params"], expect):
                if (p.grad is not None) != e:
                    return False
        return True

    def update(self, groups: list[dict], state: dict, rules: PlanRules, amp: AmpStep,
               stale: list[StaleWarmStart]) -> None:
        """Grow the buckets to this step's parameters with gradients and list
        the work. Warm starts made while the step may be skipped are appended
        to ``stale``."""
        wanted: dict[BucketKey, list[Tensor]] = defaultdict(list)
        plain = rules.plain
        for gi, group in enumerate(groups):
            for p in group["params"]:
                if p.grad is not None:
                    wanted[(gi, p.device, p.dtype, rules.reduction(p) if plain is None else plain)].append(p)
        if torch.compiler.is_compiling():
            for key, active in wanted.items():
                bucket = self.buckets.get(key)
                if bucket is not None and len(active) < len(bucket.members):
                    raise NotImplementedError(
                        "interpolatron under torch.compile: every parameter that has a history must "
                        "have a gradient at every step (this one has none for some); step this "
                        "optimizer eagerly for such steps")
        self.membership_changed = False
        self.first_steps = {}
        plan_key = []
        late = None  # whether the optimizer is past its first step (a history exists)
        for key, active in wanted.items():
            group = groups[key[0]]
            bucket = self.buckets.get(key)
            if bucket is None or any(id(p) not in bucket.offset_of for p in active):
                if late is None:
                    late = bool(self.buckets) or any("x_hist" in st for st in state.values())
                bucket = self._rebuild(key, groups, state, rules, active, bucket, amp, stale, late)
            if len(active) != len(bucket.members):
                self.membership_changed = True
            plan_key.append((id(bucket), tuple(id(p) for p in active)))
        plan_key = tuple(plan_key)
        if plan_key != self.key:  # the same objects while nothing changes (compile guards)
            work = []
            for key, active in wanted.items():
                bucket = self.buckets[key]
                have = {id(p) for p in active}
                work.append(Work(bucket, groups[key[0]], active,
                                 [p for p in bucket.members if id(p) not in have]))
            self.work, self.key = work, plan_key
        self.has_grad = [[p.grad is not None for p in g["params"]] for g in groups]

    def parts(self, w: Work) -> list[tuple[list[int], Tensor | None | bool]]:
        """``w``'s members split for its update passes: ``(indices into w.keys,
        first)`` with ``first`` False for the members past their first step, None
        for those whose first step this is, a device bool for those whose first
        step it is while that flag is set (:attr:`first_steps`). One part, all
        members, when none is at its first step."""
        if not self.first_steps or not any(id(p) in self.first_steps for p in w.keys):
            return [(list(range(len(w.keys))), False)]
        by_flag: dict[int, tuple[list[int], Tensor | None | bool]] = {}
        for i, p in enumerate(w.keys):
            first = self.first_steps.get(id(p), False)
            by_flag.setdefault(id(first), ([], first))[0].append(i)
        return list(by_flag.values())

    def rotate_idle(self, amp: AmpStep = NO_AMP) -> list[Work]:
        """This step's work; the rings of members without a gradient move one
        slot on (device work, so it is traced; a skipped step rotates nothing)."""
        for w in self.work:
            for p in w.idle:  # no gradient: keep its history aligned with the ring
                w.bucket.rotate(p, amp.skip(w.bucket.device))
        return self.work

    def _rebuild(self, key: BucketKey, groups: list[dict], state: dict, rules: PlanRules,
                 active: list[Tensor], old: Bucket | None, amp: AmpStep,
                 stale: list[StaleWarmStart], late: bool) -> Bucket:
        group = groups[key[0]]
        order = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}
        present = {id(p): p for p in (old.members if old else [])}
        if old is None:
            # After load_state_dict every parameter with a saved history is a
            # member again (as it was when saved), gradient or not: its ring
            # stays aligned and the saved Gram stays valid.
            device, dtype = key[1], key[2]
            for p in group["params"]:
                st = state.get(p)
                if (st and "x_hist" in st and p.device == device and p.dtype == dtype
                        and rules.reduction(p) == key[3]):
                    present[id(p)] = p
        present.update({id(p): p for p in active})
        # A new member (a first gradient) changes the optimizer's x; a bucket
        # rebuilt from a checkpoint with exactly its saved members does not.
        if old is not None or any("x_hist" not in state.get(p, {}) for p in present.values()):
            self.membership_changed = True
        members = sorted(present.values(), key=lambda p: order[id(p)])
        x_slots, g_slots = rules.ring_slots(group)
        device = key[1]
        if old is not None:
            count = old.count
        else:
            loaded = [state[p]["step"] for p in members if "step" in state[p]]
            count = (loaded[0].to(device=device, dtype=torch.int64).clone() if loaded
                     else torch.zeros((), dtype=torch.int64, device=device))
        bucket = Bucket(key, resolve(rules.backend, device, key[2]), members, x_slots, g_slots,
                        count, rules.coef_len(group), has_master(key[2], rules.master_weights))
        for p in members:
            st = state[p]
            xv, gv = bucket.views(p)
            mv = None
            if bucket.master is not None:
                # The master kept (or loaded), else made now from the parameter.
                mv = bucket.master_view(p)
                mv.copy_(local_master(st["master"], p) if "master" in st else local(p).detach())
                st["master"] = as_master(mv, p)
            if "x_hist" in st:
                xv.copy_(local_history(st["x_hist"], p))
                gv.copy_(local_history(st["g_hist"], p))
            else:  # warm start: every missing slot holds x^(0), g^(0)
                warm_start(p, group, xv, gv, amp, mv)
                if late:
                    self.first_steps[id(p)] = None
                if amp.may_skip and gv.shape[0]:
                    stale.append(StaleWarmStart(p, amp.skip(device), late))
            st["step"], st["x_hist"], st["g_hist"] = count, as_history(xv, p), as_history(gv, p)
            self.installed[id(p)] = _record(p, st)
        self.buckets[key] = bucket
        return bucket

    def refresh_stale_warm_starts(self, groups: list[dict], state: dict, amp: AmpStep,
                                  stale: list[StaleWarmStart]) -> list[StaleWarmStart]:
        """Refill the g rings warm-started in steps that were (maybe) skipped
        from this step's gradient, where the device flag says so; returns the
        entries still pending."""
        if not stale:
            return stale
        where = {id(p): g for g in groups for p in g["params"]}
        kept = []
        for entry in stale:
            p = entry.param
            if entry.cleared():
                continue
            kept.append(entry)
            st = state.get(p, {})
            if p.grad is None or "g_hist" not in st or st["g_hist"].shape[0] == 0:
                continue
            gv = st["g_hist"]
            if entry.late:  # still its first step while every step since its warm start was skipped
                self.first_steps.setdefault(id(p), entry.stale.clone())
            fresh = torch.empty_like(gv[0])
            effective_grad_into(fresh, p, where[id(p)], amp, local(st["master"]) if "master" in st else None)
            gv.copy_(torch.where(entry.stale, fresh.unsqueeze(0).expand_as(gv), gv))
            entry.update(amp.skip(p.device))
        if kept:
            # A ring may have changed: what was derived from the rings (Anderson's
            # kept Gram matrix) is recomputed, as after a change of members.
            self.membership_changed = True
        return kept
