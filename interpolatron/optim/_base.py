"""What Interpolatron and Anderson share: settings and their checks, the step
scaffold, checkpoints and copies. The bucket plan (:mod:`._buckets`, which
also holds the float32 master weights, :mod:`._master`), GradScaler's inputs (:mod:`._amp`) and
the reduction keys (:class:`~interpolatron.sharding.ReductionKeys`) live in
their own modules; this class wires them into one ``step``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from ..backends import BACKEND_NAMES, canonical_name, resolve
from ..sharding import ReductionKeys, check_grad_layout, is_dtensor, reduction_key
from ._amp import NO_AMP, AmpStep, StaleWarmStart
from ._buckets import BucketPlan, PlanRules, Work
from ._checkpoint import CheckpointError, CheckpointSpec, plan_load
from ._checks import (
    LATER_GROUP_KEYS,
    check_grad,
    check_lr,
    check_maximize,
    check_param,
    check_real,
    check_rounding,
    identical,
)
from ._master import state_dtype
from ._process_groups import check_process_group, check_same_parameters, fsdp1_groups, zero_group

__all__ = ["BucketedOptimizer", "scheduler_ready"]


def scheduler_ready(step):
    """Mark ``step`` as already tracked for torch's LR schedulers.

    A scheduler otherwise replaces ``optimizer.step`` by a wrapper (defined in
    torch/optim/lr_scheduler.py, a file Dynamo refuses to trace) that only sets
    ``optimizer._opt_called``; the step sets that itself (in ``_init_group``),
    so a compiled training step that calls ``opt.step()`` stays one graph."""
    step._wrapped_by_lr_sched = True
    return step


class BucketedOptimizer(Optimizer):
    """Base of the ring-history optimizers. A subclass gives its ring sizes,
    its settings' checks and its device work (:meth:`_step_buckets`); this
    class owns the step's skeleton, validation and checkpoints.

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
        check_process_group(process_group)
        self.process_group = process_group
        # Without process_group=, the group of a ZeroRedundancyOptimizer building
        # this one (see _process_groups.py); FSDP1's are found per parameter.
        self._keys = ReductionKeys(process_group, zero_group() if process_group is None else None)
        # Whether the plain parameters whose group is unknown were checked
        # to be the same on every rank (_check_same_parameters).
        self._same_params_checked = True
        self._plan = BucketPlan()
        # The host setup of the last step holds for the next (a compiled step
        # may skip it). A flag on the optimizer itself, not on the plan: Dynamo
        # runs _init_group eagerly and reads the optimizer's attributes after
        # it, while a flag on another object is guarded at its value before
        # that run, which recompiled the second compiled step (test_compile_misc).
        self._settled = False
        # The settings a saved param group must carry (not what torch adds later).
        self._hyperparameter_keys = tuple(defaults)
        self._lr_checked: dict[int, Tensor] = {}  # group index -> the tensor lr last validated
        self._stale_warm: list[StaleWarmStart] = []
        self._amp = NO_AMP
        super().__init__(params, defaults)

    def _reductions(self) -> list[tuple]:
        """Every reduction key of this optimizer's parameters, in an order all
        ranks share (read only: worked out on the host, see ReductionKeys)."""
        return self._keys.all()

    def _find_groups(self, params: list[Tensor]) -> None:
        """Without process_group=: the groups FSDP1 shards these parameters over;
        a plain parameter whose group stays unknown is checked at the next step."""
        keys = self._keys
        found = {} if self.process_group is not None or keys.found is not None else fsdp1_groups(params)
        keys.add(params, found)
        if self.process_group is None and keys.found is None and any(
                not is_dtensor(p) and id(p) not in keys.found_keys for p in params):
            self._same_params_checked = False

    def _reduces(self) -> bool:
        """Whether a step needs whole-model dot products (Anderson; Interpolatron's diagnostics)."""
        return True

    def _check_same_parameters(self) -> None:
        """Once, before a step that needs whole-model dot products: the plain
        parameters whose group is unknown must be the same on every rank."""
        if self._same_params_checked or not self._reduces():
            return
        plain = [p for g in self.param_groups for p in g["params"]
                 if not is_dtensor(p) and id(p) not in self._keys.found_keys]
        if plain:
            check_same_parameters(type(self).__name__, plain)
        self._same_params_checked = True

    # -- subclass hooks -------------------------------------------------
    def _ring_slots(self, group: dict) -> tuple[int, int]:
        raise NotImplementedError

    def _coef_len(self, group: dict) -> int:
        raise NotImplementedError

    def _step_buckets(self, work: list[Work], amp: AmpStep) -> None:
        """The algorithm's device work of one step on the buckets in ``work``
        (after the host setup; a bucket with master weights passes
        ``bucket.master`` to its ops). The step count advances afterwards."""
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
            for (bgi, *_), b in self._plan.buckets.items():
                if bgi == gi and (b.x_hist.shape[0], b.g_hist.shape[0]) != slots:
                    raise ValueError(f"param group {gi}: the number of steps k cannot change once the "
                                     f"history exists; build a new optimizer instead")
            if not any(key[0] == gi for key in self._plan.buckets):  # loaded, no step yet
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "x_hist" in st and (st["x_hist"].shape[0], st["g_hist"].shape[0]) != slots:
                        raise ValueError(f"param group {gi}: the number of steps k cannot change once "
                                         f"the history exists; build a new optimizer instead")

    @staticmethod
    def _sr_seed(group: dict) -> int | None:
        """The seed ``combine`` rounds this group's 16-bit writes with (None: to nearest)."""
        return group["sr_seed"] if group["stochastic_rounding"] else None

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
                resolve(self.backend, p.device, p.dtype)  # fail now, not at the first step
            self._validate_group(group)
            self._validate_groups(self.param_groups)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        self._find_groups(group["params"])
        self._keys.refresh(self.param_groups)
        self._tensor_lr(group)
        self._plan.key = None
        if isinstance(group["lr"], Tensor):
            self._lr_checked[len(self.param_groups) - 1] = group["lr"]

    def validate_step(self) -> None:
        """Check everything a step needs (settings, gradients, that k has not
        changed) without writing anything: raises what :meth:`step` would
        raise before it writes. A wrapper that must not act on a step the
        optimizer will refuse (RNA's gradient record) calls this first."""
        self._check_step()

    def _check_step(self) -> dict | None:
        """Everything a step needs, before it writes anything. The settings are
        checked on copies of the groups: a refused step leaves every group
        dict as it was. Only once every check has passed does a value that a
        user assigned since in another valid form (a list of alphas, an int
        weight decay) take the form the group was added with, which the step
        then uses.

        Returns the per-parameter state to take in place of ``self.state``
        when it was replaced since the last step (:meth:`_plan_foreign_state`),
        else None."""
        per_param = self._keys.per_param
        trials, checked = [], {}
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            trial = dict(group)
            try:
                self._validate_group(trial, read_lr=self._lr_checked.get(gi) is not lr)
            except ValueError as exc:
                raise ValueError(f"param group {gi}: {exc}") from exc
            if isinstance(lr, Tensor):
                checked[gi] = lr
            trials.append(trial)
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p)
                    if per_param:
                        check_grad_layout(p)
        self._validate_groups(trials)
        self._check_k_unchanged()
        taken = self._plan_foreign_state(trials)
        self._lr_checked.update(checked)
        for group, trial in zip(self.param_groups, trials):
            for key, value in trial.items():
                if key not in group or not identical(group[key], value):
                    group[key] = value
        return taken

    def _plan_foreign_state(self, groups: list[dict]) -> dict | None:
        """The per-parameter state validated and copied as ``load_state_dict``
        would (``groups``: the param groups' checked settings), when some entry
        of ``self.state`` is no longer what this optimizer put there; else None.

        ``ZeroRedundancyOptimizer.load_state_dict`` assigns
        ``optimizer.state[p]`` directly (not through :meth:`load_state_dict`),
        as may a user or another tool: the buckets would otherwise keep
        stepping their old rings while ``state`` shows the new ones (a
        silently wrong resume). The check is identity only (no device read);
        the step that finds such a change reads the new state's values once, as
        :meth:`load_state_dict` does, and raises
        :class:`~interpolatron.optim._checkpoint.CheckpointError` for a bad one
        before anything is written."""
        if not self._plan.foreign(self.param_groups, self.state):
            return None
        params = [p for g in self.param_groups for p in g["params"]]
        saved, start = [], 0
        for g in groups:
            n = len(g["params"])
            saved.append({**{k: v for k, v in g.items() if k != "params"},
                          "params": list(range(start, start + n))})
            start += n
        state_dict = {"state": {i: st for i, p in enumerate(params) if (st := self.state.get(p))},
                      "param_groups": saved}
        try:
            _, state = plan_load(self._checkpoint_spec(), state_dict)
        except CheckpointError as exc:
            raise CheckpointError(
                f"optimizer.state was replaced since the last step (ZeroRedundancyOptimizer.load_state_dict, "
                f"or an assignment to optimizer.state) and cannot be resumed from: {exc}") from exc
        return state

    def _take_state(self, state: dict) -> None:
        """Swap in a state planned by :meth:`_plan_foreign_state` and rebuild the
        buckets from it at this step, exactly as after :meth:`load_state_dict`
        (the dict ``self.state`` itself is kept: a wrapper may hold it)."""
        for p in (p for g in self.param_groups for p in g["params"]):
            if p in state:
                self.state[p] = state[p]
            else:
                self.state.pop(p, None)
        settled = self._settled
        self._forget_buckets()
        self._settled = settled
        self._stale_warm = []
        self._after_load(None)

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

    def _combine(self, w: Work, coefs: Tensor, amp: AmpStep, gram: Tensor | None) -> None:
        """``w``'s update pass (``ops.combine``) with ``coefs``; ``gram``: the
        partial Gram row of the new gradient lands there (or None).

        A member whose first step this is while its bucket is past its own (it
        joined late, :attr:`BucketPlan.first_steps`) has k copies of ``x0, g0``
        in its rings; its step is the SGD step ``x0 - lr * g0`` rounded once, as
        at the optimizer's first step: its own pass with the coefficients
        ``e_1``, not ``coefs`` over the copies (which round differently). The
        passes' rows add up (summed in another order than one pass: a float64
        rounding, in that step only)."""
        b, group = w.bucket, w.group
        lr = self._lr(w)
        extra = dict(**amp.kernel_args(b.device), sr_seed=self._sr_seed(group), master=b.master)
        args = (group["weight_decay"], group["maximize"])
        parts = self._plan.parts(w)
        if len(parts) == 1 and parts[0][1] is False:
            ops.combine(w.params, w.grads, w.offsets, b.x_hist, b.g_hist, coefs, lr, b.count, *args, gram,
                        b.backend.name, b.cache, **extra)
            return
        grads = w.grads
        unit = torch.zeros_like(coefs)
        unit[0] = 1
        row = None if gram is None else torch.zeros_like(gram)
        for n, (idx, first) in enumerate(parts):
            mine = coefs if first is False else unit if first is None else torch.where(first, unit, coefs)
            out = None if gram is None else gram if n == 0 else row
            ops.combine([w.params[i] for i in idx], [grads[i] for i in idx], [w.offsets[i] for i in idx],
                        b.x_hist, b.g_hist, mine, lr, b.count, *args, out, b.backend.name, b.cache, **extra)
            if n and gram is not None:
                gram.add_(row)

    def _group_index(self) -> dict[int, tuple[int, int]]:
        return {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}

    # -- the step ---------------------------------------------------------
    @scheduler_ready
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None):
        """One step. ``closure`` re-evaluates the loss (optional).

        ``grad_scale`` / ``found_inf``: GradScaler's fused contract (it passes
        them itself, as optimizer attributes): the gradients are divided by
        ``grad_scale``, and a nonzero ``found_inf`` skips the step on the device
        (nothing is written, the step count stays).

        The skeleton every algorithm shares; its own device work is
        :meth:`_step_buckets`. Plain method calls only: under ``torch.compile``
        a training step that calls ``opt.step()`` traces into one frame."""
        loss = self._closure_loss(closure)
        amp = self._begin_step(grad_scale, found_inf)
        try:
            self._setup()
            work = self._plan.rotate_idle(amp)
            self._step_buckets(work, amp)
            self._advance(work, amp)
            if self._plan.first_steps:
                self._plan.first_steps = {}
        finally:
            self._end_step()
        return loss

    @staticmethod
    def _closure_loss(closure):
        """The loss of ``closure`` evaluated with gradients on (``step`` runs under no_grad)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

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
        """A step's GradScaler inputs (kept for the warm starts of :meth:`_init_group`)."""
        amp = self._amp_step(grad_scale, found_inf)
        self._amp = amp
        return amp

    def _end_step(self) -> None:
        self._amp = NO_AMP

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
        taken = self._check_step()
        if taken is not None:
            self._take_state(taken)
        self._keys.refresh(self.param_groups)  # a user may have edited group["params"]
        self._check_same_parameters()
        for gi, group in enumerate(self.param_groups):
            if not isinstance(group["lr"], Tensor):  # a float assigned since: validated above
                self._tensor_lr(group)
                self._lr_checked[gi] = group["lr"]
        rules = PlanRules(self.backend, self._ring_slots, self._coef_len, self._keys.of,
                          None if self._keys.per_param else self._keys.plain(), self.master_weights)
        self._plan.update(self.param_groups, self.state, rules, self._amp, self._stale_warm)
        self._stale_warm = self._plan.refresh_stale_warm_starts(self.param_groups, self.state, self._amp,
                                                                self._stale_warm)

    def _setup(self) -> None:
        """:meth:`_init_group`, except in a compiled step that changes nothing.

        Under ``torch.compile`` the check below is traced (so the graph guards
        on which parameters have a gradient) and the host setup is skipped when
        it would do nothing: a whole training step (forward, backward, step)
        then compiles into one graph once the optimizer has taken a step (its
        first step must see real gradients: it builds the state)."""
        if torch.compiler.is_compiling():
            if self._settled and self._plan.ready(self.param_groups):
                return
            self._init_group()
            # A traced attribute write: applied once the compiled step has run.
            # Until then ready() stays False, so that a restarted analysis
            # (Dynamo retraces after some passes) takes the same path.
            self._settled = True
            return
        self._init_group()

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

    def _checkpoint_spec(self) -> CheckpointSpec:
        """What :func:`~interpolatron.optim._checkpoint.plan_load` validates a state_dict against."""
        master = self.master_weights
        return CheckpointSpec(
            algorithm=self._algorithm, param_groups=self.param_groups,
            hyperparameter_keys=self._hyperparameter_keys, later_group_keys=self._later_group_keys,
            ring_slots=self._ring_slots,
            state_dtype=lambda p: state_dtype(p, master), extra_state_keys=self._extra_state_keys,
            validate_group=self._validate_group, validate_groups=self._validate_groups,
            plan_extra_state=self._plan_extra_state)

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
        groups, state = plan_load(self._checkpoint_spec(), state_dict)
        extra = self._plan_extra_entries(state_dict, groups, state)
        # Nothing above wrote to the optimizer; now swap the new state in.
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        self._forget_buckets()  # rebuilt at the next step from the per-parameter state
        self._stale_warm = []
        self._lr_checked = {gi: g["lr"] for gi, g in enumerate(groups) if isinstance(g["lr"], Tensor)}
        self._after_load(extra)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _plan_extra_entries(self, state_dict: Any, groups: list[dict], state: dict) -> Any:
        """Validate and copy the state_dict's top-level entries besides ``state``
        and ``param_groups`` that this optimizer reads (raises CheckpointError;
        the planned value goes to :meth:`_after_load`)."""
        return None

    def _after_load(self, extra: Any = None) -> None:
        pass

    def _forget_buckets(self) -> None:
        self._plan = BucketPlan()
        # The state as it stands is this optimizer's own (validated by
        # load_state_dict, or a copy's): what a later foreign() compares with.
        self._plan.trust(self.param_groups, self.state)
        self._settled = False

    # -- copies (copy.deepcopy, pickle) ---------------------------------
    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups
    # only: keep this optimizer's own settings too, but not the bucket plan
    # (its rings are rebuilt from the per-parameter state, whose views the
    # copy holds, at the next step) nor the step hooks.
    _TRANSIENT = ("_plan", "_settled")
    # Caches that a step rebuilds when they are missing and that may refer to
    # process groups (Anderson's partial Grams): deepcopy keeps them (sharing
    # the groups), pickle leaves them out, with an empty value of their type.
    _REBUILT: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if key not in state and key not in self._TRANSIENT and not key.startswith("_optimizer_"):
                state[key] = value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forget_buckets()
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_same_params_checked", True)
        for key in self._REBUILT:
            self.__dict__.setdefault(key, {})
        if "_keys" not in self.__dict__:
            self._keys = ReductionKeys(self.process_group)
            self._keys.add([p for g in self.param_groups for p in g["params"]], {})
        # The copy's parameters are new objects: their keys are worked out again.
        self._keys.refresh(self.param_groups)

    def _live_groups(self, pickled: bool = False) -> list:
        """The process groups this optimizer refers to: live connections between
        processes, not data (a copy shares them; pickling cannot carry them).
        ``pickled``: only those that pickle would carry (not in ``_REBUILT``)."""
        return self._keys.live_groups()

    def __deepcopy__(self, memo: dict) -> BucketedOptimizer:
        for group in self._live_groups():
            memo.setdefault(id(group), group)  # the copy uses the same group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self) -> BucketedOptimizer:
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self._live_groups(pickled=True):
            raise TypeError(
                f"{type(self).__name__} refers to a process group (process_group=, or one it found or "
                f"its sharded parameters use), a live connection between processes that pickle "
                f"cannot carry. copy.deepcopy(optimizer) works (the copy shares the group); to save "
                f"the optimizer, save optimizer.state_dict() (torch.save, or "
                f"torch.distributed.checkpoint) and load_state_dict() it into an optimizer built "
                f"with the same process_group")
        reduced = super().__reduce_ex__(protocol)
        if not self._REBUILT or not isinstance(reduced, tuple) or len(reduced) < 3:
            return reduced
        state = {k: v for k, v in reduced[2].items() if k not in self._REBUILT}
        return reduced[:2] + (state,) + reduced[3:]

    # -- introspection --------------------------------------------------
    def backends_in_use(self) -> dict[str, str]:
        """Which backend serves each bucket (after the first step)."""
        return {f"group{gi}/{dev}/{str(dt).removeprefix('torch.')}": b.backend.name
                for (gi, dev, dt, *_), b in self._plan.buckets.items()}
