"""Step times of a few benchmark rows, interleaved, for comparisons on a loaded machine.

``interpolatron bench`` times its rows one after another: on a shared machine
the load moves between rows, and a 5 % comparison drowns in it. Here every row
is built once (the benchmark's own cases, parameter sets and warm-up), then the
rows take turns: each round times ``--reps`` steps of every row, in an order
shuffled per round, so a change of load hits all rows alike. A ratio is taken
per round (the rows of one round ran within a second or so of each other) and
its median and spread over the rounds are reported next to each row's median
step time over all steps.

    python bench/step_interleaved.py --sets resnet50 gpt2:0.25 --dtype fp32 bf16 \\
        --optimizers adam anderson-2-onepass interpolatron-2 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from interpolatron.benchmark.cases import bytes_per_element, enumerate_cases, prepare_case
from interpolatron.benchmark.shapes import make_params, parse_set

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _cases(dtype: torch.dtype, optimizers: list[str], backends: list[str]):
    """The benchmark's cases for ``optimizers``, in the order given (torch.optim's fused only)."""
    cases, _ = enumerate_cases("cpu", dtype, optimizers, backends)
    by_name = {c.optimizer: c for c in cases}
    missing = [o for o in optimizers if o not in by_name]
    if missing:
        raise SystemExit(f"no runnable case for {missing} with backends {backends}")
    return [by_name[o] for o in optimizers]


def run(set_token: str, dtype_name: str, optimizers: list[str], backends: list[str], rounds: int,
        reps: int, seed: int, clock=time.perf_counter) -> dict:
    dtype = DTYPES[dtype_name]
    pset = parse_set(set_token)
    cases = _cases(dtype, optimizers, backends)
    steps = {}
    keep = []
    for case in cases:  # each row on its own parameters (a step writes them)
        prepared = prepare_case(case, make_params(pset, "cpu", dtype))
        keep.append(prepared)
        steps[case.optimizer] = prepared.step
        for _ in range(3):
            prepared.step()
    times: dict[str, list[list[float]]] = {o: [] for o in optimizers}
    order = list(optimizers)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            step, got = steps[name], []
            for _ in range(reps):
                t0 = clock()
                step()
                got.append(clock() - t0)
            times[name].append(got)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = {}
    for case in cases:
        name = case.optimizer
        flat = [t for r in times[name] for t in r]
        rows[name] = {"impl": case.impl, "median_ms": 1e3 * statistics.median(flat),
                      "min_ms": 1e3 * min(flat),
                      "round_medians_ms": [1e3 * statistics.median(r) for r in times[name]],
                      "bytes_per_element": bytes_per_element(name, elem)}
    return {"set": set_token, "numel": pset.numel, "dtype": dtype_name, "rounds": rounds, "reps": reps,
            "rows": rows}


def ratio(result: dict, a: str, b: str) -> tuple[float, float, float]:
    """Median, min and max over the rounds of (round median of a) / (round median of b)."""
    ra, rb = result["rows"][a]["round_medians_ms"], result["rows"][b]["round_medians_ms"]
    q = sorted(x / y for x, y in zip(ra, rb))
    return statistics.median(q), q[0], q[-1]


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["resnet50", "gpt2:0.25"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--optimizers", nargs="+",
                        default=["adam", "interpolatron-2", "anderson-2-onepass", "interpolatron-2-diag",
                                 "anderson-2"])
    parser.add_argument("--backends", nargs="+", default=["native", "fused"])
    parser.add_argument("--reference", default="interpolatron-2", help="the row ratios are taken against")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3, help="steps of a row per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time (time.thread_time), which leaves out the time "
                             "other processes held the core (one thread only)")
    parser.add_argument("--out", type=Path, help="a JSON file for every round's times")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu times this thread: use --threads 1")
    torch.set_num_threads(args.threads)
    results = []
    load = [os.getloadavg()[0]]
    for dtype_name in args.dtype:
        for token in args.sets:
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            res = run(token, dtype_name, args.optimizers, args.backends, args.rounds, args.reps, args.seed,
                      clock)
            load.append(os.getloadavg()[0])
            results.append(res)
            ref = args.reference
            adam = "adam" if "adam" in res["rows"] else None
            print(f"\n{token} {dtype_name} ({res['numel']:,} elements), {args.rounds} rounds x {args.reps} "
                  f"steps, {args.clock} clock, load {load[-1]:.2f}")
            print(f"| row | impl | B/elem | median ms | round medians IQR ms | / {ref} median [min, max] |"
                  + (" / adam median [min, max] |" if adam else ""))
            for name, row in res["rows"].items():
                lo, hi = quartiles(row["round_medians_ms"])
                r = ratio(res, name, ref)
                line = (f"| {name} | {row['impl']} | {row['bytes_per_element']} | {row['median_ms']:.2f} | "
                        f"{lo:.2f} - {hi:.2f} | {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] |")
                if adam:
                    ra = ratio(res, name, adam)
                    line += f" {ra[0]:.3f} [{ra[1]:.3f}, {ra[2]:.3f}] |"
                print(line, flush=True)
    print(f"\nload average (1 min) at the start and after each set: {', '.join(f'{x:.2f}' for x in load)}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load": load,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
