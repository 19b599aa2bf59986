"""Can the simulated GPU run the Triton kernels? (issue 20, item 5)

Triton's runtime cannot be used: it assembles its PTX into a cubin and loads
that through the driver API (dlopen("libcuda.so.1"), cuModuleLoadData,
cuModuleGetFunction, cuLaunchKernelEx). GPGPU-Sim executes PTX only; its
cuModuleLoadData / cuModuleGetFunction are stubs that return success without a
module, it has no cuLaunchKernelEx, it ships no libcuda.so.1, and Triton
launches on torch CUDA tensors, whose libtorch_cuda cannot load against the
simulator's libcudart.

This probe asks the next question: would the simulator's PTX parser accept
Triton's PTX at all, if a harness embedded it? It compiles the Triton kernels
for sm_86 without a device, hands each PTX to the simulator in place of the
harness's own (a cuobjdump wrapper that substitutes the extracted file) and
reports the parser's first error, after rewriting the constructs that have a
plain equivalent (.reqntid -> .maxntid; debug .loc/.file lines and sections
dropped). Measured with Triton 3.9: every kernel then stops at
``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` (Triton's shared-memory layout
conversion in its reductions), which GPGPU-Sim does not implement.

    python tools/gpusim/triton_probe.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "gpusim")]

import _gpusim  # noqa: E402

KERNELS = ["combine-fp32-k2", "gram_row-fp32-k2", "rna_record-fp32-s3", "rna_extrapolate-fp32-s3"]

_COMPILE = r"""
import sys
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import _triton_sass as ts
cases = ts._cases(torch.float32)
for name in sys.argv[2:]:
    fn, sig, constexprs, _, _ = cases[name]
    signature = dict(sig)
    signature.update({k: "constexpr" for k in constexprs})
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 86, 32), options={"num_warps": 8})
    (Path(sys.argv[1]) / f"{name}.ptx").write_text(k.asm["ptx"])
"""


def plain(ptx: str) -> str:
    """The rewrites that keep the kernel's meaning."""
    ptx = re.sub(r"^\.reqntid (\d+)$", r".maxntid \1, 1, 1", ptx, flags=re.M)
    cut = ptx.find("\t.section\t.debug")
    if cut > 0:
        ptx = ptx[:cut]
    return "\n".join(line for line in ptx.splitlines() if not re.match(r"\s*\.(loc|file)\b", line)) + "\n"


def first_error(sim: _gpusim.Simulator, exe: Path, ptx: Path, work: Path) -> str:
    cuda = work / "cuda"
    if not cuda.exists():
        (cuda / "bin").mkdir(parents=True)
        for sub in ("include", "lib64"):
            (cuda / sub).symlink_to(sim.cuda / sub)
        for tool in ("nvcc", "ptxas"):
            (cuda / "bin" / tool).symlink_to(sim.cuda / "bin" / tool)
        wrapper = cuda / "bin" / "cuobjdump"
        wrapper.write_text(f'#!/bin/sh\n"{sim.cuda}/bin/cuobjdump" "$@"; rc=$?\n'
                           f'if [ "$1" = "-xptx" ]; then cp "$PROBE_PTX" "$2"; fi\nexit $rc\n')
        wrapper.chmod(0o755)
    env = dict(os.environ, PROBE_PTX=str(ptx))
    sim = _gpusim.Simulator({**sim.env, "CUDA_INSTALL_PATH": str(cuda)})
    os.environ.update(env)
    run = _gpusim.run(sim, exe, ["bench", "copy", "16"], functional=True, timeout=900)
    m = re.search(r"Syntax error:\s*\n\s*\n(.*?)\n", run.stdout)
    if m:
        return "syntax error at: " + m.group(1).strip()
    if "Assertion" in run.stdout + run.stderr:
        return "assertion: " + re.search(r"Assertion.*", run.stdout + run.stderr).group(0)
    return "parsed (no syntax error)"


def main() -> None:
    sim, why = _gpusim.find()
    if sim is None:
        sys.exit(why)
    exe = _gpusim.build_harness()
    work = Path(tempfile.mkdtemp(prefix="triton-probe-"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    subprocess.run([sys.executable, "-c", _COMPILE, str(work), *KERNELS], check=True, env=env)
    for name in KERNELS:
        raw = work / f"{name}.ptx"
        fixed = work / f"{name}.plain.ptx"
        fixed.write_text(plain(raw.read_text()))
        print(f"{name}: as Triton wrote it: {first_error(sim, exe, raw, work)}")
        print(f"{name}: after the plain rewrites: {first_error(sim, exe, fixed, work)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
