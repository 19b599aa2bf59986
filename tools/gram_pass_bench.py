"""Time the C++ CPU Gram pass (interpolatron._C.gram_row) on one large bucket:
Anderson-k's read-only pass (k dots, the ring holding ages 1..k-1) and, for
comparison, the store form and a combine with its Gram row, per dtype and
thread count, beside a copy of the same bytes as the memory yardstick.

    python tools/gram_pass_bench.py --numel 16777216 --dtype bf16 fp16 fp32 --threads 1 2

Prints one line per case (median and min wall time of --reps timed calls
after a warm-up, and the min process CPU time, all threads) and the load
average before and after, since on a shared machine other processes move the
wall figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from interpolatron.backends import native_backend
from interpolatron.backends.base import CombineArgs, GramArgs

_C = native_backend._C
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _time(fn, reps: int) -> tuple[float, float, float]:
    """Median and min wall time, and min process CPU time (all threads) of one call."""
    fn()
    ts, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(ts), min(ts), min(cpu)


Timing = tuple[float, float, float]


def run(numel: int, dtype: torch.dtype, k: int, reps: int, only: str = "") -> dict[str, Timing]:
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(numel, generator=gen).to(dtype)
    grad = torch.randn(numel, generator=gen).to(dtype)
    ring = torch.randn(k - 1, numel, generator=gen).to(dtype)
    ring_store = torch.randn(k, numel, generator=gen).to(dtype)
    count = torch.tensor(5, dtype=torch.int64)
    out = torch.empty(k, dtype=torch.float64)
    x_hist = torch.randn(k - 1, numel, generator=gen).to(dtype)
    coefs = torch.full((k,), 1.0 / k, dtype=torch.float64)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    copy_dst = torch.empty_like(grad)
    args = ([param], [grad], [0], x_hist, ring, coefs, lr, count, 0.0, False)

    def gram(ring_: torch.Tensor, wd: float, store: bool) -> None:
        _C.gram_row(GramArgs([param], [grad], [0], ring_, count, wd, False, out, store), None)

    cases = {
        "gram_row read-only": lambda: gram(ring, 0.0, False),
        "gram_row read-only, wd": lambda: gram(ring, 0.01, False),
        "gram_row store": lambda: gram(ring_store, 0.0, True),
        # combine writes its inputs: the timings repeat the same step on the changing state.
        "combine + gram": lambda: _C.combine(CombineArgs(*args, out), None),
        "combine": lambda: _C.combine(CombineArgs(*args, None), None),
        "copy (1 stream in, 1 out)": lambda: copy_dst.copy_(grad),
    }
    return {name: _time(fn, reps) for name, fn in cases.items() if only in name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--k", type=int, default=2, help="Anderson's k: dots per Gram pass")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = p.parse_args()
    if _C is None:
        raise SystemExit("interpolatron._C is not built")
    print(f"cpu kernels {_C.cpu_kernels()}, nice {os.nice(0)}, load average before {os.getloadavg()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.dtype:
            for case, (med, best, cpu) in run(args.numel, DTYPES[name], args.k, args.reps, args.only).items():
                print(f"{name} threads={threads} k={args.k} numel={args.numel}: {case:28s} "
                      f"median {med * 1e3:7.3f} ms  min {best * 1e3:7.3f} ms  cpu min {cpu * 1e3:7.3f} ms")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
