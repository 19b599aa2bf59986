"""Anderson mixing (Xie et al., 2018, Algorithm 2): the interpolation step with
coefficients refit every step from the Gram matrix of the last k gradients."""

from __future__ import annotations

import functools
import numbers
import warnings
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor

from .. import ops
from ..gram import reduce_gram, reduce_sharded, ring_gram, shift_in_row
from ..sharding import collective_device
from ..solvers import DEFAULT_SINGULAR_TOL, _first_unit, anderson_coefficients
from ._amp import AmpStep
from ._base import BucketedOptimizer
from ._buckets import Work
from ._checkpoint import CheckpointError, load_count, load_tensor
from ._checks import LATER_GROUP_KEYS, check_real
from ._partials import PARTIALS_KEY, entry, layouts, plan_partials, take

# Settings that belong to the optimizer, not to a group (one Gram matrix
# serves every group); they are param-group entries so that state_dict(),
# distributed checkpoints and deepcopy carry them, and must agree across groups.
OPTIMIZER_WIDE = ("history", "reg", "constraint", "singular_tol", "one_pass")

# Anderson's settings added after checkpoints were first written, with the
# value that reproduces the old behaviour (a saved group without one loads so).
ANDERSON_LATER_GROUP_KEYS = {**LATER_GROUP_KEYS, "one_pass": False}

# Optimizer-wide state, kept in the state of the anchor parameter (the first
# parameter of the first group) so that optimizer.state has parameter keys only.
GLOBAL_KEYS = ("anderson_gram", "anderson_steps", "anderson_coefficients", "anderson_fallbacks",
               "anderson_active")

# The consecutive-fallback warning: checked every FALLBACK_CHECK_EVERY steps
# (the check reads one device counter without a sync, see _read_streak), raised
# once when the last FALLBACK_WARN_STREAK steps or more all fell back.
FALLBACK_CHECK_EVERY = 100
FALLBACK_WARN_STREAK = 50


@functools.lru_cache(maxsize=64)
def _ages(k: int, device: torch.device) -> Tensor:
    """``0..k-1`` on ``device``, made once: the warm-up mask compares the step
    count with it every step (an op fewer on the host path of each step)."""
    return torch.arange(k, device=device)


def check_anderson_settings(group: dict) -> None:
    """Anderson's settings of one group (normalised in place)."""
    history = group["history"]
    if isinstance(history, bool) or not isinstance(history, numbers.Integral) or history < 1:
        raise ValueError(f"history must be an integer >= 1, got {history!r}")
    group["history"] = int(history)
    group["reg"] = check_real("reg", group["reg"])
    if group["constraint"] not in (None, "simplex"):
        raise ValueError(f"constraint must be None or 'simplex', got {group['constraint']!r}")
    group["singular_tol"] = check_real("singular_tol", group["singular_tol"], positive=True)
    if not isinstance(group["one_pass"], bool):
        raise ValueError(f"one_pass must be True or False, got {group['one_pass']!r}")


