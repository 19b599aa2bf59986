"""The staged device run, for a lent GPU machine with no network. One command:

    python3 bench/gpu/run.py            # stage 1 then stage 2
    python3 bench/gpu/run.py --stage 1  # only one stage

Stage 1 (under 6 minutes): builds the extension against the machine's own
torch (``pip install --no-deps --no-build-isolation -e .``, the CUDA kernels
for this GPU's architecture only), ``interpolatron info``, then the
``gpu``-marked tests (CUDA kernels and Triton kernels against the torch
oracle, whole-step CUDA-graph capture, sync debug mode): a bounded set of
Triton variants, since only the gpu-marked cases compile natively.

Stage 2 (under 6 minutes): the step benchmark (Interpolatron-2/3, Anderson-2,
RNA record/extrapolate against torch.optim Adam foreach/fused and SGD fused;
GPT-2-124M, ResNet-50 and 10,000 small tensors; fp32 and bf16; the copy
bandwidth measured in the same run; every fused backend available), then,
where ``ncu`` works, DRAM throughput per kernel of one step of each.

Everything goes under ``$OUT`` (default ``bench/results/gpu``) as JSON with the
device, the versions and the commit; every step is bounded by a timeout and a
failed step still writes what it got, and the next step still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE_BUDGET_S = 330  # each stage, under the 6-minute slot
PY = sys.executable or "python3"


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    env = {"commit": _git_commit(), "python": platform.python_version(), "host": platform.node(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["capability"] = list(torch.cuda.get_device_capability(0))
            env["device_count"] = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        env["torch_error"] = repr(exc)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton_error"] = repr(exc)
    nvcc = shutil.which("nvcc")
    if nvcc:
        env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True,
                                     text=True).stdout.strip()[-120:]
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        env["nvidia_smi"] = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True,
                                           text=True).stdout.strip()
    return env


class Stage:
    """Runs bounded steps, recording each (even a failed one) into one JSON file."""

    def __init__(self, name: str, budget_s: float):
        self.name, self.deadline = name, time.monotonic() + budget_s
        self.path = out_dir() / f"{name}.json"
        self.record = {"stage": name, "environment": environment(), "steps": []}
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.record, indent=2))

    def run(self, step: str, cmd: list[str], timeout_s: float, env: dict | None = None) -> dict:
        timeout_s = max(5.0, min(timeout_s, self.left()))
        print(f"[{self.name}] {step}: {' '.join(cmd)} (timeout {timeout_s:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            # The tree itself on the path: stage 2 runs even where stage 1's install failed.
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONPATH": path, **(env or {})})
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (
                exc.stdout or "")
        except OSError as exc:
            rc, output = "error", repr(exc)
        entry = {"step": step, "cmd": cmd, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                 "output_tail": output[-6000:]}
        (out_dir() / f"{self.name}-{step}.log").write_text(output)
        self.record["steps"].append(entry)
        self.save()
        print(f"[{self.name}] {step}: rc={rc} in {entry['seconds']} s", flush=True)
        return entry


def _pytest_summary(junit: Path) -> dict:
    try:
        text = junit.read_text()
    except OSError:
        return {}
    m = re.search(r'<testsuite[^>]*?errors="(\d+)"[^>]*?failures="(\d+)"[^>]*?skipped="(\d+)"'
                  r'[^>]*?tests="(\d+)"', text)
    failed = re.findall(r'<testcase classname="([^"]+)" name="([^"]+)"[^>]*>\s*<(?:failure|error)', text)
    summary = {"failed_tests": [f"{c}::{n}" for c, n in failed]}
    if m:
        summary.update(errors=int(m[1]), failures=int(m[2]), skipped=int(m[3]), tests=int(m[4]))
    return summary


def stage1() -> dict:
    st = Stage("stage1", STAGE_BUDGET_S)
    env = {"MAX_JOBS": str(os.cpu_count() or 8), "INTERPOLATRON_FORCE_CUDA": "1"}
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: a third of the compile time
    except Exception:  # noqa: BLE001 - the build step reports what is wrong
        pass
    st.run("build", [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                     "-e", "."], 200, env)
    st.run("info", [PY, "-m", "interpolatron", "info"], 30)
    junit = out_dir() / "stage1-tests.xml"
    tests = ["tests/backends/test_native_backend.py", "tests/backends/test_triton_backend.py",
             "tests/integration/test_sync_free_step.py"]
    entry = st.run("gpu-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-ra",
                                 f"--junitxml={junit}", *tests], st.left() - 5)
    entry["summary"] = _pytest_summary(junit)
    st.save()
    return st.record


def _backends() -> list[str]:
    try:
        import torch

        from interpolatron.backends import availability

        return [n for n, why in availability("cuda", torch.float32).items() if why is None and n != "torch"]
    except Exception:  # noqa: BLE001
        return []


_NCU_PROBE = r"""
import sys, torch, interpolatron
from interpolatron.benchmark import make_params, param_set
backend, which = sys.argv[1], sys.argv[2]
params = make_params(param_set("gpt2"), "cuda", torch.float32)
if which == "adam-fused":
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
elif which == "interpolatron-2":
    opt = interpolatron.Interpolatron(params, lr=1e-3, alphas=(0.6, 0.4), backend=backend)
