"""The project's CUDA kernels (csrc/cuda/*.cu, compiled as they are) run on a
simulated GPU (GPGPU-Sim, functional mode) against the CPU kernels, over the
matrix of issue 20: combine k = 1..10 (templated 1..4, run-time beyond; the
Gram row fused up to 8, a separate dot pass beyond) in fp32, bf16, fp16 (and
fp64), weight decay, maximize, GradScaler scale and skip, stochastic rounding,
the Gram (diagnostics) row; gram_row (store and read-only) and RNA record /
extrapolate for windows 2..10; every shape path (empty, one element, one short
of / one past a 16-byte fragment, tails past a thread stride and past a chunk
(= block) boundary, a tensor over two chunks, 1,100 small tensors, pointers
and ring columns off the 16-byte grid, ring rows of odd width).

All cases run in ONE simulator process (its start-up parses ~4 MB of PTX);
each test then checks its case (rules: tests/gpusim/_cases.py). Build the
simulator once with ``tools/gpusim/build.sh``; without it these tests skip.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from . import _cases as C
from . import _gpusim

pytestmark = pytest.mark.gpusim

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def shapes(dtype: torch.dtype) -> list[int]:
    """Tensor sizes reaching every path of the element loop for dtype."""
    v, c = C.vec_elems(dtype), C.chunk_elems(dtype)
    return [
        2 * c + 5 * v,    # two full chunks (vector path), a third block of 5 fragments
        c + 1,            # a full chunk, then a block of one element (tail path)
        256 * v + 3,      # one past a whole thread stride, ending mid-fragment
        0,                # empty
        1,
        v - 1,            # one short of a fragment
        v + 1,            # one past a fragment
        3 * v,
        c - 3 * v,        # a chunk short of 3 fragments (vector path): the last threads have a step less
    ]


def small(dtype: torch.dtype) -> list[int]:
    v = C.vec_elems(dtype)
    return [v + 1, 2 * v, 0, 3, 5 * v - 1]


# odd_cols / misalign / row_pad move ring fragments and pointers off the
# 16-byte grid: those blocks take the element path.
ODD = dict(odd_cols=(2, 6), misalign=[0, 0, 0, 0, 0, 1, 0, 1, 0], row_pad=1)


def build_matrix() -> list[tuple[str, Callable[[torch.Generator], C.Case]]]:
    """(name, maker) per case; the makers run the CPU reference, so they are
    called only when the simulated run is requested (not at collection)."""
    cases: list[tuple[str, Callable[[torch.Generator], C.Case]]] = []

    def adder(fn):
        def add_case(name, *args, **kwargs):
            cases.append((name, lambda g: fn(name, *args, gen=g, **kwargs)))
        return add_case

    combine, gram, record, extrapolate = (adder(C.combine_case), adder(C.gram_case), adder(C.record_case),
                                          adder(C.extrapolate_case))

    # combine: every k, every 16/32-bit dtype, Gram row on, decay and maximize varied
    for dtype in (F32, BF16, F16):
        name = str(dtype).replace("torch.", "")
        for k in range(1, 9):
            odd = ODD if k % 2 == 0 else {}
            combine(f"combine-{name}-k{k}", dtype, k, shapes(dtype),
                               weight_decay=0.01 if k % 2 else 0.0, maximize=k % 3 == 0, gram=True,
                               count=k + 3, **odd)
        combine(f"combine-{name}-k2-nogram", dtype, 2, small(dtype))
        combine(f"combine-{name}-k6-nogram", dtype, 6, small(dtype), weight_decay=0.1)
    # beyond the register group: a separate dot pass before the update
    combine("combine-float32-k10-gram", F32, 10, shapes(F32), gram=True, weight_decay=0.01)
    combine("combine-bfloat16-k9-gram", BF16, 9, small(BF16), gram=True, maximize=True)
    for k in (1, 2, 5):
        combine(f"combine-float64-k{k}", F64, k, small(F64), gram=k > 1, weight_decay=0.01,
                           **(ODD if k == 2 else {}))
    # GradScaler: the gradient divided by the scale; a skipped step writes nothing
    combine("combine-float32-k2-scale", F32, 2, small(F32), gram=True, grad_scale=1024.0,
                       found_inf=0.0)
    combine("combine-bfloat16-k5-scale", BF16, 5, small(BF16), gram=True, grad_scale=65536.0,
                       weight_decay=0.01)
    combine("combine-float32-k3-skip", F32, 3, small(F32), gram=True, grad_scale=8.0,
                       found_inf=1.0)
    combine("combine-float16-k6-skip", F16, 6, small(F16), found_inf=1.0)
    # stochastic rounding of the 16-bit stores
    for dtype in (BF16, F16):
        name = str(dtype).replace("torch.", "")
        for k in (1, 2, 4, 6):
            combine(f"combine-{name}-k{k}-sr", dtype, k, shapes(dtype) if k == 2 else small(dtype),
                               sr_seed=0x9E3779B97F4A7C15 + k, gram=k == 4, weight_decay=0.01 * (k % 2),
                               count=k * 1000 + 1, **(ODD if k == 2 else {}))
    # 1,100 small tensors in one bucket, and a bucket of empty tensors
    many = [int(x) for x in torch.randint(1, 10, (1100,), generator=torch.Generator().manual_seed(1100))]
    # master weights (issue 17): 16-bit params and gradients, float32 masters and
    # rings (the float32 chunks and fragments: 8-byte 16-bit accesses), to
    # nearest and stochastic; a dot pass (k = 9), GradScaler's scale and skip
    for dtype in (BF16, F16):
        name = str(dtype).replace("torch.", "")
        for k, sr in ((1, False), (2, False), (3, False), (2, True), (4, True), (6, False)):
            combine(f"combine-{name}-k{k}-master{'-sr' if sr else ''}", dtype, k,
                    shapes(F32) if k == 2 else small(F32), master=True, gram=k <= 4,
                    weight_decay=0.01 * (k % 2), maximize=k == 3, count=k * 100 + 3,
                    sr_seed=0x5EED + k if sr else None, **(ODD if k == 2 else {}))
    combine("combine-bfloat16-k9-master-gram", BF16, 9, small(F32), master=True, gram=True, weight_decay=0.01)
    combine("combine-float16-k3-master-scale", F16, 3, small(F32), master=True, gram=True, grad_scale=1024.0,
            found_inf=0.0)
    combine("combine-bfloat16-k2-master-skip", BF16, 2, small(F32), master=True, grad_scale=8.0,
            found_inf=1.0)
    gram("gram-bfloat16-readonly-S3-master", BF16, 3, False, shapes(F32), master=True, weight_decay=0.01,
         **ODD)
    gram("gram-float16-readonly-S1-master", F16, 1, False, small(F32), master=True, weight_decay=0.1)
    combine("combine-float32-k2-1100-tensors", F32, 2, many, gram=True)
    combine("combine-bfloat16-k3-1100-tensors", BF16, 3, many, gram=True, weight_decay=0.1)
    combine("combine-float32-k2-empty", F32, 2, [0, 0], gram=True)

    # gram_row: RNA's stored form (windows 2..10) and Anderson's read-only form
    for slots in range(2, 11):
        dtype = (F32, BF16, F16)[slots % 3]
        name = str(dtype).replace("torch.", "")
        sh = shapes(dtype) if slots in (2, 9) else small(dtype)
        gram(f"gram-{name}-store-S{slots}", dtype, slots, True, sh,
                        weight_decay=0.01 * (slots % 2), maximize=slots == 4, count=slots * 5 + 1,
                        **(ODD if slots in (2, 9) else {}))
    for slots in (0, 1, 3, 7, 8, 9):
        gram(f"gram-float32-readonly-S{slots}", F32, slots, False, small(F32),
                        weight_decay=0.01, count=slots + 2)
    gram("gram-bfloat16-readonly-S4", BF16, 4, False, shapes(BF16), **ODD)
    gram("gram-float32-store-S3-scale", F32, 3, True, small(F32), grad_scale=256.0,
                    found_inf=0.0)
    gram("gram-float32-store-S3-skip", F32, 3, True, small(F32), grad_scale=256.0,
                    found_inf=1.0)
    gram("gram-float64-store-S3", F64, 3, True, small(F64), weight_decay=0.01)
    gram("gram-float32-store-S2-1100-tensors", F32, 2, True, many)

    # RNA record (windows 2..10: S = window + 1 slots) and extrapolate
    for window in range(2, 11):
        dtype = (F32, BF16, F16)[window % 3]
        name = str(dtype).replace("torch.", "")
        sh = shapes(dtype) if window in (2, 10) else small(dtype)
        record(f"record-{name}-w{window}", dtype, window + 1, sh, count=window * 3 + 2,
                          **(ODD if window in (2, 10) else {}))
        extrapolate(f"extrapolate-{name}-m{window}", dtype, window + 1, window, sh,
                               count=window * 3 + 2, **(ODD if window in (2, 10) else {}))
    for dtype in (F32, BF16, F16):
        name = str(dtype).replace("torch.", "")
        record(f"record-{name}-copy", dtype, 4, shapes(dtype), dots=False, **ODD)
    extrapolate("extrapolate-float32-m1", F32, 3, 1, small(F32))
    record("record-float64-w3", F64, 4, small(F64))
    extrapolate("extrapolate-float64-m3", F64, 4, 3, small(F64))
    record("record-float32-w2-1100-tensors", F32, 3, many)
    extrapolate("extrapolate-float32-1100-tensors", F32, 3, 3, many)
    return cases


MATRIX = build_matrix()


@pytest.fixture(scope="module")
def simulated(request):
    """Runs the selected cases of the matrix (``-k``) once on the simulated GPU:
    {case name: problems}. Every case is built (in matrix order, from one
    generator) whatever the selection, so a case's data do not depend on it."""
    sim, why = _gpusim.find()
    if sim is None:
        pytest.skip(why)
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_case" and hasattr(item, "callspec")}
    exe = _gpusim.build_harness()
    with tempfile.TemporaryDirectory(prefix="gpusim-cases-") as tmp:
        cases_path, out_path = Path(tmp) / "cases.bin", Path(tmp) / "out.bin"
        g = torch.Generator().manual_seed(20)
        cases = [make(g) for _, make in MATRIX]
        cases = [c for c in cases if c.name in selected]
        C.write_cases(cases, str(cases_path))
        run = _gpusim.run(sim, exe, ["run", str(cases_path), str(out_path)], functional=True, timeout=1800)
        if "HARNESS_DONE" not in run.stdout:
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
            pytest.fail(f"the simulated run did not finish (exit {run.returncode}):\n{tail}")
        oob = [line for line in run.stderr.splitlines() if "wrote outside" in line]
        outputs = C.read_outputs(cases, str(out_path))
    results = {}
    for i, (case, got) in enumerate(zip(cases, outputs)):
        problems = C.check(case, got)
        if any(f"case {i} wrote" in line for line in oob):
            problems.append("wrote outside its buffers (a guard byte changed)")
        results[case.name] = problems
    return results


@pytest.mark.parametrize("name", [name for name, _ in MATRIX])
def test_case(simulated, name):
    problems = simulated[name]
    assert not problems, f"{name}: " + "; ".join(problems)
