"""The k-step interpolation optimizer (Xie et al., 2018, Algorithm 1)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from ..gram import reduce_gram
from ..sharding import collective_device
from ._amp import AmpStep
from ._base import BucketedOptimizer
from ._buckets import Work


def _unit(k: int, device: torch.device) -> Tensor:
    """e_1 (float64): the coefficients of an SGD step."""
    e1 = torch.zeros(k, dtype=torch.float64, device=device)
    e1[0] = 1
    return e1


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    if isinstance(alphas, (str, bytes)):
        raise ValueError(f"alphas must be a sequence of numbers, got {alphas!r}")
    try:
        alphas = tuple(float(a) for a in alphas)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alphas must be a sequence of numbers, got {alphas!r}") from exc
    if not alphas:
        raise ValueError("alphas must hold at least one coefficient (k >= 1)")
    if any(not (0.0 <= a <= 1.0) or math.isnan(a) for a in alphas):
        raise ValueError(f"every alpha must lie in [0, 1], got {alphas}")
    if abs(sum(alphas) - 1.0) > 1e-6:
        raise ValueError(f"alphas must sum to 1, got {alphas} (sum {sum(alphas)!r})")
    return alphas


class Interpolatron(BucketedOptimizer):
    r"""k-step interpolation: a convex combination of the last k iterates, each
    moved along its own gradient.

    .. math::
        x^{(t)} = \sum_{i=1}^{k} a_i\, x^{(t-i)} \;-\; \eta_t \sum_{i=1}^{k} a_i\, g^{(t-i)},
        \qquad a_i \in [0, 1],\; \sum_i a_i = 1,

    where :math:`a_1` weights the most recent iterate, :math:`\eta_t` is the
    group's learning rate when :meth:`step` is called, and
    :math:`g^{(t-1)} = \nabla f(x^{(t-1)}) + \lambda x^{(t-1)}` (coupled weight
    decay, negated gradient for ``maximize``). At the first step every missing
    history slot holds :math:`x^{(0)}, g^{(0)}` (the first step is an SGD
    step). ``k = 1`` is SGD; ``k = 2`` keeps exactly Adam's memory (one past
    iterate, one past gradient per element).

    Args:
        params: parameters or param groups; ``alphas``, ``lr`` and
            ``weight_decay`` may differ per group.
        lr: learning rate (a float, or a 0-dim tensor on the parameters'
            device for CUDA-graph capture: update it in place). A float is
            kept as a 0-dim float64 tensor in the param group, which
            schedulers update in place (``torch.compile`` reads it as an
            input: no recompile when it changes).
        alphas: the mixing coefficients :math:`a_1..a_k` (paper defaults:
            ``(0.05, 0.95)``, ``(0.1, 0.9)``, 3-step ``(0.1, 0.3, 0.6)``).
        weight_decay: :math:`\lambda` (L2 term of the objective, coupled).
        maximize: ascend instead of descend.
        diagnostics: also produce the Gram row of the gradient window in the
            update pass (free on the fused backends): see :attr:`diagnostics`.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (``"cuda"`` is its old name).
        master_weights: keep a float32 master copy of every bfloat16/float16
            parameter (state key ``"master"``) and float32 rings; the step runs
            in float32 on the master and the 16-bit parameter is the master
            rounded to nearest. Updates below half a 16-bit ulp then accumulate
            instead of rounding away.
        stochastic_rounding: round every bfloat16/float16 value the step
            writes (the parameter and the stored gradient) stochastically and
            without bias, so that updates below half an ulp survive on average
            with 16-bit state and no master copy (exclusive with
            ``master_weights``). The random bits are a hash of ``sr_seed``, the
            step count and the element's position (:mod:`interpolatron.rounding`):
            the same on every backend, on every run, on every replica, and
            after a resume. Both are param-group settings, saved in the
            ``state_dict``.
        sr_seed: the seed of the stochastic rounding, an integer in ``[0, 2**32)``.
        process_group: for plain-tensor slices of one model, the group holding
            the other slices; only the diagnostics use it (found or checked
            as for :class:`~interpolatron.optim.Anderson` when ``None``, and
            only with ``diagnostics=True``). DTensor parameters need nothing.

    A step communicates nothing: the update is elementwise on each rank's
    shards. Only ``diagnostics=True`` on sharded parameters adds one
    all-reduce of ``k`` float64 values per step (the norms are the whole
    model's).
    """

    _algorithm = "Interpolatron"

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-2,
                 alphas: Sequence[float] = (0.05, 0.95), weight_decay: float = 0.0, *,
                 maximize: bool = False, diagnostics: bool = False, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False, sr_seed: int = 0,
                 process_group: Any = None):
        check_alphas(alphas)
        defaults = dict(lr=lr, alphas=tuple(alphas), weight_decay=weight_decay, maximize=maximize,
                        stochastic_rounding=stochastic_rounding, sr_seed=sr_seed)
        self._diagnostics_on = diagnostics
        self._diag: dict[str, Tensor] = {}
        super().__init__(params, defaults, backend, master_weights, process_group)

    def _reduces(self) -> bool:
        return self._diagnostics_on

    def _validate_group(self, group: dict, read_lr: bool = True) -> None:
        super()._validate_group(group, read_lr)
        group["alphas"] = check_alphas(group["alphas"])

    def _ring_slots(self, group: dict) -> tuple[int, int]:
        k = len(group["alphas"])
        return k - 1, k - 1

    def _coef_len(self, group: dict) -> int:
        return len(group["alphas"])

    def _init_group(self) -> None:
        super()._init_group()  # every check first: a refused step changes nothing
        for w in self._plan.work:
            b, group = w.bucket, w.group
            if group["alphas"] != b.coefs_seen:  # host setup: eager, also under torch.compile
                # Pinned + non_blocking: no synchronous pageable host-to-device copy.
                alphas = torch.tensor(group["alphas"], dtype=torch.float64)
                if b.coefs.is_cuda:
                    alphas = alphas.pin_memory()
                b.coefs.copy_(alphas, non_blocking=True)
                b.coefs_seen = group["alphas"]
            if b.first_coefs is None:
                b.first_coefs = _unit(b.coefs.numel(), b.device)

    def _step_buckets(self, work: list[Work], amp: AmpStep) -> None:
        """One fused combine per bucket with the group's fixed alphas (and, with
        diagnostics, the Gram row it produces on the way)."""
        for w in work:
            b, group = w.bucket, w.group
            # Reading alphas here makes a compiled step guard on them (a change
            # retraces, and _init_group refreshes b.coefs).
            coefs = (b.coefs if group["alphas"] == b.coefs_seen
                     else torch.tensor(group["alphas"], dtype=torch.float64, device=b.device))
            if torch.compiler.is_compiling() or not b.past_first:
                # The first step is SGD, x0 - lr * g0 rounded as k = 1 rounds it:
                # coefficients e_1 while the count is 0 (decided on the device, so
                # also when GradScaler skipped the first step), not the alphas
                # over k identical copies of x0 and g0, which round differently.
                coefs = torch.where(b.count == 0, b.first_coefs, coefs)
            self._combine(w, coefs, amp, b.gram if self._diagnostics_on else None)
        if self._diagnostics_on:
            reductions = self._reductions()
            if work or reductions:
                self._record_diagnostics(work, reductions)
        if not amp.may_skip and not torch.compiler.is_compiling():
            for w in work:  # the count is past 0 once this step is taken (known on the host: no read)
                w.bucket.past_first = True

    def _record_diagnostics(self, work, reductions: list[tuple]) -> None:
        # Groups with different k give rows of different lengths: only the
        # shared ages add up. Sharded, every rank must agree on k, so it comes
        # from the groups, not from this rank's work.
        if reductions:
            k = min(len(g["alphas"]) for g in self.param_groups)
            device = work[0].bucket.count.device if work else collective_device(reductions[0][0])
        else:
            k = min(w.bucket.gram.numel() for w in work)
            device = work[0].bucket.count.device
        row = reduce_gram([w.bucket.gram[:k] for w in work], device,
                          [w.bucket.reduction for w in work], reductions, k)
        sq = row[0]
        prev = self._diag.get("grad_norm_sq")
        diag = {"grad_norm_sq": sq, "grad_norm": sq.sqrt()}
        if k > 1 and prev is not None:
            diag["grad_cosine"] = row[1] / (sq * prev).sqrt()
        self._diag = diag

    @property
    def diagnostics(self) -> dict[str, Tensor]:
        """Device tensors from the last step (``diagnostics=True``): ``grad_norm``
        of the effective gradient over all parameters and ``grad_cosine``
        between the last two gradients (from the second step on)."""
        if not self._diagnostics_on:
            raise RuntimeError("construct the optimizer with diagnostics=True to collect them")
        return dict(self._diag)
