"""Anderson mixing (Xie et al., 2018, Algorithm 2): the interpolation step with
coefficients refit every step from the Gram matrix of the last k gradients."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .. import ops
from ..gram import reduce_gram, ring_gram, shift_in_row
from ..solvers import DEFAULT_SINGULAR_TOL, anderson_coefficients
from ._base import BucketedOptimizer, scheduler_ready


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
    """

    _algorithm = "Anderson"

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-2, history: int = 2, reg: float = 0.0,
                 constraint: str | None = None, weight_decay: float = 0.0, *, maximize: bool = False,
                 singular_tol: float = DEFAULT_SINGULAR_TOL, backend: str = "auto"):
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        if constraint not in (None, "simplex"):
            raise ValueError(f"constraint must be None or 'simplex', got {constraint!r}")
        self.history, self.reg, self.constraint, self.singular_tol = history, reg, constraint, singular_tol
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend)

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
        return ("params",) + tuple(sorted(order[id(p)] for w in work for p in w.params))

    @property
    def coefficients(self) -> Tensor:
        """The mixing coefficients of the last step (float64, age order, on the device)."""
        st = self.state.get("anderson", {})
        if "coefficients" not in st:
            raise RuntimeError("no step has been taken yet")
        return st["coefficients"]

    def _init_group(self) -> None:
        """Host setup (see the base class), and the Gram kept between steps made
        valid for this step's parameters. The Gram is over the parameters that
        have a gradient now, each at its own (aligned) ages; the kept matrix is
        only valid for the same set as the last step's: otherwise its older ages
        are recomputed from the rings, here, before any op of the step (under
        torch.compile this runs once, when the change makes Dynamo retrace)."""
        super()._init_group()
        work = self._plan
        if not work:
            return
        st = self._global(work[0].bucket.count.device)
        active = self._active_signature(work)
        k = self.history
        if (self._membership_changed or st.get("active") != active) and k > 1:
            # The rings hold ages 1..k-1: as of count - 1 they are ages 0..k-2.
            older = ring_gram([(w.bucket.g_hist, w.bucket.count - 1, self._active_columns(w)) for w in work],
                              k - 1, st["gram"].device)
            st["gram"].zero_()
            st["gram"][: k - 1, : k - 1] = older
        st["active"] = active

    @scheduler_ready
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One Anderson step: the read-only Gram pass, the on-device solve, the update
        pass (which stores the gradient and the old iterate)."""
        loss = self._closure_loss(closure)
        self._setup()
        work = self._prepare()
        if not work:
            return loss
        home = work[0].bucket.count.device
        st = self.state["anderson"]
        for w in work:
            b, group = w.bucket, w.group
            ops.gram_row(w.params, w.grads, w.offsets, b.g_hist, b.count, group["weight_decay"],
                         group["maximize"], b.gram, b.backend.name, b.cache)
        k = self.history
        row = reduce_gram([w.bucket.gram for w in work], home)
        gram = shift_in_row(st["gram"], row)
        valid = torch.arange(k, device=home) <= st["steps"]
        coefs, fell_back = anderson_coefficients(gram, valid, self.reg, self.constraint, self.singular_tol)
        st["gram"].copy_(gram)
        st["coefficients"].copy_(coefs)
        st["fallbacks"].add_(fell_back.to(torch.int64))
        st["steps"].add_(1)
        for w in work:
            b, group = w.bucket, w.group
            mine = coefs if coefs.device == b.device else coefs.to(b.device)  # a peer copy, no state write
            ops.combine(w.params, w.grads, w.offsets, b.x_hist, b.g_hist, mine, self._lr(w), b.count,
                        group["weight_decay"], group["maximize"], None, b.backend.name, b.cache)
        self._advance(work)
        return loss
