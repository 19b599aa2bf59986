"""Step-time benchmark: one optimizer step on parameter sets shaped like real models.

Every row times one ``step()`` (or one RNA record / extrapolation) on fixed
gradients, and sets it against the bytes the step must move
(ALGORITHMS.md section 4) and the device's copy bandwidth measured in the same
run: ``fraction = (bytes / median time) / copy bandwidth``. A fraction of 1.0
means the step runs at the speed of a plain ``dst.copy_(src)`` of its bytes.

Use it from Python (:func:`run_benchmark`, the writers) or as
``interpolatron bench`` (:func:`main`)::

    interpolatron bench --device cpu --dtype fp32 bf16 --sets resnet50 gpt2:0.25 --out bench/results

Parameter sets (``--sets NAME[:SCALE]``, and ``--scale F`` multiplies every
set's scale): the scale multiplies the leading dimension of every tensor, so
the tensor count stays that of the real model and the element count scales by
about ``F``.

Timing: on CUDA ``triton.testing.do_bench`` (which flushes the L2 cache before
every run) when triton is importable, else CUDA events; on the CPU
``time.perf_counter`` around each call after a warm-up. The median is
reported, the minimum kept.

Peak extra memory of a step (the worst of a steady step, the first steps'
transients beyond the state they leave, and a step where one parameter has no
gradient): on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation
before the step; on the CPU the allocation events of the
PyTorch profiler (``profile_memory=True``) summed in order over one step (it
sees every tensor PyTorch allocates, not memory a C++ extension takes from
``malloc`` directly). The same methods give the persistent state bytes (net
allocation of building the optimizer and its warm-up steps).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------
# Parameter sets
# ---------------------------------------------------------------------------


def resnet50_shapes() -> list[Shape]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 elements),
    in ``named_parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1.weight, bn1.bias
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * width  # Bottleneck expansion
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:  # downsample: 1x1 conv + batch norm
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[Shape]:
    """The 148 parameter tensors of GPT-2 small (124,439,808 elements; the LM head
    is tied to the token embedding), HuggingFace's Conv1D layout."""
    shapes: list[Shape] = [(vocab, width), (context, width)]  # wte, wpe
    for _ in range(layers):
        shapes += [(width,), (width,),                        # ln_1
                   (width, 3 * width), (3 * width,),          # attn.c_attn
                   (width, width), (width,),                  # attn.c_proj
                   (width,), (width,),                        # ln_2
                   (width, 4 * width), (4 * width,),          # mlp.c_fc
                   (4 * width, width), (width,)]              # mlp.c_proj
    shapes += [(width,), (width,)]  # ln_f
    return shapes


def many_small_shapes(blocks: int = 96, width: int = 32) -> list[Shape]:
    """A deep, narrow transformer: ``12 * blocks`` small tensors (1,152 and about
    1.2M elements by default) -- the regime where per-tensor launch and Python
    overhead, not bandwidth, decides the step time."""
    shapes: list[Shape] = []
    for _ in range(blocks):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes


def ten_thousand_small_shapes(count: int = 10_000) -> list[Shape]:
    """10,000 small tensors (biases, norms, small projections; about 2.2M
    elements): a launch-bound step, the case CUDA graphs are for."""
    sizes = [(64,), (128,), (32, 8), (256,), (16, 16), (96,), (48, 4), (512,)]
    return [sizes[i % len(sizes)] for i in range(count)]


_SET_BUILDERS: dict[str, tuple[Callable[[], list[Shape]], str]] = {
    "resnet50": (resnet50_shapes, "ResNet-50 (torchvision), 161 tensors"),
    "gpt2": (gpt2_shapes, "GPT-2 124M (tied head), 148 tensors"),
    "many-small": (many_small_shapes, "96-block width-32 transformer, 1,152 small tensors"),
    "10k-small": (ten_thousand_small_shapes, "10,000 small tensors"),
}
SET_NAMES = tuple(_SET_BUILDERS)


@dataclass(frozen=True)
class ParamSet:
    """A list of tensor shapes standing for a model's parameters."""

    name: str
    scale: float
    shapes: tuple[Shape, ...]
    description: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def label(self) -> str:
        return self.name if self.scale == 1.0 else f"{self.name}x{self.scale:g}"


