"""Anderson mixing (Xie et al., 2018, Algorithm 2): the interpolation step with
coefficients refit every step from the Gram matrix of the last k gradients."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..gram import reduce_gram, reduce_sharded, ring_gram, shift_in_row
from ..sharding import collective_device
from ..solvers import DEFAULT_SINGULAR_TOL, anderson_coefficients
from ._base import BucketedOptimizer


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
    back to :math:`a = e_1` (an SGD step) and is counted in
    ``state["anderson"]["fallbacks"]``. One global :math:`a` serves every
    parameter (the paper's :math:`x` is the whole model); each group keeps its
    own ``lr`` and ``weight_decay``. The Gram matrix is kept between steps: a
    step computes its one new row in a read-only pass, then the update pass
    (Interpolatron's, which also stores the gradient) applies it: two passes,
    :math:`3k+3` element accesses, and histories of :math:`k-1` iterates and
    :math:`k-1` gradients. Solves run in float64 on the device without a host
    sync.

    When the set of parameters with gradients changes (a new parameter, a
    parameter or a whole group without a gradient this step), the Gram matrix
    is recomputed from the stored histories of the parameters that have a
    gradient now (a parameter without one is skipped: unchanged, its history
    does not advance, and it does not enter the fit).

    Args:
        params: parameters or param groups (``lr``, ``weight_decay`` per group).
        lr: learning rate (float, or a 0-dim device tensor for CUDA graphs).
        history: k, the number of past gradients mixed.
        reg: relative Tikhonov regularisation of the Gram matrix.
        constraint: ``None`` or ``"simplex"``.
        weight_decay: coupled L2 coefficient.
        singular_tol: normalised pivot below which the system counts as singular.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        process_group: for plain-tensor shards (FSDP1 flat parameters,
            ``ZeroRedundancyOptimizer``), the group whose ranks hold the rest
            of the model: the Gram is summed over it. DTensor parameters
            (FSDP2) need nothing: their mesh says where the other shards are.

    Sharded parameters: every rank keeps its shards' partial Gram matrix and
    one all-reduce per step (float64, ``k x k``) sums it into the whole model's,
    so every rank solves for the same coefficients, equal to the
    single-process ones to float64 rounding whatever the layout.
    """

    _algorithm = "Anderson"

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-2, history: int = 2, reg: float = 0.0,
                 constraint: str | None = None, weight_decay: float = 0.0, *, maximize: bool = False,
                 singular_tol: float = DEFAULT_SINGULAR_TOL, backend: str = "auto",
                 process_group: Any = None):
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        if constraint not in (None, "simplex"):
            raise ValueError(f"constraint must be None or 'simplex', got {constraint!r}")
        self.history, self.reg, self.constraint, self.singular_tol = history, reg, constraint, singular_tol
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize)
        # Per reduction key: this rank's partial Gram and the active signature
        # it was built for (not checkpointed: rebuilt from the rings).
        self._local_grams: dict[tuple, tuple[Tensor, tuple]] = {}
        super().__init__(params, defaults, backend, process_group)

    def _ring_slots(self, group: dict) -> tuple[int, int]:
        return self.history - 1, self.history - 1

    def _coef_len(self, group: dict) -> int:
        return self.history

    def _config(self) -> dict:
        return dict(super()._config(), history=self.history)

    def _global(self, device: torch.device) -> dict:
        """Optimizer-wide state (kept in ``state["anderson"]`` so it checkpoints)."""
        st = self.state["anderson"]
        if "gram" not in st:
            k = self.history
            st["gram"] = torch.zeros(k, k, dtype=torch.float64, device=device)
            st["steps"] = torch.zeros((), dtype=torch.int64, device=device)
            st["coefficients"] = torch.zeros(k, dtype=torch.float64, device=device)
            st["fallbacks"] = torch.zeros((), dtype=torch.int64, device=device)
        elif st["gram"].device != device:  # loaded from a checkpoint mapped elsewhere
            for key in ("gram", "steps", "coefficients", "fallbacks"):
                st[key] = st[key].to(device)
        return st

    @staticmethod
    def _active_columns(w) -> Tensor | None:
        """The ring columns of the members that have a gradient (None: all)."""
        if len(w.params) == len(w.bucket.members):
            return None
        parts = [torch.arange(off, off + p.numel()) for off, p in zip(w.offsets, w.params)]
        return torch.cat(parts).to(w.bucket.g_hist.device)

    def _active_signature(self, work) -> tuple:
        """Which parameters have a gradient this step, cheaply: when every bucket
        is complete (the usual step) its identity suffices; only a partial
        step pays for the exact index set (this runs on the hot path)."""
        if all(len(w.params) == len(w.bucket.members) for w in work):
            return ("buckets",) + tuple((w.bucket.key[0], str(w.bucket.key[1]), str(w.bucket.key[2]),
                                         len(w.params)) for w in work)
        order = self._group_index()
        return ("params",) + tuple(sorted(order[id(p)] for w in work for p in w.keys))

    @property
    def coefficients(self) -> Tensor:
        """The mixing coefficients of the last step (float64, age order, on the device)."""
        st = self.state.get("anderson", {})
        if "coefficients" not in st:
            raise RuntimeError("no step has been taken yet")
        return st["coefficients"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One Anderson step: the read-only Gram pass, the on-device solve, the update
        pass (which stores the gradient and the old iterate)."""
        loss = self._closure_loss(closure)
        work = self._prepare()
        reductions = self._reductions()
        if not work and not reductions:
            return loss
        # A rank without gradients (a ZeRO rank owning no parameter) still joins the sum.
        home = work[0].bucket.count.device if work else collective_device(reductions[0][0])
        st = self._global(home)
        for w in work:
            b, group = w.bucket, w.group
            b.backend.gram_row(w.params, w.grads, w.offsets, b.g_hist, b.count,
                               group["weight_decay"], group["maximize"], b.gram, b.cache, store=False)
        k = self.history
        if reductions:
            gram = self._sharded_gram(work, reductions, home)
        else:
            # The Gram is over the parameters that have a gradient now, each at its
            # own (aligned) ages. The kept matrix is only valid for the same set as
            # the last step's: otherwise its older ages are recomputed from the rings.
            row = reduce_gram([w.bucket.gram for w in work], home)
            active = self._active_signature(work)
            kept = st["gram"]
            if (self._membership_changed or st.get("active") != active) and k > 1:
                kept = self._older_from_rings(work, home)
            gram = shift_in_row(kept, row)
            st["active"] = active
        valid = torch.arange(k, device=home) <= st["steps"]
        coefs, fell_back = anderson_coefficients(gram, valid, self.reg, self.constraint, self.singular_tol)
        st["gram"].copy_(gram)
        st["coefficients"].copy_(coefs)
        st["fallbacks"].add_(fell_back.to(torch.int64))
        st["steps"].add_(1)
        for w in work:
            b, group = w.bucket, w.group
            self._sync_lr(b, group)
            b.coefs.copy_(coefs)  # same device: a device copy; another device: a peer copy
            b.backend.combine(w.params, w.grads, w.offsets, b.x_hist, b.g_hist, b.coefs, b.lr, b.count,
                              group["weight_decay"], group["maximize"], None, b.cache)
        self._advance(work)
        return loss

    def _older_from_rings(self, work, home: torch.device) -> Tensor:
        """A ``k x k`` matrix whose ages ``0..k-2`` block is recomputed from the
        rings (they hold ages 1..k-1, which as of ``count - 1`` are ages 0..k-2)."""
        k = self.history
        kept = torch.zeros(k, k, dtype=torch.float64, device=home)
        kept[: k - 1, : k - 1] = ring_gram(
            [(w.bucket.g_hist, w.bucket.count - 1, self._active_columns(w)) for w in work], k - 1, home)
        return kept

    def _sharded_gram(self, work, reductions: list[tuple], home: torch.device) -> Tensor:
        """The whole model's Gram when parameters are sharded over ranks.

        Each rank keeps its shards' partial ``k x k`` Gram per reduction key,
        updated like the single-process matrix (one new row per step, the
        older ages rebuilt from its own rings when its set of parameters with
        gradients changes, or after a checkpoint load). The whole model's is
        the sum of the partial matrices over the ranks: one all-reduce per
        key and step, the same collectives on every rank whatever changed on
        which rank, so no rank has to know about another's changes."""
        k = self.history
        by_key: dict[tuple, list] = defaultdict(list)
        for w in work:
            by_key[w.bucket.reduction].append(w)
        parts: dict[tuple, Tensor] = {}
        for key, ws in by_key.items():
            row = reduce_gram([w.bucket.gram for w in ws], home)
            signature = self._active_signature(ws)
            kept, had = self._local_grams.get(key, (None, None))
            if kept is None or self._membership_changed or had != signature:
                kept = (self._older_from_rings(ws, home) if k > 1
                        else torch.zeros(k, k, dtype=torch.float64, device=home))
            parts[key] = shift_in_row(kept, row)
            self._local_grams[key] = (parts[key], signature)
        for key in [key for key in self._local_grams if key not in by_key]:
            del self._local_grams[key]  # none of its parameters has a gradient now
        return reduce_sharded(parts, reductions, torch.zeros(k, k, dtype=torch.float64, device=home))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._local_grams = {}  # the checkpoint's layout may differ: rebuilt from the rings