class Anderson(BucketedOptimizer):
    r"""Anderson mixing of the last ``history`` iterates.

    .. math::
        M_{ij} = \langle g^{(t-i)}, g^{(t-j)} \rangle,\quad
        a = \frac{M^{-1}\mathbf 1}{\mathbf 1^\top M^{-1}\mathbf 1}
          = \arg\min_{\sum a_i = 1} \Big\|\sum_i a_i g^{(t-i)}\Big\|,\qquad
        x^{(t)} = \sum_{i=1}^{m} a_i x^{(t-i)} - \eta_t \sum_{i=1}^{m} a_i g^{(t-i)},

    with :math:`m = \min(t, k)` during warm-up (the first step is SGD).
    ``reg`` solves with :math:`M + \text{reg}\,\frac{\operatorname{tr} M}{m} I`;
    ``constraint="simplex"`` minimises :math:`a^\top M a` over
    :math:`a \ge 0, \sum a = 1` exactly. A singular or non-finite system falls
    back to :math:`a = e_1` (an SGD step) and is counted in :attr:`fallbacks`
    (a one-time warning says so when it happens on many consecutive steps). One global :math:`a` serves every
    parameter (the paper's :math:`x` is the whole model); each group keeps its
    own ``lr`` and ``weight_decay``. The Gram matrix is kept between steps: a
    step computes its one new row in a read-only pass, then the update pass
    (Interpolatron's, which also stores the gradient) applies it: two passes,
    :math:`3k+3` element accesses, and histories of :math:`k-1` iterates and
    :math:`k-1` gradients. Solves run in float64 on the device without a host
    sync.

    ``one_pass=True`` (ALGORITHMS.md section 2b; not the paper's algorithm)
    solves step :math:`t`'s coefficients from the Gram kept at the end of step
    :math:`t-1` (so :math:`m = \min(t-1, k)`, and the first two steps are SGD
    steps) and applies them to the current window; the new row is computed
    inside the update pass. One pass, :math:`2k+3` element accesses,
    Interpolatron's cost. Measured, it converges worse than exact Anderson on
    every problem tried, each at its tuned rate (``bench/RESULTS.md`` section
    2.7): Anderson's coefficients alternate from step to step, so one step of
    lag makes them wrong. Exact is the default.

    When the set of parameters with gradients changes (a new parameter, a
    parameter or a whole group without a gradient this step), the Gram matrix
    is recomputed from the stored histories of the parameters that have a
    gradient now (a parameter without one is skipped: unchanged, its history
    does not advance, and it does not enter the fit).

    ``history``, ``reg``, ``constraint``, ``singular_tol`` and ``one_pass`` are stored in
    every param group (so checkpoints carry them) and must agree across groups.
    The optimizer-wide state (Gram matrix, step and fallback counts,
    coefficients, the last step's set of parameters with gradients) lives in
    the state of the first parameter of the first group under
    ``anderson_*`` keys: ``optimizer.state`` has parameter keys only.

    Args:
        params: parameters or param groups (``lr``, ``weight_decay`` per group).
        lr: learning rate (float, or a 0-dim device tensor for CUDA graphs).
        history: k, the number of past gradients mixed.
        reg: relative Tikhonov regularisation of the Gram matrix.
        constraint: ``None`` or ``"simplex"``.
        weight_decay: coupled L2 coefficient.
        singular_tol: normalised pivot below which the system counts as singular.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (``"cuda"`` is its old name).
        master_weights: float32 master copies of 16-bit parameters and float32
            rings (see :class:`~interpolatron.optim.Interpolatron`).
        stochastic_rounding, sr_seed: unbiased stochastic rounding of every
            16-bit write (see :class:`~interpolatron.optim.Interpolatron`).
        process_group: for plain-tensor slices of one model, the group whose
            ranks hold the rest of it: the Gram is summed over it. ``None``
            (the default): taken from a ``ZeroRedundancyOptimizer`` building
            this optimizer and from FSDP1's flat parameters; otherwise, under
            an initialised process group of more than one rank, the first
            step checks once (one all-reduce) that every rank holds the same
            parameters (DDP) and raises, naming the fix, if not. ``"local"``:
            each rank's parameters are its whole model (no sum, no check).
            DTensor parameters (FSDP2) need nothing: their mesh says where the
            other shards are.
        one_pass: coefficients one step old, the Gram row computed in the
            update pass (one pass instead of two); ``False`` (default) is
            exact Anderson.

    Sharded parameters: every rank keeps its shards' partial Gram matrix and
    one all-reduce per step (float64, ``k x k``) sums it into the whole model's,
    so every rank solves for the same coefficients, equal to the
    single-process ones to float64 rounding whatever the layout.
    ``state_dict()`` also writes each rank's partial Grams, by layout (the
    top-level ``"anderson_partials"``, :mod:`interpolatron.optim._partials`):
    a resume on the same layout is bitwise, 16-bit rings included.
    """

    _algorithm = "Anderson"
    _later_group_keys = ANDERSON_LATER_GROUP_KEYS
    # A pending device-to-host copy of the streak (a CUDA event): not copied.
    _TRANSIENT = BucketedOptimizer._TRANSIENT + ("_streak_copy",)
    # The partial Grams of sharded parameters, keyed by process groups: pickle
    # cannot carry the groups, so a pickled copy carries them as a checkpoint
    # does (_carried), by layout.
    _REBUILT = ("_local_grams",)
    # Partial Grams from a checkpoint (or a pickled copy), waiting for the
    # first step's host setup to match them to this run's layout (_partials.py).
    _carried: list[dict] | None = None

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-2, history: int = 2, reg: float = 0.0,
                 constraint: str | None = None, weight_decay: float = 0.0, *, maximize: bool = False,
                 singular_tol: float = DEFAULT_SINGULAR_TOL, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False, sr_seed: int = 0,
                 process_group: Any = None, one_pass: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize, history=history, reg=reg,
                        constraint=constraint, singular_tol=singular_tol,
                        stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, one_pass=one_pass)
        check_anderson_settings(dict(defaults))
        self._active_sig: tuple | None = None  # which parameters had a gradient at the last step
        self._streak: Tensor | None = None  # consecutive fallbacks (device), for the warning
        self._steps_until_check = FALLBACK_CHECK_EVERY
        self._fallback_warned = False
        # Sharded parameters, per reduction key: this rank's partial Gram and
        # the active signature it was built for (keyed by process groups:
        # state_dict() writes it by layout, see _partials.py).
        self._local_grams: dict[tuple, tuple[Tensor, tuple]] = {}
        # Not sharded: the matrix the step's new row is shifted into (the kept
        # Gram, or its older ages rebuilt from the rings when the set of
        # parameters with gradients changed), apart from the kept Gram (the last
        # taken step's), which a GradScaler-skipped step must not replace.
        self._base: Tensor | None = None
        super().__init__(params, defaults, backend, master_weights, process_group)

    # -- settings -------------------------------------------------------
    def _setting(self, key: str):
        return self.param_groups[0][key] if self.param_groups else self.defaults[key]

    @property
    def history(self) -> int:
        """k, the number of past gradients mixed (read-only: a param-group entry)."""
        return self._setting("history")

    @property
    def reg(self) -> float:
        return self._setting("reg")

    @property
    def constraint(self) -> str | None:
        return self._setting("constraint")

    @property
    def singular_tol(self) -> float:
        return self._setting("singular_tol")

    @property
    def one_pass(self) -> bool:
        """Whether the coefficients are one step old (ALGORITHMS.md section 2b)."""
        return self._setting("one_pass")

    def _validate_group(self, group: dict, read_lr: bool = True) -> None:
        super()._validate_group(group, read_lr)
        check_anderson_settings(group)

    def _validate_groups(self, groups: list[dict]) -> None:
        for key in OPTIMIZER_WIDE:
            for i, g in enumerate(groups[1:], 1):
                if g[key] != groups[0][key]:
                    raise ValueError(f"{key} is optimizer-wide (one Gram matrix serves every group): "
                                     f"param group {i} has {g[key]!r}, param group 0 {groups[0][key]!r}")

    def _check_k_unchanged(self) -> None:
        super()._check_k_unchanged()
        st = self.state.get(self._anchor(), {})
        if "anderson_gram" in st and st["anderson_gram"].shape[0] != self.history:
            raise ValueError(f"history (k) cannot change once the history exists (it is "
                             f"{st['anderson_gram'].shape[0]}, the param groups say {self.history}); "
                             f"build a new optimizer instead")

    def _ring_slots(self, group: dict) -> tuple[int, int]:
        return group["history"] - 1, group["history"] - 1

    def _coef_len(self, group: dict) -> int:
        return group["history"]

    def _config(self) -> dict:
        return dict(super()._config(), history=self.history)

    # -- optimizer-wide state -------------------------------------------
    def _anchor(self) -> Tensor:
        return next(p for g in self.param_groups for p in g["params"])

    def _global(self, anchor: Tensor) -> dict:
        """Optimizer-wide state, in the anchor parameter's state (so it checkpoints)."""
        st = self.state[anchor]
        if "anderson_gram" not in st:
            k, device = self.history, anchor.device
            st["anderson_gram"] = torch.zeros(k, k, dtype=torch.float64, device=device)
            st["anderson_steps"] = torch.zeros((), dtype=torch.int64, device=device)
            st["anderson_coefficients"] = torch.zeros(k, dtype=torch.float64, device=device)
            st["anderson_fallbacks"] = torch.zeros((), dtype=torch.int64, device=device)
        return st

    def _extra_state_keys(self, index: int) -> tuple[str, ...]:
        return GLOBAL_KEYS if index == 0 else ()

    def _plan_extra_state(self, groups: list[dict], params: list[Tensor], state: dict,
                          bucket_steps: dict) -> None:
        anchor = params[0]
        entry = state.get(anchor, {})
        present = [key for key in GLOBAL_KEYS if key in entry]
        with_history = [i for i, p in enumerate(params) if "x_hist" in state.get(p, {})]
        if not present:
            if with_history:
                raise CheckpointError(f"state of parameter 0 lacks Anderson's optimizer-wide state "
                                      f"({', '.join(GLOBAL_KEYS)}) although parameter {with_history[0]} "
                                      f"has a history")
            return
        if len(present) != len(GLOBAL_KEYS):
            missing = next(key for key in GLOBAL_KEYS if key not in entry)
            raise CheckpointError(f"state of parameter 0 lacks {missing!r} (it has {present})")
        k, device = groups[0]["history"], anchor.device
        what = "state of parameter 0, key {!r}".format
        f64 = dict(dtype=torch.float64, device=device)
        new = {
            "anderson_gram": load_tensor(entry["anderson_gram"], what("anderson_gram"), shape=(k, k), **f64),
            "anderson_coefficients": load_tensor(entry["anderson_coefficients"],
                                                 what("anderson_coefficients"), shape=(k,), **f64),
            "anderson_steps": load_count(entry["anderson_steps"], what("anderson_steps"), device),
            "anderson_fallbacks": load_count(entry["anderson_fallbacks"], what("anderson_fallbacks"), device),
            # On the CPU: compared on the host when the set of parameters with gradients changes.
            "anderson_active": load_tensor(entry["anderson_active"], what("anderson_active"),
                                           dtype=torch.bool, device=torch.device("cpu"),
                                           shape=(len(params),)),
        }
        if not torch.equal(new["anderson_gram"], new["anderson_gram"].T):
            raise CheckpointError(f"{what('anderson_gram')} is not symmetric")
        steps, fallbacks = int(new["anderson_steps"]), int(new["anderson_fallbacks"])
        if steps < 1 or not with_history:
            raise CheckpointError(f"{what('anderson_steps')} is {steps} while "
                                  f"{len(with_history)} parameters have a history")
        if fallbacks > steps:
            raise CheckpointError(f"{what('anderson_fallbacks')} ({fallbacks}) exceeds "
                                  f"the steps taken ({steps})")
        for (gi, dev, dt), count in bucket_steps.items():
            if count > steps:
                raise CheckpointError(f"param group {gi} ({dev}, {dt}) has step {count}, more than "
                                      f"Anderson's {what('anderson_steps')} ({steps})")
        active = new["anderson_active"]
        if not bool(active.any()):
            raise CheckpointError(f"{what('anderson_active')} marks no parameter")
        for i in active.nonzero().flatten().tolist():
            if "x_hist" not in state.get(params[i], {}):
                raise CheckpointError(f"{what('anderson_active')} marks parameter {i}, which has no history")
        state[anchor] = {**{key: v for key, v in entry.items() if key not in GLOBAL_KEYS}, **new}

    def _live_groups(self, pickled: bool = False) -> list:
        # The partial Grams are kept per reduction key (tuples of process groups).
        kept = [] if pickled else [g for key in self._local_grams for g in key]
        return super()._live_groups(pickled) + kept

    def _plan_extra_entries(self, state_dict: Any, groups: list[dict], state: dict) -> list[dict] | None:
        anchor = next((p for g in groups for p in g["params"]), None)
        if anchor is None:
            return None
        return plan_partials(state_dict.get(PARTIALS_KEY), groups[0]["history"], anchor.device)

    def _after_load(self, extra: list[dict] | None = None) -> None:
        self._active_sig = None
        self._streak = None
        self._local_grams = {}
        # Only a sharded optimizer keeps partials: elsewhere they are dropped now.
        self._carried = (extra or None) if self._reductions() else None
        self._base = None

    def _layouts(self) -> dict[tuple, tuple]:
        return layouts(self.param_groups, self.state, self._keys.of, self._reductions(), self.master_weights)

    def _partials_to_save(self) -> list[dict]:
        """This rank's partial Grams with their layouts (see _partials.py); those
        carried from a checkpoint while no step has used them yet."""
        if not self._local_grams:
            return [entry(c["layout"], c["active"], c["gram"]) for c in self._carried or ()]
        found = self._layouts()
        return [entry(found[key], active, gram) for key, (gram, active) in self._local_grams.items()
                if key in found]

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with Anderson's optimizer-wide state in the
        anchor's entry and, when sharded, this rank's partial Grams under
        ``"anderson_partials"`` (so that a resume on the same layout is bitwise;
        see :mod:`interpolatron.optim._partials`)."""
        sd = super().state_dict()
        partials = self._partials_to_save()
        if partials:
            sd[PARTIALS_KEY] = partials
        return sd

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        if self._local_grams and isinstance(reduced, tuple) and len(reduced) >= 3:
            # The partial Grams go by layout, as in a checkpoint: the copy's first
            # step takes them back where its layout is this one's.
            reduced = reduced[:2] + ({**reduced[2], "_carried": self._partials_to_save()},) + reduced[3:]
        return reduced

    # -- introspection --------------------------------------------------
    @property
    def coefficients(self) -> Tensor:
        """The mixing coefficients of the last step (float64, age order, on the device)."""
        st = self.state.get(self._anchor(), {})
        if "anderson_coefficients" not in st:
            raise RuntimeError("no step has been taken yet")
        return st["anderson_coefficients"]

    @property
    def fallbacks(self) -> Tensor:
        """How many steps fell back to an SGD step (singular or non-finite Gram
        system): a 0-dim int64 device tensor, checkpointed (zero before the first step)."""
        anchor = self._anchor()
        st = self.state.get(anchor, {})
        if "anderson_fallbacks" not in st:
            return torch.zeros((), dtype=torch.int64, device=anchor.device)
        return st["anderson_fallbacks"]

    # -- the step -------------------------------------------------------
    @staticmethod
    def _active_spans(w) -> list[tuple[int, int]] | None:
        """The ring columns of the members that have a gradient (None: all)."""
        if len(w.params) == len(w.bucket.members):
            return None
        return [(off, p.numel()) for off, p in zip(w.offsets, w.params)]

    def _active_signature(self, work) -> tuple:
        """Which parameters have a gradient this step, cheaply: when every bucket
        is complete (the usual step) its identity suffices; only a partial
        step pays for the exact index set (this runs on the hot path)."""
        if all(len(w.params) == len(w.bucket.members) for w in work):
            return ("buckets",) + tuple((w.bucket.key[0], str(w.bucket.key[1]), str(w.bucket.key[2]),
                                         len(w.params)) for w in work)
        order = self._group_index()
        return ("params",) + tuple(sorted(order[id(p)] for w in work for p in w.keys))

    def _active_set_changed(self, work, st: dict) -> bool:
        """Whether the parameters with a gradient differ from the last step's
        (kept in ``st["anderson_active"]``, a CPU mask, so a resumed run
        decides exactly as the uninterrupted one)."""
        n = sum(len(g["params"]) for g in self.param_groups)
        sig = self._active_signature(work)
        prev = st.get("anderson_active")
        if sig == self._active_sig and prev is not None and prev.numel() == n:
            return False
        flat = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        mask = torch.zeros(n, dtype=torch.bool)
        mask[[flat[id(p)] for w in work for p in w.keys]] = True
        self._active_sig = sig
        st["anderson_active"] = mask
        return prev is None or not torch.equal(prev, mask)

    def _count_fallback(self, st: dict, fell_back: Tensor, taken: Tensor | None = None) -> None:
        fb = fell_back.to(torch.int64)
        if taken is not None:  # GradScaler's skipped step: counts nothing, keeps the streak
            fb = fb * taken
        st["anderson_fallbacks"].add_(fb)
        if taken is None:
            self._streak.mul_(fb).add_(fb)  # +1 on a fallback, back to 0 otherwise
        else:
            self._streak.copy_(torch.where(taken.bool(), self._streak * fb + fb, self._streak))
        if torch.compiler.is_compiling():
            # A Python counter read in a compiled step would recompile it every
            # step: the periodic check runs in eager steps only.
            return
        self._steps_until_check -= 1
        if self._steps_until_check > 0 or self._fallback_warned:
            return
        self._steps_until_check = FALLBACK_CHECK_EVERY
        capturing = fb.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            return
        streak = self._read_streak()
        if streak is not None and streak >= FALLBACK_WARN_STREAK:
            self._fallback_warned = True
            warnings.warn(
                f"Anderson fell back to a plain SGD step (coefficients e_1) on each of the last {streak} "
                f"steps: its Gram system is singular or non-finite. Usual causes: a non-finite parameter "
                f"or gradient (a NaN parameter with weight_decay > 0 poisons every later gradient), or "
                f"(nearly) collinear gradients (a one-dimensional or very flat problem); reg > 0 makes "
                f"near-collinear systems solvable. Anderson.fallbacks counts them. (Warned once.)",
                RuntimeWarning, stacklevel=3)

    def _read_streak(self) -> int | None:
        """The streak counter on the host without a device sync: on a GPU the
        copy started at the previous check is read if it has landed (its event
        is queried, never waited on), and a new non-blocking copy is started;
        so the warning comes at most one check period late."""
        if self._streak.device.type == "cpu":
            return int(self._streak.numpy())  # host memory: no sync, no aten::item
        value = None
        pending = getattr(self, "_streak_copy", None)
        if pending is not None and pending[1].query():
            value = int(pending[0].numpy())
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(self._streak, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._streak_copy = (host, event)
        return value

    def _init_group(self) -> None:
        """Host setup (see the base class), and the Gram kept between steps made
        valid for this step's parameters. The Gram is over the parameters that
        have a gradient now, each at its own (aligned) ages; the kept matrix is
        only valid for the same set as the last step's: otherwise its older ages
        are recomputed from the rings, here, before any op of the step (under
        torch.compile this runs while tracing, when such a change retraces)."""
        super()._init_group()  # every check first: a refused step changes nothing
        work = self._plan.work
        reductions = self._reductions()
        if not work and not reductions:
            return
        if not any(g["params"] for g in self.param_groups):
            return  # a ZeRO rank that owns no parameter: its step only joins the sum
        anchor = self._anchor()
        st = self._global(anchor)
        if self._streak is None or self._streak.device != anchor.device:
            self._streak = torch.zeros((), dtype=torch.int64, device=anchor.device)
        if not work:
            return  # sharded, none of this rank's parameters has a gradient: it joins the sum
        changed = self._active_set_changed(work, st)
        k = self.history
        # Sharded, each rank keeps partial Grams per reduction key instead
        # (rebuilt from its own rings here, before any pass writes them; used in
        # _sharded_gram): the optimizer-wide matrix is the all-reduced sum, not
        # refreshed from local rings.
        if reductions:
            self._refresh_local_grams(work, anchor.device)
            self._base = None
            return
        if self._base is None or self._base.device != anchor.device:
            self._base = st["anderson_gram"].clone()
        if (self._plan.membership_changed or changed) and k > 1:
            # The rings hold ages 1..k-1: as of count - 1 they are ages 0..k-2.
            older = ring_gram([(w.bucket.g_hist, w.bucket.count - 1, self._active_spans(w)) for w in work],
                              k - 1, anchor.device)
            fresh = torch.zeros_like(st["anderson_gram"])
            fresh[: k - 1, : k - 1] = older
            # The step shifts its new row into this whatever GradScaler decides:
            # a skipped step leaves the rings, so it is right for the retry too,
            # which sees no change of the set. (The kept Gram, the last taken
            # step's, is what one-pass Anderson solves from.)
            self._base.copy_(fresh)

    def _step_buckets(self, work: list[Work], amp: AmpStep) -> None:
        """The read-only Gram pass, the on-device solve, the update pass (which
        stores the gradient and the old iterate). With ``one_pass``: the solve
        from the kept Gram, then the update pass, which also computes the new
        Gram row. GradScaler's skipped step also keeps the Gram matrix, the
        coefficients and the step and fallback counts."""
        reductions = self._reductions()
        if not work and not reductions:
            return
        k = self.history
        if not any(g["params"] for g in self.param_groups):
            # A ZeRO rank that owns no parameter: it only joins the sum.
            reduce_sharded({}, reductions, torch.zeros(k, k, dtype=torch.float64,
                                                       device=collective_device(reductions[0][0])))
            return
        anchor = self._anchor()
        home = anchor.device
        st = self.state[anchor]
        if self.one_pass:
            self._update_one_pass(work, reductions, amp, st, home)
            return
        for w in work:
            b, group = w.bucket, w.group
            ops.gram_row(w.params, w.grads, w.offsets, b.g_hist, b.count, group["weight_decay"],
                         group["maximize"], b.gram, b.backend.name, b.cache, **amp.kernel_args(b.device),
                         master=b.master)
        if reductions:
            # The active set was recorded in _init_group; the partial Grams are
            # kept per reduction key and summed over the ranks.
            gram = self._sharded_gram(work, reductions, home, amp.skip(home))
        else:
            row = reduce_gram([w.bucket.gram for w in work], home)
            gram = shift_in_row(self._base, row)
        valid = _ages(k, home) <= st["anderson_steps"]
        coefs, fell_back = anderson_coefficients(gram, valid, self.reg, self.constraint, self.singular_tol)
        skip = amp.skip(home)
        if not reductions:
            self._base.copy_(gram if skip is None else torch.where(skip, self._base, gram))
        coefs = self._keep(st, gram, coefs, fell_back, amp, skip, home)
        self._update(work, coefs, amp, rows=False)

    def _keep(self, st: dict, gram: Tensor, coefs: Tensor, fell_back: Tensor, amp: AmpStep,
              skip: Tensor | None, home: torch.device) -> Tensor:
        """Store this step's Gram and coefficients and count the step and its
        fallback; GradScaler's skipped step keeps the optimizer-wide state.
        Returns the coefficients the update pass applies."""
        if skip is not None:  # GradScaler's skipped step keeps the optimizer-wide state
            gram = torch.where(skip, st["anderson_gram"], gram)
            coefs = torch.where(skip, st["anderson_coefficients"], coefs)
        st["anderson_gram"].copy_(gram)
        st["anderson_coefficients"].copy_(coefs)
        taken = amp.taken(home)
        st["anderson_steps"].add_(1 if taken is None else taken)
        self._count_fallback(st, fell_back, taken)
        return coefs

    def _update(self, work: list[Work], coefs: Tensor, amp: AmpStep, rows: bool) -> None:
        """The update pass of every bucket; ``rows``: each bucket's partial Gram
        row of the new gradient lands in ``bucket.gram`` (computed in the pass)."""
        for w in work:
            b = w.bucket
            mine = coefs if coefs.device == b.device else coefs.to(b.device)  # a peer copy, no state write
            self._combine(w, mine, amp, b.gram if rows else None)

    def _update_one_pass(self, work: list[Work], reductions: list[tuple], amp: AmpStep, st: dict,
                         home: torch.device) -> None:
        """One-pass Anderson (ALGORITHMS.md section 2b): step t solves from the Gram
        kept at the end of step t-1 (ages 1..m relative to now, m = min(t-1, k);
        the first step is SGD) and applies those coefficients to the current
        window; its update pass computes the new row <g^(t-1), g^(t-j)>, which
        is shifted in for step t+1. One pass over the gradient, no host sync."""
        k = self.history
        steps = st["anderson_steps"]
        first = steps == 0
        valid = _ages(k, home) < steps.clamp(min=1)
        coefs, fell_back = anderson_coefficients(st["anderson_gram"], valid, self.reg, self.constraint,
                                                 self.singular_tol)
        # Nothing kept yet: an SGD step, not a fallback.
        coefs = torch.where(first, _first_unit(k, home, coefs.dtype), coefs)
        fell_back = fell_back & ~first
        # Sharded: each rank's partial Gram was rebuilt from its rings in the
        # host setup where its set of parameters changed, before this pass
        # overwrites their oldest slot.
        self._update(work, coefs, amp, rows=True)
        skip = amp.skip(home)
        if reductions:
            gram = self._sharded_gram(work, reductions, home, skip)
        else:
            gram = shift_in_row(self._base, reduce_gram([w.bucket.gram for w in work], home))
            self._base.copy_(gram if skip is None else torch.where(skip, self._base, gram))
        self._keep(st, gram, coefs, fell_back, amp, skip, home)

    def _ring_partial(self, ws, home: torch.device) -> Tensor:
        """This rank's ``k x k`` partial Gram rebuilt from the rings: the ages
        ``0..k-2`` block (the rings hold ages 1..k-1, which as of ``count - 1``
        are ages 0..k-2), each entry computed exactly as the running sums took
        it, so that a rebuilt matrix equals the kept one bitwise: by the
        bucket's own ``gram_row`` kernel, with the newer gradient in the role
        of the new one (its stored value is the effective gradient the step
        formed: no weight decay, sign or scale again), the buckets summed in
        the order of the step's row. (Exact for float32 and float64 rings; a
        16-bit ring holds the rounded gradient, the running sums the float32
        one: a checkpoint carries those partials, see _partials.py.) No host
        read: the slots are chosen on the device from ``count``."""
        k = self.history
        kept = torch.zeros(k, k, dtype=torch.float64, device=home)
        slots = k - 1
        if slots == 0:
            return kept
        block = None
        for w in ws:
            b = w.bucket
            # by_slot[s, s'] = <slot s, slot s'>, slot s as the new gradient: gram_row
            # with count = s reads age m from slot (s - m) mod S, m = 1..S.
            counts = torch.arange(slots, dtype=torch.int64, device=b.device)
            by_slot = torch.empty(slots, slots, dtype=torch.float64, device=b.device)
            row = torch.empty(k, dtype=torch.float64, device=b.device)
            # The ring dtype's tensors in the params' role (not read: no weight
            # decay): with master weights the rings are float32, the params 16-bit.
            params = w.params if b.master is None else [b.master_view(p) for p in w.keys]
            for s in range(slots):
                grads = [b.views(p)[1][s] for p in w.keys]
                ops.gram_row(params, grads, w.offsets, b.g_hist, counts[s], 0.0, False, row,
                             b.backend.name, b.cache)
                by_slot[s, torch.remainder(s - torch.arange(1, k, device=b.device), slots)] = row[1:]
                by_slot[s, s] = row[0]
            # Ages 1..k-1 of this bucket, the newer age's row (the "new" role) above the diagonal.
            order = torch.remainder(b.count - torch.arange(1, k, device=b.device), slots)
            ages = by_slot.index_select(0, order).index_select(1, order)
            ages = (ages.triu() + ages.triu(1).T).to(home)
            block = ages if block is None else block + ages  # the order reduce_gram sums rows in
        kept[:slots, :slots] = block
        return kept

    def _refresh_local_grams(self, work, home: torch.device) -> None:
        """Host setup of a sharded step (eager, also under torch.compile): the
        kept partial Gram of each reduction key is rebuilt from the rings when
        the set of parameters with gradients changed or none is kept (the first
        step, after a load: there a partial carried by the checkpoint for this
        layout and set is taken instead); keys without work are dropped. The
        traced part (:meth:`_sharded_gram`) then only reads and updates it in place."""
        by_key: dict[tuple, list] = defaultdict(list)
        for w in work:
            by_key[w.bucket.reduction].append(w)
        carried, self._carried = self._carried, None
        found = self._layouts() if carried else {}
        for key, ws in by_key.items():
            signature = self._active_signature(ws)
            kept, had = self._local_grams.get(key, (None, None))
            if kept is None or self._plan.membership_changed or had != signature:
                # After a load: the checkpoint's partial where the uninterrupted
                # run would have kept its own (same layout and active set).
                mine = None if kept is not None or self._plan.membership_changed or not carried \
                    else take(carried, found.get(key), signature)
                self._local_grams[key] = (self._ring_partial(ws, home) if mine is None else mine, signature)
        for key in [key for key in self._local_grams if key not in by_key]:
            del self._local_grams[key]  # none of its parameters has a gradient now

    def _sharded_gram(self, work, reductions: list[tuple], home: torch.device,
                      skip: Tensor | None = None) -> Tensor:
        """The whole model's Gram when parameters are sharded over ranks.

        Each rank keeps its shards' partial ``k x k`` Gram per reduction key,
        updated like the single-process matrix (one new row per step; the
        older ages rebuilt from its own rings when its set of parameters with
        gradients changes, or after a checkpoint load, in the host setup:
        :meth:`_refresh_local_grams`). The whole model's is the sum of the
        partial matrices over the ranks: one all-reduce per key and step, the
        same collectives on every rank whatever changed on which rank (a ZeRO
        rank's parameters may lose their gradients while another rank's keep
        them), so no rank needs to know about another's changes.

        ``skip`` (GradScaler's inf flag): a skipped step keeps the stored
        partial matrix (the rings it was built from do not change either).
        The partial matrices were made valid for this step's parameters in the
        host setup (:meth:`_refresh_local_grams`), before any pass: one-pass
        Anderson's update pass writes the rings the rebuild reads."""
        k = self.history
        by_key: dict[tuple, list] = defaultdict(list)
        for w in work:
            by_key[w.bucket.reduction].append(w)
        parts: dict[tuple, Tensor] = {}
        for key, ws in by_key.items():
            row = reduce_gram([w.bucket.gram for w in ws], home)
            kept = self._local_grams[key][0]
            parts[key] = shift_in_row(kept, row)
            kept.copy_(parts[key] if skip is None else torch.where(skip, kept, parts[key]))
        return reduce_sharded(parts, reductions, torch.zeros(k, k, dtype=torch.float64, device=home))
