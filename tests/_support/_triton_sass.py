"""Compiles the Triton kernels for a GPU target without a device (used by
tests/backends/test_cuda_sass.py in a subprocess without TRITON_INTERPRET): Triton's
own compiler down to PTX, then the ptxas that ships with Triton down to a
cubin with the spill report. Each case is the production configuration of one
op (default block and warps, aligned rings) and says how many 128-bit loads
and stores its vector path must have: two per thread and stream (8 KiB per
program and stream over 8 warps)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.compiler import ASTSource

from interpolatron.triton_kernels import _launch
from interpolatron.triton_kernels.combine import _combine_kernel
from interpolatron.triton_kernels.gram_row import _gram_row_kernel
from interpolatron.triton_kernels.rna import _rna_extrapolate_kernel, _rna_record_kernel

_TABLES = ["ptrs", "numels", "cols", "flags", "blk_tensor", "blk_start"]


def _cases(dtype: torch.dtype) -> dict:
    ty = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    tdt = _launch.tl_dtype(dtype)
    block = _launch.settings(dtype).block
    per_thread = 2  # 128-bit accesses per thread and stream
    record_per_thread = _launch.settings(dtype, "rna_record").block * dtype.itemsize // (16 * 256)
    tables = {n: "*i64" for n in _TABLES}
    common = dict(CD=tl.float32, RING_ALIGNED=True, BLOCK=block)
    amp = {"grad_scale": "*fp32", "found_inf": "*fp32"}
    no_amp = dict(SCALED=False, SKIPPABLE=False)
    with_amp = dict(SCALED=True, SKIPPABLE=True)
    def combine_sig(t: str, ring: str | None = None) -> dict:
        ring = ring or t
        return {**tables, "ntensors": "i32", "x_hist": f"*{ring}", "g_hist": f"*{ring}", "x_stride": "i32",
                "g_stride": "i32", "coefs": "*fp64", "lr": "*fp64", "count": "*i64", "wd": "*fp64",
                **amp, "partials": "*fp64", "nblocks": "i32", "sr_seed": "i32", "master": "*fp32"}

    sr_cases = {}
    if dtype == torch.bfloat16:
        # Stochastic rounding of the 16-bit writes (bf16 and fp16: the same block),
        # with GradScaler, as a mixed-precision run uses it.
        for t16, tdt16 in (("bf16", tl.bfloat16), ("fp16", tl.float16)):
            sr_cases[f"combine-{t16}-k2-sr"] = (_combine_kernel, combine_sig(t16), dict(
                K=2, KP=2, GRAM=True, MAXIMIZE=False, HAS_WD=True, PDT=tdt16, GDT=tdt16, **common,
                **with_amp, SR=True, MASTER=False), 4 * per_thread, 3 * per_thread)
        # Master weights: bf16 parameter and gradient, float32 master and rings,
        # the float32 block (8 elements per thread: one 128-bit access of each
        # 16-bit stream, two of each float32 one). Reads master, gradient, two
        # rings; writes master, parameter, two ring slots.
        sr_cases["combine-bf16-k2-master"] = (_combine_kernel, combine_sig("bf16", "fp32"), dict(
            K=2, KP=2, GRAM=True, MAXIMIZE=False, HAS_WD=True, PDT=tl.bfloat16, GDT=tl.bfloat16,
            CD=tl.float32, RING_ALIGNED=True, BLOCK=_launch.settings(torch.float32).block, **with_amp,
            SR=False, MASTER=True),
            2 + 1 + 2 + 2, 2 + 1 + 2 + 2)
    return {
        f"combine-{ty}-k2": (_combine_kernel, combine_sig(ty),
            dict(K=2, KP=2, GRAM=True, MAXIMIZE=False, HAS_WD=True, PDT=tdt, GDT=tdt, **common, **no_amp,
                 SR=False, MASTER=False),
            4 * per_thread, 3 * per_thread),
        # GradScaler's variant: the scale and the skip flag read on the device.
        f"combine-{ty}-k2-amp": (_combine_kernel, combine_sig(ty),
            dict(K=2, KP=2, GRAM=True, MAXIMIZE=False, HAS_WD=True, PDT=tdt, GDT=tdt, **common,
                 **with_amp, SR=False, MASTER=False),
            4 * per_thread, 3 * per_thread),
        **sr_cases,
        f"gram_row-{ty}-k2": (_gram_row_kernel, {
            **tables, "ntensors": "i32", "g_hist": f"*{ty}", "g_stride": "i32", "count": "*i64",
            "wd": "*fp64", **amp, "partials": "*fp64", "nblocks": "i32", "master": "*fp32"},
            dict(K=2, SLOTS=2, STORE=True, MAXIMIZE=False, HAS_WD=True, GDT=tdt, PDT=tdt, **common,
                 **no_amp, MASTER=False),
            3 * per_thread, 1 * per_thread),
        f"gram_row-{ty}-k2-amp": (_gram_row_kernel, {
            **tables, "ntensors": "i32", "g_hist": f"*{ty}", "g_stride": "i32", "count": "*i64",
            "wd": "*fp64", **amp, "partials": "*fp64", "nblocks": "i32", "master": "*fp32"},
            dict(K=2, SLOTS=2, STORE=True, MAXIMIZE=False, HAS_WD=True, GDT=tdt, PDT=tdt, **common,
                 **with_amp, MASTER=False),
            3 * per_thread, 1 * per_thread),
        f"rna_record-{ty}-s3": (_rna_record_kernel, {
            **tables, "window": f"*{ty}", "w_stride": "i32", "count": "*i64", "partials": "*fp64",
            "nblocks": "i32"},
            dict(S=3, DIFFS=True, SDT=tdt, CD=tl.float32, RING_ALIGNED=True,
                 BLOCK=_launch.settings(dtype, "rna_record").block),
            3 * record_per_thread, 1 * record_per_thread),
        f"rna_extrapolate-{ty}-s3": (_rna_extrapolate_kernel, {
            **tables, "window": f"*{ty}", "w_stride": "i32", "count": "*i64", "coefs": "*fp64",
            "m": "i32"},
            dict(S=3, ODT=tdt, **common),
            3 * per_thread, 1 * per_thread),
    }


def _ptxas_report(ptx: Path, arch: str) -> tuple[int, int]:
    """(spill bytes, registers per thread) per ptxas -v. Triton's wheel carries two
    ptxas (the newer one for recent PTX versions); the first that accepts this PTX
    reports."""
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    errors = []
    for tool in (here / "ptxas-blackwell", here / "ptxas", shutil.which("ptxas")):
        if tool is None or not Path(tool).exists():
            continue
        rep = subprocess.run([str(tool), f"-arch={arch}", "-v", str(ptx), "-o", str(ptx) + ".o"],
                             capture_output=True, text=True)
        if rep.returncode == 0:
            text = rep.stderr + rep.stdout
            spills = sum(int(a) + int(b) for a, b in
                         re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
            regs = max((int(r) for r in re.findall(r"Used (\d+) registers", text)), default=-1)
            return spills, regs
        errors.append(rep.stderr[-300:])
    raise RuntimeError(f"no ptxas accepted {ptx}: {errors}")


def compile_all(target, outdir: str) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (fn, sig, constexprs, loads, stores) in _cases(dtype).items():
            signature = dict(sig)
            signature.update({k: "constexpr" for k in constexprs})
            # Pointer arguments are 16-byte aligned, as torch allocates them.
            names = list(fn.arg_names)
            attrs = {(names.index(k),): [["tt.divisibility", 16]]
                     for k, v in sig.items() if v.startswith("*")}
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(src, target=target, options={"num_warps": 8})
            ptx = Path(outdir) / f"{name}.ptx"
            cubin = Path(outdir) / f"{name}.cubin"
            ptx.write_text(kernel.asm["ptx"])
            cubin.write_bytes(kernel.asm["cubin"])  # what Triton itself assembled
            arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
            spills, regs = _ptxas_report(ptx, arch)
            out[name] = {"cubin": str(cubin), "loads": loads, "stores": stores, "spills": spills,
                         "registers": regs}
    return out