def scale_shapes(shapes: Sequence[Shape], scale: float) -> list[Shape]:
    """Multiply every tensor's leading dimension by ``scale`` (at least 1):
    the tensor count stays, the element count scales by about ``scale``."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in shapes]


def param_set(name: str, scale: float = 1.0) -> ParamSet:
    """A named parameter set (``resnet50``, ``gpt2``, ``many-small``) at ``scale``."""
    if name not in _SET_BUILDERS:
        raise ValueError(f"unknown parameter set {name!r}; choose from {SET_NAMES}")
    build, description = _SET_BUILDERS[name]
    return ParamSet(name, float(scale), tuple(scale_shapes(build(), scale)), description)


def parse_set(token: str, scale: float = 1.0) -> ParamSet:
    """``"gpt2"`` or ``"gpt2:0.25"``; ``scale`` multiplies the token's own scale."""
    name, _, own = token.partition(":")
    return param_set(name, (float(own) if own else 1.0) * scale)


class _Holder(nn.Module):
    """The parameters as a module, so RNA can track them by name."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def make_params(pset: ParamSet, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> list[nn.Parameter]:
    """Parameters of ``pset``'s shapes with fixed random gradients attached.

    Values are small (N(0, 0.02)) and gradients N(0, 1): a few dozen steps at
    lr 1e-3 keep everything finite in bfloat16."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in pset.shapes:
        # Generated on the CPU so every device gets the same numbers.
        p = nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ---------------------------------------------------------------------------
# Cases: which optimizer, which implementation, how many bytes
# ---------------------------------------------------------------------------

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
_TORCH_OPTIMIZERS: dict[str, tuple[type, dict, int]] = {
    "sgd": (torch.optim.SGD, {}, 3),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}, 5),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, 5),
    "adam": (torch.optim.Adam, {}, 7),
}
_OURS = ("interpolatron-2", "interpolatron-3", "anderson-2", "anderson-3",
         f"rna-record-w{RNA_WINDOW}", f"rna-extrapolate-w{RNA_WINDOW}",
         "interpolatron-2-master", "anderson-2-master", "interpolatron-2-sr", "anderson-2-sr",
         "anderson-2-onepass", "anderson-3-onepass", "interpolatron-2-diag")
OPTIMIZER_NAMES = tuple(_TORCH_OPTIMIZERS) + _OURS


def bytes_per_element(optimizer: str, elem: int) -> int:
    """Bytes one step moves per parameter element of ``elem`` bytes. A
    ``-master`` case (``master_weights=True``) on 16-bit parameters runs the
    float32 step on the float32 master and rings (its accesses at 4 bytes, the
    float32 gradient copy included), plus the gradient's upcast (read ``elem``,
    write 4) and the rounded write-back of the parameter (read 4, write
    ``elem``): for k = 2 Interpolatron 7 x 4 + 6 + 6 = 40 bytes against plain
    bfloat16's 7 x 2 = 14. On 32/64-bit parameters it is the plain step. An
    ``-sr`` case (``stochastic_rounding=True``) moves the plain step's bytes:
    the rounding is arithmetic on values already in registers. ``-onepass``
    (``Anderson(one_pass=True)``) moves Interpolatron's bytes, its Gram row
    computed in the update pass; ``-diag`` (``Interpolatron(diagnostics=True)``)
    the same dots on Interpolatron's step: it isolates their cost."""
    acc = _accesses(optimizer)
    if optimizer.endswith("-master") and elem < 4:
        return acc * 4 + (elem + 4) + (4 + elem)
    return acc * elem


def _mode(optimizer: str) -> tuple[str, str]:
    """``("anderson-2", "master")`` for ``"anderson-2-master"``; the mode of a plain
    name is ``""``."""
    for mode in ("master", "sr", "onepass", "diag"):
        if optimizer.endswith("-" + mode):
            return optimizer.removesuffix("-" + mode), mode
    return optimizer, ""


