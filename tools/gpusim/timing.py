"""The bandwidth question in the simulator's timing model (issue 20, item 4).

Runs each benchmark kernel of tools/gpusim/bench_kernels.cu alone on n
elements per stream, one simulation at a time, L2 cold (the host copies do not
fill it: -gpgpu_perf_sim_memcpy 0), and reports its simulated cycles, DRAM
statistics and its throughput of ideal bytes (each stream read or written
once) per cycle as a fraction of the 128-bit copy kernel's in the same model.
Results go to bench/results/gpusim/<name>.json (one file per run, written
after every kernel, so a cut-off run keeps what it measured), with the
simulator commit, config, config overrides and patch hash.

    python tools/gpusim/timing.py --n 4194304 --kernels copy,adam,combine2_f32 --name rtx3070-hash0
    python tools/gpusim/timing.py --bank-xor ...   # the other DRAM bank indexing (XOR with higher bits)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpusim"))

import _gpusim  # noqa: E402

# Ideal DRAM bytes per element of each benchmark (every stream touched once).
BYTES_PER_ELEMENT = {
    "copy": 8,            # fp32 in, out
    "adam": 28,           # p, g, m, v in; p, m, v out
    "combine2_f32": 28,   # param, grad, x and g ring rows in; param and both ring slots out
    "combine2_bf16": 14,  # the same streams in bf16
    "gram2_f32": 12,      # grad and the age-1 ring row in; the age-0 slot out (no weight decay)
    "record_f32": 16,     # RNA window 2 (3 slots): source and the rows of ages 1, 2 in; the slot out
}


_OPTIONS = (r"^(-gpgpu_cache:dl2|-dram_bnk_indexing_policy|-gpgpu_perf_sim_memcpy"
            r"|-gpgpu_kernel_launch_latency)\s+(\S+)")


def run_one(sim, exe, kernel: str, n: int, config: dict, provenance: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    run = _gpusim.run(sim, exe, ["bench", kernel, str(n)], functional=False, config=config)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if "BENCH_END" not in run.stdout:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
        raise RuntimeError(f"{kernel}: the simulation did not finish (exit {run.returncode}):\n{tail}")
    kernels = run.kernels()
    main = kernels[0]  # the op's own kernel (gram_row and record end with a small reduction)
    cycles = main["gpu_sim_cycle"]
    ideal = BYTES_PER_ELEMENT[kernel] * n
    return {
        "kernel": kernel,
        "n": n,
        "ideal_bytes": ideal,
        "cycles": cycles,
        "ideal_bytes_per_cycle": ideal / cycles,
        # 32-byte DRAM accesses: reads, and L2 write-backs (the writes that left
        # L2 before the kernel ended; the rest stay dirty in L2)
        "dram_bytes": 32 * sum(main.get(k, 0) for k in ("dram_n_rd", "dram_n_write", "dram_n_wr_bk")),
        "stats": {k: v for k, v in main.items() if not k.startswith("_")},
        # the options as the simulator read them (overrides included)
        "simulator_options": dict(re.findall(_OPTIONS, run.stdout, re.M)),
        "other_kernels": [{"kernel": k["kernel"], "cycles": k["gpu_sim_cycle"]} for k in kernels[1:]],
        **provenance,
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "wall_seconds": time.time() - t0,
    }


def table(paths: list[Path]) -> str:
    """A markdown table of result files: one row per kernel and file."""
    rows = ["| result | kernel | B/elem | cycles | fraction of copy | DRAM util | row locality "
            "| activations |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        res = json.loads(path.read_text())
        for name, r in res["runs"].items():
            st = r["stats"]
            rows.append(f"| {path.stem} | {name} | {BYTES_PER_ELEMENT[name]} | {r['cycles']:.0f} | "
                        f"{r.get('fraction_of_copy', float('nan')):.3f} | "
                        f"{st.get('dram_bw_util_mean', 0):.3f} | {st.get('dram_row_locality_mean', 0):.3f} | "
                        f"{st.get('dram_n_act', 0)} |")
    return "\n".join(rows)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        results = ROOT / "bench" / "results" / "gpusim"
        paths = [Path(p) for p in sys.argv[2:]] or sorted(results.glob("*.json"))
        print(table(paths))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4 * 1024 * 1024, help="elements per stream")
    ap.add_argument("--kernels", default=",".join(BYTES_PER_ELEMENT))
    ap.add_argument("--bank-xor", action="store_true",
                    help="-dram_bnk_indexing_policy 1 (bank index XORed with higher address bits)")
    ap.add_argument("--l2-sets", type=int, default=64,
                    help="L2 sets per sub-partition (64: the RTX 3070 model's 4 MB; 16: 1 MB, so that 1M "
                         "elements per stream stand to L2 as 4M do to the full model, at a quarter of the "
                         "simulation time)")
    ap.add_argument("--name", required=True, help="result file name under bench/results/gpusim/")
    ap.add_argument("--note", default="")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="another simulator option (e.g. -ptx_opcode_initiation_dp=2,2,2,2,130: a data-centre"
                         " GPU's float64 rate instead of the RTX 3070's 1/64)")
    ap.add_argument("--fmad", action="store_true",
                    help="build the kernels with nvcc's default contraction (--fmad=true): what the "
                         "project's rounding rule (--fmad=false) costs in this model")
    ap.add_argument("--carry", type=Path, default=None,
                    help="start from the runs of this result file (yardsticks whose code and config "
                         "are unchanged need not be simulated again); each carried run keeps its provenance")
    args = ap.parse_args()

    sim, why = _gpusim.find()
    if sim is None:
        sys.exit(why)
    exe = _gpusim.build_harness(fmad=args.fmad)
    # Cold L2 (host copies do not fill it), and no modelled launch latency
    # (5000 cycles in this config: a constant that would weigh on the short
    # runs, the copy most).
    config = {"-gpgpu_perf_sim_memcpy": 0, "-gpgpu_kernel_launch_latency": 0}
    if args.bank_xor:
        config["-dram_bnk_indexing_policy"] = 1
    for item in args.set:
        option, _, value = item.partition("=")
        config[option] = value
    if args.l2_sets != 64:
        config["-gpgpu_cache:dl2"] = f"S:{args.l2_sets}:128:16,L:B:m:L:P,A:192:4,32:0,32"
    out = ROOT / "bench" / "results" / "gpusim" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    if args.carry is not None and not out.exists():
        carried = json.loads(args.carry.read_text())
        if carried.get("config_overrides") != config:
            sys.exit(f"--carry {args.carry}: overrides {carried.get('config_overrides')}, not {config}")
        for name, run in carried["runs"].items():
            if name in args.kernels.split(","):
                continue
            run.setdefault("project_commit", carried.get("project_commit"))
            run["carried_from"] = args.carry.name
            result["runs"][name] = run
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "csrc", "tools/gpusim"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # Per run: a file collects runs of several commits (the yardsticks are not rerun).
    provenance = {"project_commit": git, "kernel_sources_modified": bool(dirty), "harness": exe.parent.name,
                  "fmad": args.fmad}
    result.update({
        "simulator": "GPGPU-Sim (accel-sim/gpgpu-sim_distribution)",
        "simulator_commit": sim.commit,
        "patch": "tools/gpusim/gpgpu-sim.patch",
        "patch_sha256_16": sim.patch_sha,
        "config": _gpusim.CONFIG,
        "config_overrides": config,
        "nvcc_flags": _gpusim.NVCC_FLAGS,
        "project_commit": git,
        "note": args.note,
        "bytes_per_element": BYTES_PER_ELEMENT,
    })
    for kernel in args.kernels.split(","):
        print(f"timing {kernel} on {args.n} elements per stream ...", flush=True)
        r = run_one(sim, exe, kernel, args.n, config, provenance)
        result["runs"][kernel] = r
        copy = result["runs"].get("copy")
        if copy and copy["n"] == args.n:
            for rr in result["runs"].values():
                if rr["n"] == args.n:
                    rr["fraction_of_copy"] = rr["ideal_bytes_per_cycle"] / copy["ideal_bytes_per_cycle"]
        out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        st = r["stats"]
        print(f"  {kernel}: {r['cycles']:.0f} cycles, {r['ideal_bytes_per_cycle']:.1f} B/cycle, "
              f"fraction {r.get('fraction_of_copy', float('nan')):.3f}, "
              f"DRAM util {st.get('dram_bw_util_mean', 0):.3f}, "
              f"row locality {st.get('dram_row_locality_mean', 0):.3f}, "
              f"activations {st.get('dram_n_act', 0)}, {r['cpu_seconds']:.0f} CPU-s", flush=True)


if __name__ == "__main__":
    os.nice(10)
    main()
