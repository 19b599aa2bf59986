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
import shlex
import sys
from typing import Sequence

import torch

from .cases import (
    LR,
    OPTIMIZER_NAMES,
    OUR_OPTIMIZERS,
    RNA_WINDOW,
    TORCH_OPTIMIZERS,
    Case,
    Prepared,
    accesses,
    bytes_per_element,
    enumerate_cases,
    prepare_case,
)
from .measure import copy_bandwidth, measure_memory, run_case, time_step
from .report import (
    load_json,
    markdown_table,
    result_stem,
    write_all,
    write_json,
    write_markdown,
    write_plot,
)
from .run import DTYPES, BenchResult, device_name, environment, git_commit, run_benchmark
from .shapes import (
    SET_NAMES,
    ParamSet,
    Shape,
    gpt2_shapes,
    make_params,
    many_small_shapes,
    param_set,
    parse_set,
    resnet50_shapes,
    scale_shapes,
    ten_thousand_small_shapes,
)

__all__ = [
    "DTYPES", "LR", "OPTIMIZER_NAMES", "OUR_OPTIMIZERS", "RNA_WINDOW", "SET_NAMES", "TORCH_OPTIMIZERS",
    "BenchResult", "Case", "ParamSet", "Prepared", "Shape", "accesses", "bytes_per_element", "copy_bandwidth",
    "device_name", "enumerate_cases", "environment", "git_commit", "gpt2_shapes", "load_json", "main",
    "make_params", "many_small_shapes", "markdown_table", "measure_memory", "param_set", "parse_set",
    "prepare_case", "resnet50_shapes", "result_stem", "run_benchmark", "run_case", "scale_shapes",
    "ten_thousand_small_shapes", "time_step", "write_all", "write_json", "write_markdown", "write_plot",
]


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