def _accesses(optimizer: str) -> int:
    optimizer, mode = _mode(optimizer)
    if optimizer in _TORCH_OPTIMIZERS:
        return _TORCH_OPTIMIZERS[optimizer][2]
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
    cls, kwargs, _ = _TORCH_OPTIMIZERS[name]
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
    from .backends import availability

    device = torch.device(device)
    wanted = set(optimizers) if optimizers else set(OPTIMIZER_NAMES)
    unknown = wanted - set(OPTIMIZER_NAMES)
    if unknown:
        raise ValueError(f"unknown optimizers {sorted(unknown)}; choose from {OPTIMIZER_NAMES}")
    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    for name in _TORCH_OPTIMIZERS:
        if name not in wanted:
            continue
        for impl in ("foreach", "fused"):
            if backends and impl not in backends and "torch.optim" not in backends:
                continue
            why = _torch_impl_reason(name, impl, device, dtype)
            if why is None:
                cases.append(Case(name, impl, "torch.optim", _accesses(name)))
            else:
                skipped.append({"case": f"{name} [{impl}]", "reason": why})
    avail = availability(device, dtype)
    for backend, why in avail.items():
        if backends and backend not in backends:
            continue
        if why is None and backend == "triton" and device.type == "cpu":
            why = "Triton runs on the CPU only in its interpreter (a correctness tool): not timed"
        for name in _OURS:
            if name not in wanted:
                continue
            if why is None:
                cases.append(Case(name, backend, "interpolatron", _accesses(name)))
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
    from . import RNA, Anderson, Interpolatron

    if case.family == "torch.optim":
        cls, kwargs, _ = _TORCH_OPTIMIZERS[case.optimizer]
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


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    """``triton.testing.do_bench`` if triton can drive this GPU, else None."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - any import failure means "use CUDA events"
        return None
    return do_bench


def time_step(fn: Callable[[], Any], device: torch.device | str, warmup: int = 3,
              reps: int = 10, cuda_ms: tuple[float, float] = (25.0, 200.0)) -> tuple[list[float], str]:
    """Per-call times in seconds and the method used.

    CPU: ``warmup`` untimed calls, then ``reps`` calls each timed with
    ``time.perf_counter``. CUDA: ``do_bench`` with ``cuda_ms`` = (warm-up,
    repetition) budgets in milliseconds, else ``reps`` CUDA-event pairs."""
    device = torch.device(device)
    if device.type == "cuda":
        do_bench = _do_bench()
        if do_bench is not None:
            try:
                with torch.cuda.device(device):
                    times = do_bench(fn, warmup=cuda_ms[0], rep=cuda_ms[1], return_mode="all")
                return [t / 1e3 for t in times], "triton.testing.do_bench"
            except Exception:  # noqa: BLE001 - triton present but unusable here: fall back
                pass
        for _ in range(warmup):
            fn()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        _sync(device)
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        _sync(device)
        return [start.elapsed_time(end) / 1e3 for start, end in pairs], "cuda events"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, "time.perf_counter"


def copy_bandwidth(device: torch.device | str, nbytes: int, warmup: int = 2, reps: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` on two ``nbytes`` buffers: every byte is read
    once and written once, so ``2 * nbytes`` bytes move per call (median time)."""
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times, _ = time_step(lambda: dst.copy_(src), device, warmup, reps)
    return 2 * n * 4 / statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the native profiler's start/stop banner (written to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[int | None, int | None, str]:
    """(peak extra bytes during ``fn``, net bytes still allocated after it, method)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return peak, torch.cuda.memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with _quiet_stderr():
            prof.start()
        try:
            fn()
        finally:
            with _quiet_stderr():
                prof.stop()
        events = prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # noqa: BLE001 - profiler internals differ between versions
        return None, None, "n/a (profiler memory events unavailable)"
    level = peak = 0
    for _, nbytes in allocs:
        level += nbytes
        peak = max(peak, level)
    return peak, level, "torch.profiler memory events"


def run_case(case: Case, pset: ParamSet, params: list[nn.Parameter], device: torch.device,
             warmup: int, reps: int, copy_bps: float, measure_peak: bool = True,
             cuda_ms: tuple[float, float] = (25.0, 200.0), compiled: bool = False) -> dict[str, Any]:
    """Time one case on ``params`` and return its row (``compiled``: the step
    under ``torch.compile(fullgraph=True)``, labelled ``impl+compile``)."""
    dtype = params[0].dtype
    holder: dict[str, Prepared] = {}

    def build():
        holder["p"] = prepare_case(case, params, compiled)

    # The state bytes: what building the optimizer and its warm-up leave allocated.
    build_peak, state_bytes, _ = measure_memory(build, device)
    prepared = holder["p"]
    times, method = time_step(prepared.step, device, warmup, reps, cuda_ms)
    peak, _, peak_method = measure_memory(prepared.step, device) if measure_peak else (None, None, "off")
    if peak is not None:
        # The worst step, not only a steady one: the first steps' transients
        # (what building and warming up allocated beyond the state they left)
        # and a step where the set of parameters with gradients changes.
        if build_peak is not None and state_bytes is not None:
            peak = max(peak, build_peak - state_bytes)
        if prepared.change is not None:
            change_peak, _, _ = measure_memory(prepared.change, device)
            peak = max(peak, change_peak if change_peak is not None else 0)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    del prepared
    holder.clear()  # free the optimizer before the next case allocates its own
    median = statistics.median(times)
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = bytes_per_element(case.optimizer, elem) * pset.numel
    achieved = nbytes / median
    return {
        "set": pset.label, "set_name": pset.name, "scale": pset.scale, "n_tensors": pset.n_tensors,
        "numel": pset.numel, "dtype": str(dtype).removeprefix("torch."), "device": device.type,
        "optimizer": case.optimizer, "impl": case.impl + ("+compile" if compiled else ""),
        "family": case.family,
        "time_s": median, "time_min_s": min(times), "time_max_s": max(times), "reps": len(times),
        "timer": method, "accesses_per_elem": case.accesses, "bytes": nbytes,
        "bytes_per_s": achieved, "copy_bytes_per_s": copy_bps, "fraction_of_copy": achieved / copy_bps,
        "floor_s": nbytes / copy_bps,
        "peak_extra_bytes": None if peak is None else float(peak), "peak_method": peak_method,
        "state_bytes": None if state_bytes is None else float(state_bytes), "finite": finite,
    }


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    meta: dict[str, Any]


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str, command: str | None = None) -> dict[str, Any]:
    """Device, versions, commit, date: what a result file must say about itself."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    from . import __version__

    meta: dict[str, Any] = {
        "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version, "interpolatron": __version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = os.getloadavg()
    try:
        from .backends.native_backend import extension_status
        meta["cuda_extension"] = {k: str(v) for k, v in extension_status().items()}
    except Exception:  # noqa: BLE001 - the extension is optional
        meta["cuda_extension"] = "not importable"
    return meta


def run_benchmark(sets: Sequence[ParamSet], dtypes: Sequence[torch.dtype], device: torch.device | str = "cpu",
                  *, optimizers: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                  warmup: int = 3, reps: int = 10, copy_mib: int = 256, measure_peak: bool = True,
                  cuda_ms: tuple[float, float] = (25.0, 200.0), command: str | None = None,
                  log: Callable[[str], None] | None = print, compile_steps: bool = False) -> BenchResult:
    """Run every available case on every (set, dtype) and return the rows.

    The copy bandwidth is measured before and after the cases; the higher of
    the two is the reference (the best the device showed in this run; on a
    shared machine the other one says how much the load moved)."""
    device = torch.device(device)
    meta = environment(device, command)
    copy_bytes = copy_mib << 20
    bw_before = copy_bandwidth(device, copy_bytes)
    if log:
        log(f"copy bandwidth ({copy_mib} MiB buffers): {bw_before / 1e9:.2f} GB/s")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    pending: list[dict[str, Any]] = []
    for dtype in dtypes:
        cases, skip = enumerate_cases(device, dtype, optimizers, backends)
        skipped += [dict(s, dtype=str(dtype).removeprefix("torch.")) for s in skip]
        for pset in sets:
            params = make_params(pset, device, dtype)
            # gc.collect() costs ~0.1 s with torch's modules loaded: only worth it for large sets.
            big = pset.numel * params[0].element_size() > (64 << 20)
            runs = [(c, False) for c in cases]
            if compile_steps:  # our optimizers' steps compiled, next to eager
                runs = [r for c in cases for r in ([(c, False), (c, True)] if c.family != "torch.optim"
                                                   and not c.optimizer.startswith("rna") else [(c, False)])]
            for case, compiled in runs:
                row = run_case(case, pset, params, device, warmup, reps, bw_before, measure_peak, cuda_ms,
                               compiled)
                pending.append(row)
                if log:
                    label = case.label + (" compiled" if compiled else "")
                    log(f"{pset.label:<16} {row['dtype']:<9} {label:<32} "
                        f"{row['time_s'] * 1e3:10.3f} ms  {row['bytes_per_s'] / 1e9:7.2f} GB/s")
                if big:  # optimizers can sit in reference cycles: free their buffers before the next
                    gc.collect()
            del params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bw_after = copy_bandwidth(device, copy_bytes)
    copy_bps = max(bw_before, bw_after)
    for row in pending:  # every row against the same reference
        row["copy_bytes_per_s"] = copy_bps
        row["fraction_of_copy"] = row["bytes_per_s"] / copy_bps
        row["floor_s"] = row["bytes"] / copy_bps
        rows.append(row)
    meta.update(copy_bytes_per_s=copy_bps, copy_bytes_per_s_before=bw_before, copy_bytes_per_s_after=bw_after,
                copy_buffer_bytes=copy_bytes, warmup=warmup, reps=reps,
                sets=[{"name": s.name, "scale": s.scale, "n_tensors": s.n_tensors, "numel": s.numel,
                       "description": s.description} for s in sets])
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = os.getloadavg()
    if log:
        log(f"copy bandwidth after the cases: {bw_after / 1e9:.2f} GB/s")
    return BenchResult(rows, skipped, meta)


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": result.meta, "rows": result.rows, "skipped": result.skipped},
                               indent=1, default=str) + "\n")
    return path


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| set | dtype | optimizer | impl | elements | median ms | min ms | B/elem | GB/s "
            "| of copy | floor ms | peak extra MiB | state MiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        elem = r["bytes"] // (r["numel"] * r["accesses_per_elem"])
        plain = r["bytes"] == r["numel"] * r["accesses_per_elem"] * elem
        # A master-weights step mixes widths: its bytes per element as such.
        per_elem = f"{r['accesses_per_elem']}x{elem}" if plain else str(r["bytes"] // r["numel"])
        lines.append(
            f"| {r['set']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | {r['numel']:,} "
            f"| {r['time_s'] * 1e3:.3f} | {r['time_min_s'] * 1e3:.3f} | {per_elem} "
            f"| {r['bytes_per_s'] / 1e9:.2f} | {100 * r['fraction_of_copy']:.1f} % "
            f"| {r['floor_s'] * 1e3:.3f} | {_mb(r['peak_extra_bytes'])} | {_mb(r['state_bytes'])} |")
    return "\n".join(lines)


def write_markdown(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = result.meta
    peak_methods = sorted({r["peak_method"] for r in result.rows})
    timers = sorted({r["timer"] for r in result.rows})
    text = [
        f"# Optimizer step benchmark: {m['device_name']} ({m['device']})", "",
        f"- torch {m['torch']}, triton {m['triton']}, interpolatron {m['interpolatron']}, "
        f"python {m['python']}, commit `{m['git_commit']}`, {m['date']}",
        f"- command: `{m['command']}`",
        f"- copy bandwidth (`dst.copy_(src)`, {m['copy_buffer_bytes'] >> 20} MiB, 2 bytes moved per byte): "
        f"{m['copy_bytes_per_s'] / 1e9:.2f} GB/s (before the cases {m['copy_bytes_per_s_before'] / 1e9:.2f}, "
        f"after {m['copy_bytes_per_s_after'] / 1e9:.2f}; the higher is the reference)",
        f"- timer: {', '.join(timers)}; {m['warmup']} warm-up calls, median of {m['reps']} "
        f"(CPU; CUDA: do_bench's own budget)",
        f"- peak extra memory: {', '.join(peak_methods)}; state = net allocation of building the "
        f"optimizer plus its warm-up steps",
        f"- threads: {m.get('torch_threads')} of {m.get('cpu_count')} CPUs; load average at start "
        f"{m.get('loadavg_start')}, at end {m.get('loadavg_end')}",
        "- B/elem: element reads + writes per parameter element (ALGORITHMS.md section 4) x element size; "
        "`of copy` = achieved bytes/s over the copy bandwidth; `floor` = bytes / copy bandwidth",
        "",
        markdown_table(result.rows), "",
    ]
    if result.skipped:
        text += ["Not run:", ""]
        seen = set()
        for s in result.skipped:
            key = (s["case"].split("[")[-1], s["reason"], s.get("dtype"))
            if key in seen:
                continue
            seen.add(key)
            text.append(f"- [{key[0]} ({s.get('dtype')}): {s['reason']}")
        text.append("")
    path.write_text("\n".join(text))
    return path


def write_plot(result: BenchResult, path: str | Path) -> Path:
    """One panel per (set, dtype): each case's fraction of the copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in result.rows:
        groups.setdefault((r["set"], r["dtype"]), []).append(r)
    n = max(1, len(groups))
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    height = max(len(g) for g in groups.values()) * 0.28 + 1.2 if groups else 2
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, height * nrows), squeeze=False)
    colors = {"torch.optim": "tab:gray"}
    palette = {"torch": "tab:blue", "native": "tab:orange", "triton": "tab:green"}
    for ax, ((set_label, dtype), rows) in zip(axes.flat, groups.items()):
        labels = [f"{r['optimizer']} [{r['impl']}]" for r in rows]
        fracs = [100 * r["fraction_of_copy"] for r in rows]
        bar_colors = [colors.get(r["family"], palette.get(r["impl"], "tab:purple")) for r in rows]
        y = range(len(rows))
        ax.barh(y, fracs, color=bar_colors)
        for yi, (f, r) in enumerate(zip(fracs, rows)):
            ax.text(f, yi, f" {r['time_s'] * 1e3:.2f} ms", va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=0.8, ls="--")
        ax.set_xlabel("% of copy bandwidth (bytes each step must move / median time)")
        ax.set_title(f"{set_label}, {dtype}: {rows[0]['numel']:,} elements, {rows[0]['n_tensors']} tensors",
                     fontsize=9)
        ax.set_xlim(0, max(110, max(fracs) * 1.25))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = result.meta
    fig.suptitle(f"{m['device_name']}: copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
                 f"torch {m['torch']}, commit {m['git_commit'][:12]}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_json(path: str | Path) -> BenchResult:
    """A result written by :func:`write_json` (to redraw or re-tabulate it)."""
    data = json.loads(Path(path).read_text())
    return BenchResult(data["rows"], data.get("skipped", []), data["meta"])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def result_stem(result: BenchResult, dtypes: Sequence[str]) -> str:
    """``steps-<device>-torch<version>-<dtypes>``: a result file names its device and versions."""
    m = result.meta
    device = _slug(m["device_name"])[:40]
    torch_v = m["torch"].split("+")[0]
    return f"steps-{m['device']}-{device}-torch{torch_v}-{'-'.join(dtypes)}"


def write_all(result: BenchResult, out: str | Path, stem: str, plot: bool = True) -> list[Path]:
    out = Path(out)
    paths = [write_json(result, out / f"{stem}.json"), write_markdown(result, out / f"{stem}.md")]
    if plot and result.rows:
        paths.append(write_plot(result, out / f"{stem}.png"))
    return paths


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "interpolatron bench") -> int:
    """``interpolatron bench``: run, print the table, write JSON, markdown and PNG."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time one optimizer step on parameter sets shaped like real models and compare it "
                    "with the bytes the step must move and the device's copy bandwidth.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--sets", nargs="+", default=["resnet50", "gpt2:0.25", "many-small"],
                        help=f"NAME[:SCALE] with NAME in {', '.join(SET_NAMES)} (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies every set's scale (default 1; 0.1 with --quick)")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=OPTIMIZER_NAMES,
                        help="a subset of the cases (default: all)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="a subset of implementations: torch, triton, native, foreach, fused")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case on the CPU (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="copy-bandwidth buffer size (default 256 MiB, 1024 on CUDA)")
    parser.add_argument("--out", default="bench/results", help="folder for the result files")
    parser.add_argument("--name", default=None, help="file stem (default: device, versions, dtypes)")
    parser.add_argument("--quick", action="store_true",
                        help="scale 0.1, 3 repetitions, 1 warm-up, 64 MiB copy buffer")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time each interpolatron/anderson step under torch.compile(fullgraph=True)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (CPU; default: torch's choice). On a shared "
                             "machine 1 thread avoids multi-thread stalls; the copy bandwidth is measured "
                             "with the same threads")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    sets = [parse_set(token, scale) for token in args.sets]
    reps = args.reps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    copy_mib = args.copy_mib or (64 if args.quick else (1024 if device.type == "cuda" else 256))
    cuda_ms = (10.0, 50.0) if args.quick else (25.0, 200.0)
    result = run_benchmark(sets, [DTYPES[d] for d in args.dtype], device, optimizers=args.optimizers,
                           backends=args.backends, warmup=warmup, reps=reps, copy_mib=copy_mib,
                           measure_peak=not args.no_peak, cuda_ms=cuda_ms, compile_steps=args.compile,
                           command=f"{prog} " + shlex.join(list(argv) if argv is not None else sys.argv[1:]))
    print()
    print(markdown_table(result.rows))
    for s in {(s["case"].split("[")[-1], s["reason"]) for s in result.skipped}:
        print(f"not run: [{s[0]}: {s[1]}")
    stem = args.name or result_stem(result, args.dtype)
    for path in write_all(result, args.out, stem, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m interpolatron.benchmark"))
