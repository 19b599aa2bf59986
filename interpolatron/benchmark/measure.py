"""Timing and memory of one step, and one case's row."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .cases import Case, Prepared, bytes_per_element, prepare_case
from .shapes import ParamSet


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
