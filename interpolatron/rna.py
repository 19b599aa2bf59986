"""Regularized Nonlinear Acceleration (Scieur, d'Aspremont, Bach, 2016-2018)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from . import ops
from .backends import resolve
from .gram import reduce_gram, shift_in_row
from .ring import dim_order, padded_offsets, unflat
from .sharding import local, reduction_key
from .solvers import rna_coefficients


class _Bucket:
    """Tracked tensors of one (device, dtype) and their snapshot window."""

    def __init__(self, backend, names: list[str], slots: int, device, dtype, reduction: tuple = ()):
        self.backend = backend
        self.reduction = reduction
        self.names = names
        self.window = None  # allocated at the first record, when sizes are known
        self.slots = slots
        self.device, self.dtype = device, dtype
        self.offsets: list[int] = []
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.cache = ops.new_cache(self)  # the backend's private cache, by handle

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache = ops.new_cache(self)  # a copy starts with empty caches

    def allocate(self, tensors: list[Tensor]) -> None:
        # Each tensor's columns start on a 128-byte boundary (aligned vector accesses).
        self.offsets, width = padded_offsets([t.numel() for t in tensors], self.dtype.itemsize)
        self.window = torch.zeros(self.slots, width, dtype=self.dtype, device=self.device)


class RNA:
    r"""Regularized Nonlinear Acceleration of any optimizer's iterates.

    Keeps a window of snapshots :math:`y_0..y_k` (``record()``, e.g. once per
    epoch) and extrapolates

    .. math::
        R = [y_1 - y_0, \dots, y_k - y_{k-1}],\quad
        \tilde R = \frac{R^\top R}{\|R^\top R\|_2},\quad
        z = (\tilde R + \lambda I)^{-1}\mathbf 1,\quad
        c = \frac{z}{\mathbf 1^\top z},\quad
        y_{\text{extr}} = \sum_{i=1}^{k} c_i\, y_i .

    The Gram matrix of snapshot differences is updated by one row per record
    (the differences are taken elementwise, never through a Gram of raw
    snapshots). Offline (the default), training is never changed: the
    extrapolation is returned, written into a shadow module, or swapped into
    the model with :meth:`swapped` for evaluation. ``mode="online"`` writes it
    into the model at every record. ``residual="gradients"`` uses the average
    gradient between records as the residual (the paper's CNN variant; needs
    the wrapped ``optimizer``, whose ``step`` it follows). That gradient is the
    gradient of what the base optimizer minimises: with coupled weight decay
    (torch's SGD and Adam ``weight_decay``, Interpolatron's and Anderson's) it
    is ``p.grad + weight_decay * p`` (negated first for ``maximize``),
    recorded before the base step, so the residuals vanish at the regularised
    optimum. Decoupled decay (``torch.optim.AdamW``, ``Adam(...,
    decoupled_weight_decay=True)``) is not a gradient of the objective and is
    left out: the residual is ``p.grad``, which does not vanish at AdamW's
    fixed point; prefer iterate residuals there.

    Batch-norm statistics: floating buffers are extrapolated with the same
    weights, but the weights can be negative, and a variance extrapolated
    past its snapshots can go negative (NaN losses). Every buffer in
    ``positive_buffers`` (default: the ``running_var`` of every batch and
    instance norm module) is therefore clamped elementwise to the
    range ``[min, max]`` its snapshots combined by the extrapolation span.
    The recommended path for batch norm is to recompute the statistics of the
    extrapolated weights from data: ``extrapolate(into=shadow,
    bn_loader=loader)`` or ``swapped(bn_loader=loader)``.

    Adaptive :math:`\lambda` (``objective`` given; the reference code's
    ``adaptive_rna``): every :math:`\lambda` of the grid is tried and the best
    extrapolation :math:`x_e` kept; then a line search along
    :math:`x_0 + t (x_e - x_0)` from the OLDEST snapshot :math:`x_0`
    doubles :math:`t = 1, 2, 4, \dots` while the objective decreases and
    keeps the best point; if no point tried beats the newest snapshot, the
    result is the newest snapshot. :attr:`reg_used`, :attr:`step_used`
    (:math:`t`, 0 after the fall-back) and :attr:`fell_back` say what
    happened, and :attr:`coefficients` then weighs every snapshot of the
    window, the oldest included.

    Args:
        model: an ``nn.Module`` (parameters and floating buffers are
            extrapolated, integer buffers copied from the newest snapshot) or
            an iterable of tensors.
        window: k, the number of residuals (k + 1 snapshots for iterates).
        reg: :math:`\lambda`, relative to :math:`\|R^\top R\|_2`.
        residual: ``"iterates"`` or ``"gradients"``.
        mode: ``"offline"`` or ``"online"``.
        optimizer: the base optimizer (needed for gradient residuals; online
            mode resets its state after each extrapolation when
            ``reset_optimizer``).
        objective: a callable on the model returning a loss; if given,
            :math:`\lambda` is chosen from :math:`\{0\} \cup
            \text{logspace}(-15, 1, k)` (and ``reg`` itself) by evaluating the
            extrapolations, followed by the line search above (offline
            extrapolations only; online records use ``reg``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (``"cuda"`` is its old name).
        positive_buffers: names of floating buffers clamped to their
            snapshots' range; ``None``: every norm layer's ``running_var``.
        process_group: for plain-tensor parameter shards (FSDP1 flat
            parameters), the group holding the other shards; buffers count as
            whole on every rank. DTensor parameters (FSDP2) need nothing.

    Sharded models: snapshots and extrapolations are elementwise on each
    rank's shards; the residuals' Gram row is summed over the ranks that
    shard the parameters (one all-reduce per record), so every rank solves
    for the same coefficients, the single-process ones to float64 rounding.
    """

    #: Line-search doublings at most (t <= 2**MAX_DOUBLINGS): an objective
    #: unbounded below would otherwise never stop the search.
    MAX_DOUBLINGS = 30

    def __init__(self, model: nn.Module | Iterable[Tensor], window: int = 10, reg: float = 1e-8,
                 residual: str = "iterates", mode: str = "offline", optimizer=None,
                 objective: Callable[..., float] | None = None, backend: str = "auto",
                 reset_optimizer: bool = False, positive_buffers: Iterable[str] | None = None,
                 process_group: Any = None):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        if residual not in ("iterates", "gradients"):
            raise ValueError(f"residual must be 'iterates' or 'gradients', got {residual!r}")
        if mode not in ("offline", "online"):
            raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
        if residual == "gradients" and optimizer is None:
            raise ValueError("residual='gradients' needs the optimizer whose steps it averages")
        self.model = model if isinstance(model, nn.Module) else None
        self.window, self.reg, self.residual, self.mode = window, reg, residual, mode
        self.optimizer, self.objective, self.reset_optimizer = optimizer, objective, reset_optimizer
        self.backend = backend
        self.process_group = process_group
        self._named = self._collect(model)
        floats = {n: t for n, t in self._named.items() if t.is_floating_point()}
        for name, t in self._named.items():
            if t.is_complex():
                raise TypeError(f"RNA does not support complex tensors ({name})")
        self._ints = [n for n in self._named if n not in floats]
        self._params = ([n for n, _ in model.named_parameters()] if self.model is not None
                        else list(floats))
        slots = window + 1 if residual == "iterates" else window
        self._snap = self._make_buckets(floats, slots)
        self._grad_buckets = (self._make_buckets({n: floats[n] for n in self._params}, window)
                              if residual == "gradients" else [])
        # The process groups the residuals' Gram row is summed over, in an
        # order every rank shares (the tensors' order).
        self._reductions = [key for key in dict.fromkeys(b.reduction for b in self._snap + self._grad_buckets)
                            if key]
        self._gram = torch.zeros(window, window, dtype=torch.float64, device=self._home())
        self._records = 0
        self._latest_ints: dict[str, Tensor] = {}
        self._coefficients: Tensor | None = None
        self.reg_used: float | None = None
        self.step_used: float | None = None
        self.fell_back = False
        self._clamped = self._positive_buffers(model, positive_buffers, floats)
        if residual == "gradients":
            self._acc = {n: torch.zeros_like(floats[n]) for n in self._params}
            self._names_by_id = {id(self._named[n]): n for n in self._params}
            self._steps_since = 0
            self._hook = optimizer.register_step_pre_hook(self._accumulate)

    # -- setup -----------------------------------------------------------
    @staticmethod
    def _collect(model) -> dict[str, Tensor]:
        if isinstance(model, nn.Module):
            named = dict(model.named_parameters())
            named.update(dict(model.named_buffers()))
        else:
            named = {str(i): t for i, t in enumerate(model)}
        if not named:
            raise ValueError("RNA needs at least one tensor to track")
        return named

    @staticmethod
    def _positive_buffers(model, names: Iterable[str] | None, floats: dict[str, Tensor]) -> set[str]:
        """The buffers clamped to their snapshots' range (see the class docstring)."""
        if names is not None:
            chosen = set(names)
            unknown = sorted(chosen - set(floats))
            if unknown:
                raise ValueError(f"positive_buffers names no floating tensor RNA tracks: {unknown[:5]}")
            return chosen
        if not isinstance(model, nn.Module):
            return set()
        norms = (nn.modules.batchnorm._NormBase,)
        return {f"{prefix}.running_var" if prefix else "running_var"
                for prefix, mod in model.named_modules()
                if isinstance(mod, norms) and isinstance(getattr(mod, "running_var", None), Tensor)
                and (f"{prefix}.running_var" if prefix else "running_var") in floats}

    def _make_buckets(self, tensors: dict[str, Tensor], slots: int) -> list[_Bucket]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, t in tensors.items():
            group = self.process_group if name in self._params else None
            groups[(t.device, t.dtype, reduction_key(t, group))].append(name)
        return [_Bucket(resolve(self.backend, dev, dt), names, slots, dev, dt, key)
                for (dev, dt, key), names in groups.items()]

    def _home(self) -> torch.device:
        return (self._snap[0].device if self._snap else torch.device("cpu"))

    def _tensors(self, bucket: _Bucket) -> list[Tensor]:
        return [local(self._named[n].detach()) for n in bucket.names]

    # -- gradients between records ---------------------------------------
    def _accumulate(self, optimizer, args, kwargs) -> None:
        """Adds the gradient of the base optimizer's objective (coupled weight
        decay included, see the class docstring) before its step."""
        check = getattr(optimizer, "validate_step", None)
        if check is not None:
            check()  # a step our optimizer will refuse must not reach the averages either
        names = self._names_by_id
        decoupled_cls = isinstance(optimizer, torch.optim.AdamW)
        for group in optimizer.param_groups:
            pairs = [(self._acc[names[id(p)]], p) for p in group["params"]
                     if id(p) in names and p.grad is not None]
            if not pairs:
                continue
            accs, params = [a for a, _ in pairs], [p for _, p in pairs]
            grads = [p.grad for p in params]
            if group.get("maximize", False):
                torch._foreach_sub_(accs, grads)
            else:
                torch._foreach_add_(accs, grads)
            wd = group.get("weight_decay", 0.0)
            decoupled = decoupled_cls or group.get("decoupled_weight_decay", False)
            if not decoupled and (isinstance(wd, Tensor) or wd != 0):
                torch._foreach_add_(accs, [p.detach() for p in params], alpha=float(wd))
        self._steps_since += 1

    # -- copies (copy.deepcopy, pickle) ----------------------------------
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hook"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._hook = None
        if self.residual == "gradients":  # ids of the copy's tensors, not the original's
            self._names_by_id = {id(self._named[n]): n for n in self._params}
        if self.residual == "gradients" and self.optimizer is not None:
            # The optimizer's step hooks do not survive a copy: follow the copy's optimizer.
            self._hook = self.optimizer.register_step_pre_hook(self._accumulate)

    def close(self) -> None:
        """Stop following the optimizer (gradient residuals)."""
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None

    # -- recording ---------------------------------------------------------
    @torch.no_grad()
    def record(self) -> None:
        """Take a snapshot of the tracked tensors (and, online, extrapolate into them)."""
        row_parts = []
        if self.residual == "iterates":
            for b in self._snap:
                tensors = self._tensors(b)
                if b.window is None:
                    b.allocate(tensors)
                out = torch.empty(self.window, dtype=torch.float64, device=b.device)
                ops.rna_record(tensors, b.offsets, b.window, b.count, out, b.backend.name, b.cache)
                row_parts.append(out)
        else:
            if self._steps_since == 0:
                raise RuntimeError("residual='gradients': no optimizer step since the last record, "
                                   "so there is no average gradient to record")
            for b in self._snap:
                tensors = self._tensors(b)
                if b.window is None:
                    b.allocate(tensors)
                ops.rna_record(tensors, b.offsets, b.window, b.count, None, b.backend.name, b.cache)
            scale = 1.0 / self._steps_since
            for b in self._grad_buckets:
                means = [local(self._acc[n].mul_(scale)) for n in b.names]
                if b.window is None:
                    b.allocate(means)
                out = torch.empty(self.window, dtype=torch.float64, device=b.device)
                ops.gram_row_store(means, means, b.offsets, b.window, b.count, 0.0, False, out,
                                   b.backend.name, b.cache)
                row_parts.append(out)
            for a in self._acc.values():
                a.zero_()
            self._steps_since = 0
        if row_parts:
            buckets = self._snap if self.residual == "iterates" else self._grad_buckets
            self._gram = shift_in_row(self._gram, reduce_gram(row_parts, self._home(),
                                                              [b.reduction for b in buckets],
                                                              self._reductions, self.window))
        for b in self._snap + self._grad_buckets:
            b.count.add_(1)
        self._records += 1
        self._latest_ints = {n: self._named[n].detach().clone() for n in self._ints}
        self._coefficients = None
        if self.mode == "online" and self.residuals >= 1:
            self._write(self._named_outputs(self._named), self.coefficients_for(self.reg))
            if self.reset_optimizer and self.optimizer is not None:
                self.optimizer.state.clear()

    @property
    def residuals(self) -> int:
        """How many residuals the window holds now."""
        extra = 1 if self.residual == "iterates" else 0
        return max(0, min(self._records - extra, self.window))

    # -- extrapolation -----------------------------------------------------
    def coefficients_for(self, reg: float) -> Tensor:
        m = self.residuals
        if m < 1:
            need = 2 if self.residual == "iterates" else 1
            raise RuntimeError(f"RNA needs at least {need} records to extrapolate, has {self._records}")
        gram = self._gram[:m, :m]
        # One host read per extrapolation (the solve below syncs anyway): name a
        # non-finite snapshot instead of failing inside torch's SVD.
        if not bool(torch.isfinite(gram).all()):
            raise FloatingPointError(self._non_finite_message(m))
        return rna_coefficients(gram, reg)

    def _non_finite_message(self, m: int) -> str:
        """Which recorded snapshot (or average gradient) holds non-finite values."""
        iterates = self.residual == "iterates"
        buckets = self._snap if iterates else self._grad_buckets
        what = "snapshot" if iterates else "average gradient"
        for age in range(m + 1 if iterates else m):
            for b in buckets:
                if b.window is None:
                    continue
                row = b.window[(int(b.count) - 1 - age) % b.slots]
                for name, off in zip(b.names, b.offsets):
                    n = self._named[name].numel()
                    if not bool(torch.isfinite(row[off:off + n]).all()):
                        newest = "the newest" if age == 0 else f"{age} record(s) before the newest"
                        return (f"RNA cannot extrapolate: the {what} of age {age} ({newest}, record "
                                f"#{self._records - age} of {self._records}) holds non-finite values in "
                                f"{name!r}; the window drops it after {b.slots - age} more record(s)")
        return ("RNA cannot extrapolate: the Gram matrix of the residuals is non-finite (the residuals "
                "overflowed) although every recorded value in the window is finite")

    @property
    def coefficients(self) -> Tensor:
        """The extrapolation weights of the last extrapolation (age order: the
        newest snapshot first; float64, on the device). After an adaptive
        extrapolation they weigh every snapshot of the window (the line search
        moves along the oldest one); before any extrapolation since the last
        record, the fixed-``reg`` weights of the newest ``residuals`` snapshots."""
        if self._coefficients is None:
            self._coefficients = self.coefficients_for(self.reg if self.reg_used is None else self.reg_used)
        return self._coefficients

    def _named_outputs(self, target: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: target[n] for n in self._named}

    @torch.no_grad()
    def _write(self, outs: dict[str, Tensor], coefs: Tensor) -> None:
        for b in self._snap:
            targets = [local(outs[n].detach()) for n in b.names]
            for n, t in zip(b.names, targets):
                src = local(self._named[n])
                if t.shape != src.shape or t.dtype != src.dtype or t.device != src.device:
                    raise ValueError(f"cannot write the extrapolation of {n} ({tuple(src.shape)}, "
                                     f"{src.dtype}, {src.device}) into a tensor of shape "
                                     f"{tuple(t.shape)}, {t.dtype}, {t.device}")
            # The window holds each tensor in its storage order: a target laid
            # out otherwise is written through a stage laid out like the source.
            staged = [(i, t) for i, (n, t) in enumerate(zip(b.names, targets))
                      if t.numel() and t.stride() != self._named[n].stride()]
            for i, _ in staged:
                targets[i] = torch.empty_like(self._named[b.names[i]])
            ops.rna_extrapolate(b.window, b.offsets, b.count, coefs.to(b.device), targets, b.backend.name,
                                b.cache)
            self._clamp(b, targets, coefs.numel())
            for i, t in staged:
                t.copy_(targets[i])
        for n in self._ints:
            outs[n].copy_(self._latest_ints[n])

    def _clamp(self, b: _Bucket, targets: list[Tensor], ages: int) -> None:
        """Clamps the positive buffers of bucket ``b`` elementwise to the range
        of the ``ages`` newest snapshots (those the weights combine); on the
        device, no host sync."""
        for name, t, off in zip(b.names, targets, b.offsets):
            if name not in self._clamped:
                continue
            slots = torch.remainder(b.count - 1 - torch.arange(ages, device=b.device), b.slots)
            snaps = b.window.index_select(0, slots)[:, off:off + t.numel()]
            order = dim_order(t)  # t is laid out like its source: the window's order
            lo = unflat(snaps.amin(0), t, order).to(t.dtype)
            hi = unflat(snaps.amax(0), t, order).to(t.dtype)
            torch.maximum(t, lo, out=t)
            torch.minimum(t, hi, out=t)

    def _oldest_age(self) -> int:
        """Age of the oldest snapshot the window holds now."""
        return self.residuals if self.residual == "iterates" else self.residuals - 1

    @torch.no_grad()
    def _choose(self) -> Tensor:
        """The weights of the extrapolation (age order). Without an objective:
        the fixed-``reg`` solve. With one: adaptive lambda, the line search from
        the oldest snapshot and the fall-back to the newest (class docstring)."""
        self.step_used, self.fell_back = None, False
        if self.objective is None:
            self.reg_used = self.reg
            return self.coefficients_for(self.reg)
        if self.model is None:
            raise RuntimeError("an objective needs RNA to wrap an nn.Module")
        self.coefficients_for(self.reg)  # the clear error when there are too few records
        ages = self._oldest_age() + 1
        home = self._gram.device

        def padded(c: Tensor) -> Tensor:
            return torch.cat([c, c.new_zeros(ages - c.numel())])

        oldest = torch.zeros(ages, dtype=torch.float64, device=home)
        oldest[-1] = 1.0
        newest = torch.zeros(ages, dtype=torch.float64, device=home)
        newest[0] = 1.0
        # The paper's grid, plus the configured reg so the choice is never
        # worse than not searching.
        grid = [0.0] + torch.logspace(-15, 1, self.window, dtype=torch.float64).tolist()
        grid += [] if self.reg in grid else [self.reg]
        with self._evaluator() as value_of:
            best_lam, best_value, best_c = self.reg, float("inf"), None
            for lam in grid:
                c = padded(self.coefficients_for(lam))
                value = value_of(c)
                if value < best_value:
                    best_lam, best_value, best_c = lam, value, c
            self.reg_used = best_lam
            chosen, chosen_value, t = best_c, best_value, 1.0
            if best_c is not None:
                direction = best_c - oldest  # x_e - x_0, as weights over snapshots
                for _ in range(self.MAX_DOUBLINGS):
                    c = oldest + (2 * t) * direction
                    value = value_of(c)
                    if not value < chosen_value:
                        break
                    chosen, chosen_value, t = c, value, 2 * t
            if not chosen_value < value_of(newest):
                self.fell_back, self.step_used = True, 0.0
                return newest
        self.step_used = t
        return chosen

    @contextlib.contextmanager
    def _evaluator(self) -> Iterator[Callable[[Tensor], float]]:
        """``value_of(weights)``: the objective at that combination of snapshots,
        written into the model; the model is restored exactly on exit."""
        originals = {n: t.detach().clone() for n, t in self._named.items()}
        targets = self._named_outputs(self._named)

        def value_of(coefs: Tensor) -> float:
            self._write(targets, coefs)
            return float(self.objective(self.model))

        try:
            yield value_of
        finally:
            with torch.no_grad():
                for n, t in self._named.items():
                    t.copy_(originals[n])

    @torch.no_grad()
    def extrapolate(self, into: nn.Module | None = None, bn_loader: Iterable | None = None):
        """Compute the coefficients and the extrapolated point.

        Returns a ``{name: tensor}`` dict (for a module; a list for tensors),
        or writes into the shadow module ``into`` (same names and shapes) and
        returns it. ``bn_loader``: recompute batch-norm statistics of the
        result from this data instead of extrapolating them (recommended for
        batch norm: extrapolated statistics are only clamped, see the class
        docstring).
        """
        self._coefficients = self._choose()
        if into is None:
            outs = {n: torch.empty_like(t) for n, t in self._named.items()}
            self._write(outs, self._coefficients)
            return outs if self.model is not None else list(outs.values())
        if not isinstance(into, nn.Module) or self.model is None:
            raise TypeError("into must be an nn.Module shaped like the tracked model")
        target = dict(into.named_parameters())
        target.update(dict(into.named_buffers()))
        missing = [n for n in self._named if n not in target]
        if missing:
            raise ValueError(f"the shadow module lacks {missing[:5]}")
        self._write(self._named_outputs(target), self._coefficients)
        if bn_loader is not None:
            torch.optim.swa_utils.update_bn(bn_loader, into)
        return into

    @contextlib.contextmanager
    def _swapped_with(self, coefs: Tensor) -> Iterator[None]:
        originals = {n: t.detach().clone() for n, t in self._named.items()}
        try:
            self._write(self._named_outputs(self._named), coefs)
            yield
        finally:
            with torch.no_grad():
                for n, t in self._named.items():
                    t.copy_(originals[n])

    @contextlib.contextmanager
    def swapped(self, bn_loader: Iterable | None = None) -> Iterator[None]:
        """Temporarily put the extrapolation into the model (restored exactly on
        exit, also after an exception). ``bn_loader``: recompute the batch-norm
        statistics of the extrapolation from this data (recommended)."""
        self._coefficients = self._choose()
        with self._swapped_with(self._coefficients):
            if bn_loader is not None:
                if self.model is None:
                    raise TypeError("bn_loader needs RNA to wrap an nn.Module")
                torch.optim.swa_utils.update_bn(bn_loader, self.model)
            yield
