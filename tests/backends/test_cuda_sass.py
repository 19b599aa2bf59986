"""The machine code of the GPU kernels, read without a GPU: every .cu file is
compiled for sm_90 with nvcc, and the Triton kernels for an sm_90 target, and
their SASS (cuobjdump) must show 128-bit global loads AND stores on the aligned
(vector) paths of combine, the Gram pass and RNA, in fp32 and bf16, and no
register spills. A kernel whose vector path fell back to narrow accesses would
still be correct, so only this test notices it.

Needs nvcc (the CUDA kernels) and cuobjdump (from the CUDA toolkit or the one
the Triton wheel ships); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from _nvcc_check import check_cuda_compile

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCH = "sm_90"


def _triton_bin(name: str) -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


NVCC = os.environ.get("NVCC") or shutil.which("nvcc")
CUOBJDUMP = shutil.which("cuobjdump") or _triton_bin("cuobjdump")

needs_nvcc = pytest.mark.skipif(NVCC is None,
                                reason="nvcc is not on PATH (the CUDA toolkit compiles the kernels)")
needs_cuobjdump = pytest.mark.skipif(
    CUOBJDUMP is None, reason="cuobjdump not found (CUDA toolkit, or the Triton wheel's backends/nvidia/bin)")

_ACCESS = re.compile(r"\b((?:LDG|STG|LDL|STL|LD|ST)(?:\.[A-Z0-9_]+)*)\b")
# fp32 fused multiply-adds (counted under "FFMA"), except 0 * x + y (an RZ
# multiplicand: exact, ptxas's own exponent test inside the float64 division)
_FFMA = re.compile(r"\bFFMA(?:\.[A-Z0-9_]+)*\s+(?![^;]*\bRZ\b)[^;]*;")


def sass_by_function(cubin: Path) -> dict[str, Counter]:
    """Memory instructions per kernel: {mangled name: Counter(opcode with modifiers)}."""
    text = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True,
                          timeout=300).stdout
    out: dict[str, Counter] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), Counter())
            continue
        if current is None or "/*" not in line:
            continue
        ins = line.split("*/", 1)[1] if line.strip().startswith("/*") else line
        a = _ACCESS.search(ins)
        if a:
            current[a.group(1)] += 1
        if _FFMA.search(ins):
            current["FFMA"] += 1
    return out


def wide(c: Counter, kind: str) -> int:
    """128-bit global accesses of ``kind`` (LDG / STG), whatever cache modifiers nvcc adds."""
    return sum(n for op, n in c.items() if op.startswith(kind + ".") and ".128" in op)


def narrow_generic(c: Counter) -> int:
    """Local-memory (spill) accesses: LDL / STL."""
    return sum(n for op, n in c.items() if op.split(".")[0] in ("LDL", "STL"))


@pytest.fixture(scope="module")
def cuda_sass() -> tuple[dict[str, Counter], str]:
    """SASS of the kernel objects csrc/check_cuda_compile.sh compiled (sm_90,
    --fmad=false and -O3 as setup.py builds them), with their ptxas logs."""
    if NVCC is None or CUOBJDUMP is None:
        pytest.skip("nvcc or cuobjdump missing")
    kept = check_cuda_compile().kept
    funcs: dict[str, Counter] = {}
    log = ""
    for name in ("combine.cu", "gram_row.cu", "rna.cu"):
        obj, ptxas = kept / (name + ".o"), kept / (name + ".log")
        assert obj.exists(), f"{name} did not compile: see test_cuda_compile.py's report"
        log += ptxas.read_text()
        funcs.update(sass_by_function(obj))
    return funcs, log


def _one(funcs: dict[str, Counter], *parts: str) -> Counter:
    hits = [name for name in funcs if all(p in name for p in parts)]
    assert len(hits) == 1, (parts, hits)
    return funcs[hits[0]]


# Mangled template arguments: float = "f", bf16 = "NS_4bf16E"; K / NDOTS as Li<k>E.
DT = {"fp32": "If", "bf16": "INS_4bf16E"}

# (kernel, template suffix, 128-bit loads, 128-bit stores) on the vector path;
# every kernel also loads its 32-byte table record, at least half of it as one
# 128-bit load (a kernel without a second pointer loads the first 8 bytes alone).
# combine k=2: param, grad, x and g ring rows in; param and both ring slots out.
CUDA_EXPECT = [
    ("combine_kernel", "Li2ELb0E", 4 + 1, 3),
    ("combine_kernel", "Li2ELb1E", 4 + 1, 3),
    ("combine_kernel", "Li3ELb0E", 6 + 1, 3),
    # Gram pass k=2 with store: grad, param (weight decay), ring row 1; g0 stored.
    ("gram_row_kernel", "Li2EEEv", 3 + 1, 1),
    # RNA record, 2 dots: source, rows of ages 1 and 2; the copy.
    ("record_kernel", "Li2EEEv", 3 + 1, 1),
    # extrapolate: 4 snapshots at once, one output.
    ("extrapolate_kernel", "EEv", 4 + 1, 1),
]


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel,suffix,loads,stores", CUDA_EXPECT,
                         ids=[f"{k}-{s}" for k, s, _, _ in CUDA_EXPECT])
def test_cuda_vector_paths_are_128_bit(cuda_sass, dtype, kernel, suffix, loads, stores):
    funcs, _ = cuda_sass
    c = _one(funcs, kernel + DT[dtype] + suffix)
    assert wide(c, "LDG") >= loads, dict(c)
    assert wide(c, "STG") >= stores, dict(c)
    # The wide accesses are global ones: a generic LD/ST.128 means nvcc lost the address space.
    assert not [op for op in c if op.split(".")[0] in ("LD", "ST") and ".128" in op], dict(c)


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("suffix", ["Li2ELb0ELb0E", "Li2ELb1ELb0E", "Li2ELb0ELb1E"],
                         ids=["k2", "k2-gram", "k2-sr"])
def test_cuda_master_combine_vector_path(cuda_sass, suffix):
    """Master weights (bf16 parameters, float32 master and rings): the float32
    streams move 128 bits per access (master, x and g ring rows in; master and
    both ring slots out) and the bf16 gradient and parameter 64 bits (the same
    4 elements per thread as the float32 kernel, whose dot products it must
    equal bit for bit)."""
    funcs, _ = cuda_sass
    c = _one(funcs, "combine_master_kernel" + DT["bf16"] + suffix)
    assert wide(c, "LDG") >= 3 + 1, dict(c)
    assert wide(c, "STG") >= 3, dict(c)
    assert sum(n for op, n in c.items() if op.startswith("LDG.") and ".64" in op) >= 1, dict(c)
    assert sum(n for op, n in c.items() if op.startswith("STG.") and ".64" in op) >= 1, dict(c)


@needs_nvcc
@needs_cuobjdump
def test_cuda_kernels_round_every_multiply_and_add(cuda_sass):
    """The rounding rule of the CUDA kernels is the CPU kernels' (-ffp-contract=off):
    nvcc --fmad=false, so no fp32 FFMA anywhere (nvcc contracted ``g * sign + wd * x``
    and the weighted sums unevenly across a fragment; the simulated GPU measured
    fp32 results one rounding off the CPU's). The float64 dot products keep their
    explicit fma (DFMA), exact for fp32 products on both devices."""
    funcs, _ = cuda_sass
    fused = {name: c["FFMA"] for name, c in funcs.items() if c["FFMA"]}
    assert not fused, fused


@needs_nvcc
@needs_cuobjdump
def test_cuda_kernels_do_not_spill(cuda_sass):
    funcs, log = cuda_sass
    assert funcs
    spills = [line for line in log.splitlines()
              if "spill" in line and not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line)]
    assert not spills, "\n".join(spills)
    local = {name: narrow_generic(c) for name, c in funcs.items() if narrow_generic(c)}
    assert not local, local


# ----------------------------------------------------------------------------- Triton

_TRITON_SCRIPT = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests/_support"]
from triton.backends.compiler import GPUTarget
import _triton_sass
print(json.dumps(_triton_sass.compile_all(GPUTarget("cuda", 90, 32), sys.argv[2])))
"""


@pytest.fixture(scope="module")
def triton_sass(tmp_path_factory):
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump missing")
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton_sass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(ROOT), str(tmp)], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip(f"this Triton cannot compile for a target without a device: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (sass_by_function(Path(info["cubin"])), info) for name, info in result.items()}


TRITON_CASES = ["combine-fp32-k2", "combine-bf16-k2", "gram_row-fp32-k2", "gram_row-bf16-k2",
                "combine-fp32-k2-amp", "combine-bf16-k2-amp", "gram_row-fp32-k2-amp", "gram_row-bf16-k2-amp",
                "rna_record-fp32-s3", "rna_record-bf16-s3", "rna_extrapolate-fp32-s3",
                "rna_extrapolate-bf16-s3", "combine-bf16-k2-sr", "combine-fp16-k2-sr",
                "combine-bf16-k2-master"]


@pytest.mark.parametrize("name", TRITON_CASES)
@needs_cuobjdump
def test_triton_vector_paths_are_128_bit(triton_sass, name):
    funcs, info = triton_sass[name]
    (c,) = funcs.values()
    assert wide(c, "LDG") >= info["loads"], dict(c)
    assert wide(c, "STG") >= info["stores"], dict(c)
    assert narrow_generic(c) == 0, dict(c)
    assert info["spills"] == 0, info


@needs_cuobjdump
def test_triton_stochastic_rounding_is_its_own_specialisation(triton_sass):
    """The hash (its first multiplier, 0x7FEB352D, as PTX writes it) is compiled
    into the SR combines, for every element of the vector and the masked path
    (h(col), then r(col) per stream: 3 per element, 16 elements per thread, two
    paths) and into no other kernel: rounding to nearest compiles as before."""
    mult = str(0x7FEB352D)

    def hashes(name: str) -> int:
        return Path(triton_sass[name][1]["cubin"]).with_suffix(".ptx").read_text().count(mult)

    per_thread = 16  # 4096 16-bit elements per program over 256 threads
    for name in ("combine-bf16-k2-sr", "combine-fp16-k2-sr"):
        assert hashes(name) >= 2 * 3 * per_thread, name
    for name in TRITON_CASES:
        if not name.endswith("-sr"):
            assert hashes(name) == 0, name


def test_sass_parser_counts_wide_accesses():
    """The counting itself, on a fixed SASS excerpt (so a format change of
    cuobjdump cannot make the tests above pass vacuously)."""
    text = """
        Function : kern
        /*0090*/                   LDG.E.128 R8, desc[UR6][R12.64] ;   /* 0x000000060c087981 */
        /*0d50*/                   LD.E.128 R24, desc[UR6][R52.64] ;   /* 0x0000000634187980 */
        /*10b0*/                   STG.E.128 desc[UR6][R30.64], R12 ;  /* 0x0000000c1e007986 */
        /*10c0*/                   STG.E.128.STRONG.GPU desc[UR6][R30.64], R12 ; /* 0x0 */
        /*10d0*/               @P1 STL [R1], R12 ;  /* 0x0 */
    """
    with tempfile.TemporaryDirectory() as d:
        fake = Path(d) / "cuobjdump"
        fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + text + "\nEOF\n")
        fake.chmod(0o755)
        global CUOBJDUMP
        saved, CUOBJDUMP = CUOBJDUMP, str(fake)
        try:
            c = sass_by_function(Path(d) / "x.cubin")["kern"]
        finally:
            CUOBJDUMP = saved
    assert wide(c, "LDG") == 1 and wide(c, "STG") == 2 and narrow_generic(c) == 1


# Stochastic rounding (16-bit only) runs in kernels of its own, combine_sr_kernel:
# the hashing and rounding must keep the 128-bit accesses of the vector path
# (k = 2: param, grad and two ring rows in; param and both ring slots out).
SR_DT = {"bf16": "INS_4bf16E", "fp16": "INS_4fp16E"}


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("dots", ["Lb0E", "Lb1E"], ids=["nogram", "gram"])
def test_cuda_stochastic_rounding_keeps_128_bit_accesses(cuda_sass, dtype, dots):
    funcs, _ = cuda_sass
    c = _one(funcs, "combine_sr_kernel" + SR_DT[dtype] + "Li2E" + dots)
    assert wide(c, "LDG") >= 4 + 1, dict(c)
    assert wide(c, "STG") >= 3, dict(c)
    assert not [op for op in c if op.split(".")[0] in ("LD", "ST") and ".128" in op], dict(c)
    assert narrow_generic(c) == 0, dict(c)
