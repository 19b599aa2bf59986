"""Bitwise fingerprint of the C++ CPU kernels (interpolatron._C), for refactors
that must not change a bit: every op, dtype, ring size 1..10, odd tensor sizes
around the chunk and vector boundaries, unaligned ring columns, GradScaler,
weight decay, maximize, stochastic rounding, each CPU kernel variant this
machine runs.

    python tools/cpu_kernel_digest.py record before.json
    (change csrc/, rebuild)
    python tools/cpu_kernel_digest.py record after.json
    python tools/cpu_kernel_digest.py compare before.json after.json

Each case stores a SHA-256 of everything the op wrote except the dot products
(parameters, rings, outputs) and the dot products themselves as float.hex, so
that a change meant to touch only the dots' rounding shows as such: `compare`
reports state mismatches (always a failure) and the largest relative change
of each dot (relative to the case's scale ||a|| ||b||, the size of the summed
products) separately. Exit status 0 when every state matches and every dot is
bitwise equal or within --dots-rtol.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys

import torch

from interpolatron.backends import native_backend
from interpolatron.backends.base import CombineArgs, ExtrapArgs, GramArgs, RecordArgs

_C = native_backend._C

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sizes around the 8192-element chunk, the vector widths (8 / 16 / 32 lanes) and empty / 1-element
# tensors; gaps between the tensors' ring columns make most of them start unaligned.
SIZES = (1, 0, 7, 8191, 8193, 16, 31, 17000, 3, 65)
GAPS = (3, 1, 0, 5, 2, 1, 8, 1, 0, 4)
KS = range(1, 11)


def _layout() -> tuple[list[int], int]:
    offsets, col = [], 3
    for n, gap in zip(SIZES, GAPS):
        offsets.append(col)
        col += n + gap
    return offsets, col


def _rand(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()


def _dots(out: torch.Tensor | None) -> list[str]:
    return [] if out is None else [float(v).hex() for v in out.tolist()]


def _norms(vectors: list[torch.Tensor]) -> list[float]:
    return [float(v.double().norm()) for v in vectors]


def _active(row: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    return torch.cat([row[o:o + n] for o, n in zip(offsets, SIZES)])


def combine_cases(gen: torch.Generator):
    offsets, ncols = _layout()
    for name, dtype in DTYPES.items():
        sixteen = dtype in (torch.bfloat16, torch.float16)
        for k in KS:
            variants = [
                dict(gram=False, wd=0.0, maximize=False, scale=None, inf=None, seed=None, count=k + 2),
                dict(gram=True, wd=0.01, maximize=True, scale=None, inf=None, seed=None, count=2**33 + 5),
                dict(gram=True, wd=0.0, maximize=False, scale=1024.0, inf=0.0, seed=None, count=3 * k + 1),
                dict(gram=True, wd=0.1, maximize=False, scale=8.0, inf=1.0, seed=None, count=5),
            ]
            if sixteen:
                variants += [dict(gram=True, wd=0.01, maximize=False, scale=None, inf=None, seed=12345,
                                  count=2 * k + 3),
                             dict(gram=False, wd=0.0, maximize=True, scale=2.0, inf=0.0, seed=2**32 - 1,
                                  count=7)]
            for i, v in enumerate(variants):
                params = [_rand(gen, (n,), dtype) for n in SIZES]
                grads = [_rand(gen, (n,), dtype) for n in SIZES]
                x_hist = _rand(gen, (k - 1, ncols), dtype)
                g_hist = _rand(gen, (k - 1, ncols), dtype)
                coefs = _rand(gen, (k,), torch.float64)
                lr = torch.tensor(0.05, dtype=torch.float64)
                count = torch.tensor(v["count"], dtype=torch.int64)
                gram = torch.full((k,), math.nan, dtype=torch.float64) if v["gram"] else None
                scale = None if v["scale"] is None else torch.tensor([v["scale"]], dtype=torch.float32)
                inf = None if v["inf"] is None else torch.tensor([v["inf"]], dtype=torch.float32)
                # The dots' size: ||g0|| ||g(age j)|| (g0 before weight decay: an upper-bound scale).
                g0 = torch.cat([g.double() for g in grads])
                rows = [g0] + [_active(g_hist[(v["count"] - j) % (k - 1)], offsets) for j in range(1, k)]
                scales = [float(g0.norm()) * n for n in _norms(rows)] if v["gram"] else []
                args = CombineArgs(params, grads, offsets, x_hist, g_hist, coefs, lr, count, v["wd"],
                                   v["maximize"], gram, grad_scale=scale, found_inf=inf, sr_seed=v["seed"])
                done = _C.combine(args, None)
                assert done
                yield (f"combine/{name}/k{k}/v{i}", _digest(params + grads + [x_hist, g_hist]), _dots(gram),
                       scales)


def gram_row_cases(gen: torch.Generator):
    offsets, ncols = _layout()
    for name, dtype in DTYPES.items():
        for k in KS:
            for store in (True, False):
                slots = k if store else k - 1
                if store and slots < 1:
                    continue
                for i, (wd, maximize, scale, inf) in enumerate(
                        [(0.0, False, None, None), (0.01, True, 512.0, 0.0), (0.0, False, 4.0, 1.0)]):
                    params = [_rand(gen, (n,), dtype) for n in SIZES]
                    grads = [_rand(gen, (n,), dtype) for n in SIZES]
                    g_hist = _rand(gen, (slots, ncols), dtype)
                    c = 3 * k + i
                    count = torch.tensor(c, dtype=torch.int64)
                    out = torch.full((k,), math.nan, dtype=torch.float64)
                    s = None if scale is None else torch.tensor([scale], dtype=torch.float32)
                    f = None if inf is None else torch.tensor([inf], dtype=torch.float32)
                    g0 = torch.cat([g.double() for g in grads])
                    rows = [g0] + [_active(g_hist[(c - j) % slots], offsets) for j in range(1, k)]
                    scales = [float(g0.norm()) * n for n in _norms(rows)]
                    args = GramArgs(params, grads, offsets, g_hist, count, wd, maximize, out, store,
                                    grad_scale=s, found_inf=f)
                    assert _C.gram_row(args, None)
                    yield (f"gram_row/{name}/k{k}/store{int(store)}/v{i}",
                           _digest(params + grads + [g_hist]), _dots(out), scales)


def rna_cases(gen: torch.Generator):
    offsets, ncols = _layout()
    for name, dtype in DTYPES.items():
        for slots in KS:
            for with_out in (True, False):
                sources = [_rand(gen, (n,), dtype) for n in SIZES]
                window = _rand(gen, (slots, ncols), dtype)
                c = 2 * slots + 1
                count = torch.tensor(c, dtype=torch.int64)
                out = torch.full((slots - 1,), math.nan, dtype=torch.float64) if with_out else None
                y = [torch.cat([s.double() for s in sources])]
                y += [_active(window[(c - a) % slots], offsets).double() for a in range(1, slots)]
                r = [y[a] - y[a + 1] for a in range(slots - 1)]
                scales = [float(r[0].norm()) * n for n in _norms(r)] if with_out and r else []
                assert _C.rna_record(RecordArgs(sources, offsets, window, count, out), None)
                yield (f"rna_record/{name}/s{slots}/out{int(with_out)}", _digest(sources + [window]),
                       _dots(out), scales)
            for m in sorted({1, max(1, slots // 2), slots}):
                window = _rand(gen, (slots, ncols), dtype)
                outs = [_rand(gen, (n,), dtype) for n in SIZES]
                coefs = _rand(gen, (m,), torch.float64)
                count = torch.tensor(slots + 2, dtype=torch.int64)
                assert _C.rna_extrapolate(ExtrapArgs(window, offsets, count, coefs, outs), None)
                yield f"rna_extrapolate/{name}/s{slots}/m{m}", _digest(outs + [window]), [], []


def record(path: str) -> None:
    if _C is None:
        raise SystemExit("interpolatron._C is not built")
    before = _C.cpu_kernels()
    result = {}
    try:
        for variant in _C.available_cpu_kernels():
            assert _C.select_cpu_kernels(variant) == variant
            for threads in (1, 2):
                torch.set_num_threads(threads)
                gen = torch.Generator().manual_seed(20261207)
                for cases in (combine_cases, gram_row_cases, rna_cases):
                    for name, state, dots, scales in cases(gen):
                        result[f"{variant}/t{threads}/{name}"] = {"state": state, "dots": dots,
                                                                  "scales": scales}
    finally:
        _C.select_cpu_kernels(before)
    with open(path, "w") as f:
        json.dump(result, f, indent=0, sort_keys=True)
    print(f"{len(result)} cases written to {path}")


def compare(a_path: str, b_path: str, dots_rtol: float) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    bad = 0
    if a.keys() != b.keys():
        print(f"case lists differ: only in {a_path}: {sorted(a.keys() - b.keys())[:10]}, "
              f"only in {b_path}: {sorted(b.keys() - a.keys())[:10]}")
        bad += 1
    state_bad = dots_changed = dots_bad = 0
    worst: dict[str, float] = {}
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if x["state"] != y["state"]:
            state_bad += 1
            if state_bad <= 20:
                print(f"STATE differs: {key}")
        if x["dots"] != y["dots"]:
            dots_changed += 1
            group = "/".join(key.split("/")[2:4])  # op/dtype
            for u, v, s in zip(x["dots"], y["dots"], x["scales"]):
                u, v = float.fromhex(u), float.fromhex(v)
                rel = abs(u - v) / s if s > 0 else (0.0 if u == v else math.inf)
                worst[group] = max(worst.get(group, 0.0), rel)
                if not rel <= dots_rtol:
                    dots_bad += 1
    print(f"{len(a.keys() & b.keys())} cases: {state_bad} state mismatches, {dots_changed} with changed dots "
          f"({dots_bad} dots beyond rtol {dots_rtol:g} of ||a|| ||b||)")
    for group, rel in sorted(worst.items()):
        print(f"  {group}: largest dot change {rel:.3g} of ||a|| ||b||")
    return 1 if bad or state_bad or dots_bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("path")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--dots-rtol", type=float, default=0.0,
                   help="allowed change of a dot relative to ||a|| ||b|| (default 0: bitwise)")
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(args.path)
        return 0
    return compare(args.a, args.b, args.dots_rtol)


if __name__ == "__main__":
    sys.exit(main())