else:
    opt = interpolatron.Anderson(params, lr=1e-3, history=2, backend=backend)
for _ in range(3):
    opt.step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
opt.step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
"""


def _ncu(st: Stage, backends: list[str]) -> None:
    ncu = shutil.which("ncu")
    if ncu is None:
        st.record["ncu"] = "ncu not found on PATH"
        st.save()
        return
    metrics = "dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum," \
              "dram__throughput.avg.pct_of_peak_sustained_elapsed"
    results = {}
    probes = [("adam-fused", "torch")] + [(w, b) for b in backends for w in ("interpolatron-2", "anderson-2")]
    for which, backend in probes:
        if st.left() < 25:
            break
        st.run(f"ncu-{which}-{backend}", [ncu, "--profile-from-start", "off", "--metrics", metrics, "--csv",
                                          PY, "-c", _NCU_PROBE, backend, which], 60)
        rows = []
        log = out_dir() / f"{st.name}-ncu-{which}-{backend}.log"
        for line in (log.read_text() if log.exists() else "").splitlines():
            cells = [c.strip('"') for c in re.findall(r'"[^"]*"', line)]
            if len(cells) >= 3 and cells[-3] in metrics.split(","):
                rows.append({"kernel": cells[4] if len(cells) > 4 else "", "metric": cells[-3],
                             "unit": cells[-2], "value": cells[-1]})
        results[f"{which}[{backend}]"] = rows
    st.record["ncu"] = results
    st.save()


def stage2() -> dict:
    st = Stage("stage2", STAGE_BUDGET_S)
    backends = _backends()
    st.record["fused_backends"] = backends
    st.save()
    base = [PY, "-m", "interpolatron", "bench", "--device", "cuda", "--no-plot", "--no-peak", "--out",
            str(out_dir()), "--backends", "foreach", "fused", *backends]
    ours = ["interpolatron-2", "interpolatron-3", "anderson-2", "rna-record-w4", "rna-extrapolate-w4"]
    st.run("bench-large", base + ["--dtype", "fp32", "bf16", "--sets", "gpt2", "resnet50",
                                  "--optimizers", "adam", "sgd", *ours, "--name", "bench-large"], 200)
    st.run("bench-10k", base + ["--dtype", "fp32", "--sets", "10k-small", "--optimizers", "adam", "sgd",
                                "interpolatron-2", "anderson-2", "--reps", "5", "--name", "bench-10k"], 70)
    # The 16-bit modes: is stochastic rounding's hash hidden behind memory on a GPU?
    st.run("bench-16bit", base + ["--dtype", "bf16", "--sets", "gpt2", "--optimizers", "adam",
                                  "interpolatron-2", "interpolatron-2-sr", "interpolatron-2-master",
                                  "anderson-2", "anderson-2-sr", "--name", "bench-16bit"], 60)
    _ncu(st, backends)
    return st.record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    args = parser.parse_args()
    print(f"results in {out_dir()}", flush=True)
    ok = True
    if args.stage in ("1", "all"):
        rec = stage1()
        ok &= all(s["rc"] == 0 for s in rec["steps"])
    if args.stage in ("2", "all"):
        rec = stage2()
        ok &= all(s["rc"] == 0 for s in rec["steps"] if s["step"].startswith("bench"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
