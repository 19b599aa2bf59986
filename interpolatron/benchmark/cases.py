"""The benchmark's cases: which optimizer, which implementation, how many
bytes a step moves (ALGORITHMS.md section 4), and each case made ready to step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .shapes import _Holder

RNA_WINDOW = 4
LR = 1e-3


@dataclass(frozen=True)
class Case:
    """One row's optimizer: ``family`` is ``"torch.optim"`` (``impl`` = foreach or
    fused) or ``"interpolatron"`` (``impl`` = backend name)."""

    optimizer: str
    impl: str
    family: str
    accesses: int  # element reads + writes per parameter element (ALGORITHMS.md section 4)

    @property
    def label(self) -> str:
        return f"{self.optimizer} [{self.impl}]"


# The torch.optim baselines: (name, class, kwargs, element accesses). Adam
# reads p, g, m, v and writes p, m, v; momentum reads p, g, buf, writes p, buf.
TORCH_OPTIMIZERS: dict[str, tuple[type, dict, int]] = {
    "sgd": (torch.optim.SGD, {}, 3),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}, 5),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, 5),
    "adam": (torch.optim.Adam, {}, 7),
}
OUR_OPTIMIZERS = ("interpolatron-2", "interpolatron-3", "anderson-2", "anderson-3",
         f"rna-record-w{RNA_WINDOW}", f"rna-extrapolate-w{RNA_WINDOW}",
         "interpolatron-2-master", "anderson-2-master", "interpolatron-2-sr", "anderson-2-sr",
         "anderson-2-onepass", "anderson-3-onepass", "interpolatron-2-diag")
OPTIMIZER_NAMES = tuple(TORCH_OPTIMIZERS) + OUR_OPTIMIZERS


def bytes_per_element(optimizer: str, elem: int) -> int:
    """Bytes one step moves per parameter element of ``elem`` bytes. A
    ``-master`` case (``master_weights=True``) on 16-bit parameters runs the
    fused master step (issue 17 item 1): the combine reads the float32 master
    in place of the parameter and writes the new master besides the rounded
    parameter, so of its accesses the gradient reads and the parameter write
    are ``elem`` bytes (2 for Interpolatron; 3 for exact Anderson, whose Gram
    pass reads the gradient too), every other access 4 bytes, plus the
    master's write: for k = 2 Interpolatron reads master 4 + gradient 2 +
    x ring 4 + g ring 4 and writes master 4 + parameter 2 + two ring slots 8,
    28 bytes (the p.data swap it replaces moved 40: the float32 step's 28 plus
    the gradient's upcast, 2 + 4, and the rounded write-back, 4 + 2); Anderson
    k = 2 34 (the swap: 48). On 32/64-bit parameters it is the plain step. An
    ``-sr`` case (``stochastic_rounding=True``) moves the plain step's bytes:
    the rounding is arithmetic on values already in registers. ``-onepass``
    (``Anderson(one_pass=True)``) moves Interpolatron's bytes, its Gram row
    computed in the update pass; ``-diag`` (``Interpolatron(diagnostics=True)``)
    the same dots on Interpolatron's step: it isolates their cost."""
    acc = accesses(optimizer)
    if optimizer.endswith("-master") and elem < 4:
        narrow = 3 if optimizer.startswith("anderson") else 2  # gradient reads + the parameter write
        return (acc - narrow) * 4 + narrow * elem + 4
    return acc * elem


def _mode(optimizer: str) -> tuple[str, str]:
    """``("anderson-2", "master")`` for ``"anderson-2-master"``; the mode of a plain
    name is ``""``."""
    for mode in ("master", "sr", "onepass", "diag"):
        if optimizer.endswith("-" + mode):
            return optimizer.removesuffix("-" + mode), mode
    return optimizer, ""


def accesses(optimizer: str) -> int:
    """Element reads + writes per parameter element of one step of ``optimizer``."""
    optimizer, mode = _mode(optimizer)
    if optimizer in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[optimizer][2]
    kind, _, k = optimizer.rpartition("-")
    if kind == "interpolatron":
        return 2 * int(k) + 3
    if kind == "anderson":
        return (2 if mode == "onepass" else 3) * int(k) + 3
    if kind == "rna-record":
        return int(k.lstrip("w")) + 2
    if kind == "rna-extrapolate":
        return int(k.lstrip("w")) + 1
    raise ValueError(f"unknown optimizer {optimizer!r}")


def _torch_impl_reason(name: str, impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if torch.optim's ``impl`` runs here, found by trying it on one tensor."""
    cls, kwargs, _ = TORCH_OPTIMIZERS[name]
    p = nn.Parameter(torch.zeros(4, device=device, dtype=dtype))
    p.grad = torch.ones_like(p)
    try:
        cls([p], lr=LR, **{impl: True}, **kwargs).step()
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"torch.optim {impl}: {str(exc).splitlines()[0]}"
    return None


def enumerate_cases(device: torch.device | str, dtype: torch.dtype,
                    optimizers: Sequence[str] | None = None,
                    backends: Sequence[str] | None = None) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases that run on (device, dtype), and the skipped ones with the reason.

    Our optimizers run on every backend :func:`interpolatron.availability`
    reports available, except Triton on the CPU: there it only runs through
    the Triton interpreter, a correctness tool orders of magnitude slower
    than any real path, so timing it would mean nothing."""
    from ..backends import availability

    device = torch.device(device)
    wanted = set(optimizers) if optimizers else set(OPTIMIZER_NAMES)
    unknown = wanted - set(OPTIMIZER_NAMES)
    if unknown:
        raise ValueError(f"unknown optimizers {sorted(unknown)}; choose from {OPTIMIZER_NAMES}")
    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    for name in TORCH_OPTIMIZERS:
        if name not in wanted:
            continue
        for impl in ("foreach", "fused"):
            if backends and impl not in backends and "torch.optim" not in backends:
                continue
            why = _torch_impl_reason(name, impl, device, dtype)
            if why is None:
                cases.append(Case(name, impl, "torch.optim", accesses(name)))
            else:
                skipped.append({"case": f"{name} [{impl}]", "reason": why})
    avail = availability(device, dtype)
    for backend, why in avail.items():
        if backends and backend not in backends:
            continue
        if why is None and backend == "triton" and device.type == "cpu":
            why = "Triton runs on the CPU only in its interpreter (a correctness tool): not timed"
        for name in OUR_OPTIMIZERS:
            if name not in wanted:
                continue
            if why is None:
                cases.append(Case(name, backend, "interpolatron", accesses(name)))
            else:
                skipped.append({"case": f"{name} [{backend}]", "reason": why})
    return cases, skipped


@dataclass
class Prepared:
    """A case made ready to step: ``step()`` is what gets timed."""

    step: Callable[[], Any]
    keep: list[Any] = field(default_factory=list)  # objects that must outlive the timing
    change: Callable[[], Any] | None = None  # a step where one parameter has no gradient


def prepare_case(case: Case, params: list[nn.Parameter], compiled: bool = False) -> Prepared:
    """Build the optimizer for ``case`` on ``params`` and take the warm-up steps
    that fill its history (after them every step does the steady-state work)."""
    from .. import RNA, Anderson, Interpolatron

    if case.family == "torch.optim":
        cls, kwargs, _ = TORCH_OPTIMIZERS[case.optimizer]
        opt = cls(params, lr=LR, **{case.impl: True}, **kwargs)
        opt.step()  # creates the state buffers
        return Prepared(opt.step, [opt])
    base, mode = _mode(case.optimizer)
    sixteen = dict(master_weights=mode == "master", stochastic_rounding=mode == "sr")
    kind, _, k = base.rpartition("-")
    if kind == "interpolatron":
        alphas = {2: (0.05, 0.95), 3: (0.1, 0.3, 0.6)}[int(k)]
        opt = Interpolatron(params, lr=LR, alphas=alphas, backend=case.impl, diagnostics=mode == "diag",
                            **sixteen)
    elif kind == "anderson":
        # Fixed gradients make the Gram matrix singular, so every step takes
        # the SGD fallback; the passes over memory are the same as for a
        # regular step (the solve is k x k and runs on the device either way).
        opt = Anderson(params, lr=LR, history=int(k), backend=case.impl, one_pass=mode == "onepass",
                       **sixteen)
    else:
        holder = _Holder(params)
        window = int(k.lstrip("w"))
        rna = RNA(holder, window=window, backend=case.impl)
        for _ in range(window + 1):  # a full window: every record computes the whole Gram row
            rna.record()
        if kind == "rna-record":
            return Prepared(rna.record, [rna, holder])
        # Written into the tracked tensors themselves (as online mode and
        # swapped() do): the same bytes as a shadow model, no second copy.
        return Prepared(lambda: rna.extrapolate(into=holder), [rna, holder])
    for _ in range(int(k)):  # the warm start fills the rings; k steps cycle them once
        opt.step()

    def change():
        # The set of parameters with gradients changes (Anderson rebuilds its
        # Gram from the rings; a skipped parameter's ring moves one slot on).
        # Eager: a compiled step refuses a step without a gradient for a member.
        last, grad = params[-1], params[-1].grad
        last.grad = None
        try:
            opt.step()
        finally:
            last.grad = grad

    step = opt.step
    if compiled:
        step = torch.compile(opt.step, fullgraph=True)
        step()  # compiles (untimed)
    return Prepared(step, [opt], change if len(params) > 1 else None)
