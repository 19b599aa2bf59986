"""Run a function on N local ranks (gloo on the CPU, NCCL on GPUs) and collect
what each rank returns, with a hard time limit: a hung collective fails the
test instead of hanging CI."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # (TRITON_INTERPRET, where conftest set it, is inherited)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


# What join raises when a rank fails (the names differ across torch versions;
# torch 2.13 has no ProcessException, and catching a missing name hid the
# rank's own traceback behind an AttributeError).
_RANK_ERRORS = tuple(getattr(mp, name) for name in ("ProcessException", "ProcessRaisedException",
                                                    "ProcessExitedException") if hasattr(mp, name))


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0, backend: str = "gloo") -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own
    process of a fresh process group. ``fn`` must be importable (a module-level
    function). Raises on a rank's error or when ``timeout`` seconds pass."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), backend, fn, args, outdir),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s")
        except _RANK_ERRORS:
            pass  # the rank's traceback is in its file, reported below
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for rank in range(world):
            path = os.path.join(outdir, f"{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {fn.__name__} died without a result")
            out = torch.load(path, weights_only=False)
            if "error" in out:
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{out['error']}")
            results.append(out["ok"])
        return results


def rank_results(results: list, name: str) -> list:
    """Every rank's result of case ``name`` of a :func:`run_ranks` suite (a
    rank's error fails the test with its traceback)."""
    import pytest

    for rank, res in enumerate(results):
        if "error" in res[name]:
            pytest.fail(f"rank {rank} of case {name!r} raised:\n{res[name]['error']}")
    return [res[name] for res in results]


def max_abs_diff(a: list, b: list) -> float:
    """The largest absolute difference between paired tensors, in float64."""
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))
