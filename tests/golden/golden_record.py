"""The golden record: short trajectories of every optimizer, backend, dtype and
feature, kept bit for bit in ``golden.pt`` next to this file, so that a change
meant to move code (not behaviour) can prove it moved nothing.

Regenerate (one command; do it when a change of behaviour is intended, and
say so in the commit)::

    python tests/golden/golden_record.py --write

Check (what ``test_golden.py`` runs)::

    python tests/golden/golden_record.py --check OUT.json

What the bits depend on, and how it is pinned: the script re-executes itself
with :data:`PINNED_ENV` before torch is imported. One CPU thread; ATen's
vectorized kernels at their DEFAULT build (ATEN_CPU_CAPABILITY, else an
AVX-512 machine sums in another width than an AVX2 one); MKL's conditional
numerical reproducibility at COMPATIBLE (the torch backend's float64 dots are
BLAS calls); the C++ extension's CPU kernels at their DEFAULT variant (every
x86-64 machine has it; the AVX2/AVX-512 variants sum dots in other vector
widths); Triton in its interpreter with a small, fixed block so that one
tensor spans several programs. Each case seeds its own generator.

Every case is named ``<optimizer>-<backend>-<dtype>-<feature>``; a record is
an ordered ``{key: tensor}`` with the parameters after every step and, at the
end, every state tensor (the ``state_dict``'s, Anderson's optimizer-wide state
included; RNA's windows, coefficients and extrapolations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "golden.pt"

PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "INTERPOLATRON_CPU_CAPABILITY": "DEFAULT",
    "TRITON_INTERPRET": "1",
    "INTERPOLATRON_TRITON_BLOCK": "16",
    "INTERPOLATRON_GOLDEN_PINNED": "1",
}

STEPS = 4
# Odd sizes: an empty tensor, a 1-element one, one over two Triton blocks, a
# channels_last one (its ring columns in storage order).
SHAPES = [(5, 3), (0,), (1,), (37,), (2, 2, 2, 2)]
CHANNELS_LAST = 4
# Sharded over 2 ranks along dim 0 (uneven: rank 1 holds none of the 1-element
# tensor), one tensor replicated.
SHARDED_SHAPES = [(7, 3), (5,), (1,), (11, 2), (3, 4)]
REPLICATED = 4

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
BACKENDS = ("torch", "native", "triton")
COMMON = ("plain", "wd_max", "groups", "nograd", "amp")
SIXTEEN = ("master", "sr")
# Anderson(one_pass=True) (ALGORITHMS.md 2b): each names the common feature it
# runs one-pass (the runs test the feature's name through ``_base_feature``).
ONE_PASS = {"onepass": "plain", "onepass_wd_max": "wd_max", "onepass_nograd": "nograd",
            "onepass_amp": "amp", "sharded_onepass": "sharded"}


@dataclass(frozen=True)
class Case:
    algo: str  # interpolatron | anderson | rna
    backend: str
    dtype: str  # a key of DTYPES
    feature: str

    @property
    def name(self) -> str:
        return f"{self.algo}-{self.backend}-{self.dtype}-{self.feature}"

    @property
    def sharded(self) -> bool:
        return self.feature.startswith("sharded")


# Under Triton's interpreter a launch costs about 0.1 s: its launchers branch
# on the features, not on the dtype (but for stochastic rounding), so every
# feature runs in float32 and the other dtypes run the dtype-specific ones.
TRITON_DTYPE_FEATURES = {"bf16": ("plain", "master", "sr", "onepass"), "fp16": ("plain", "sr"),
                         "fp64": ("plain",)}
TRITON_RNA_DTYPE_FEATURES = ("iterates",)


def _wanted(backend: str, dtype: str, feature: str, algo: str) -> bool:
    if backend != "triton" or dtype == "fp32":
        return True
    if algo == "rna":
        return feature in TRITON_RNA_DTYPE_FEATURES
    return feature in TRITON_DTYPE_FEATURES[dtype]


def _cases() -> list[Case]:
    out = []
    for algo in ("interpolatron", "anderson"):
        features = COMMON + (("diag",) if algo == "interpolatron" else ())
        for backend in BACKENDS:
            for dtype in DTYPES:
                for feature in features + (SIXTEEN if dtype in ("bf16", "fp16") else ()) + ("sharded",):
                    if _wanted(backend, dtype, feature, algo):
                        out.append(Case(algo, backend, dtype, feature))
    for backend in BACKENDS:
        for dtype in DTYPES:
            for feature in ("iterates", "gradients", "online"):
                if _wanted(backend, dtype, feature, "rna"):
                    out.append(Case("rna", backend, dtype, feature))
    # Appended after the others: the record's existing cases keep their order.
    for backend in BACKENDS:
        for dtype in DTYPES:
            for feature in ONE_PASS:
                if _wanted(backend, dtype, feature, "anderson"):
                    out.append(Case("anderson", backend, dtype, feature))
    return out


CASES = _cases()
CASE_NAMES = [c.name for c in CASES]


# -- the runs ------------------------------------------------------------------
def _torch():
    import torch

    return torch


def _dtype(case: Case):
    return getattr(_torch(), DTYPES[case.dtype])


def _problem(shapes, dtype, seed: int):
    """Initial values and a diagonal quadratic per tensor: ``g = d * (x - t) + noise``,
    formed in float64 and rounded to the gradient's dtype."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    d = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    t = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    noise = [[0.1 * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]

    def grad(i: int, step: int, x):
        return (d[i] * (x.detach().to(torch.float64) - t[i]) + noise[step][i]).to(x.dtype)

    return x0, grad


def _base_feature(feature: str) -> str:
    """The common feature a one-pass feature runs (others: themselves)."""
    return ONE_PASS.get(feature, feature)


def _optimizer(case: Case, params, groups: bool):
    import interpolatron

    torch = _torch()
    kw: dict = dict(backend=case.backend)
    f = _base_feature(case.feature)
    if f != case.feature:
        kw["one_pass"] = True
    if f == "master":
        kw["master_weights"] = True
    if f == "sr":
        kw.update(stochastic_rounding=True, sr_seed=12345)
    if case.algo == "interpolatron":
        kw["alphas"] = (0.3, 0.7) if f == "wd_max" else (0.2, 0.3, 0.5)
        kw["diagnostics"] = f in ("diag", "sharded")
        cls = interpolatron.Interpolatron
    else:
        kw["history"] = 2 if f == "wd_max" else 3  # 2: the closed-form solve
        if f == "groups":
            kw["constraint"] = "simplex"
        if f == "amp":
            kw["reg"] = 1e-3
        cls = interpolatron.Anderson
    if f == "wd_max":
        kw.update(weight_decay=0.05, maximize=True)
    if f == "sharded":
        kw["weight_decay"] = 0.01
    lr = torch.tensor(0.05, dtype=torch.float64) if f == "nograd" else 0.05
    if groups:
        second = dict(params=params[3:], lr=0.02, weight_decay=0.1)
        if case.algo == "interpolatron":
            second["alphas"] = (0.6, 0.4)
        return cls([dict(params=params[:3]), second], lr=lr, **kw)
    return cls(params, lr=lr, **kw)


def _bits(t):
    """``t`` on the CPU, detached, as a plain tensor (DTensors gathered whole)."""
    torch = _torch()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().clone()
    return torch.tensor(t)


def _state_tensors(opt, out: dict) -> None:
    torch = _torch()
    sd = opt.state_dict()
    for pid in sorted(sd["state"]):
        for key in sorted(sd["state"][pid]):
            value = sd["state"][pid][key]
            if isinstance(value, torch.Tensor):
                out[f"state/{pid}/{key}"] = _bits(value)


def _optimizer_case(case: Case, rank: int | None = None, world: int = 1) -> dict:
    torch = _torch()
    dtype = _dtype(case)
    seed = sum(map(ord, case.name)) % 1000
    sharded = rank is not None
    shapes = SHARDED_SHAPES if sharded else SHAPES
    x0, grad = _problem(shapes, dtype, seed)
    if sharded:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        place = [[Replicate()] if i == REPLICATED else [Shard(0)] for i in range(len(shapes))]
        params = [torch.nn.Parameter(distribute_tensor(x, mesh, pl, src_data_rank=None))
                  for x, pl in zip(x0, place)]
    else:
        params = []
        for i, x in enumerate(x0):
            if i == CHANNELS_LAST:
                x = x.contiguous(memory_format=torch.channels_last)
            params.append(torch.nn.Parameter(x))
    opt = _optimizer(case, params, groups=case.feature == "groups")
    f = _base_feature(case.feature)
    out: dict = {}
    for step in range(STEPS):
        kwargs = {}
        for i, p in enumerate(params):
            full = p.full_tensor() if sharded else p
            g = grad(i, step, full)
            if f == "amp":
                g = g * 8.0
                if step == 2 and i == 0:
                    g = g.clone()
                    g.view(-1)[0] = float("inf")
            if sharded:
                g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            elif i == CHANNELS_LAST:
                g = g.contiguous(memory_format=torch.channels_last)
            drop = (f == "nograd" and ((step == 2 and i in (1, 3)) or (step == 3 and i == 0))
                    or (f == "sharded" and step == 3 and i == 1))
            p.grad = None if drop else g
        if f == "amp":
            kwargs = dict(grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([float(step == 2)]))
        if f == "nograd" and step == 3:
            opt.param_groups[0]["lr"].fill_(0.03)  # a scheduler's in-place update
        opt.step(**kwargs)
        for i, p in enumerate(params):
            out[f"step{step}/param{i}"] = _bits(p)
        if case.algo == "anderson":
            out[f"step{step}/coefficients"] = _bits(opt.coefficients)
            out[f"step{step}/fallbacks"] = _bits(opt.fallbacks)
        elif opt._diagnostics_on:
            for key, value in sorted(opt.diagnostics.items()):
                out[f"step{step}/diag/{key}"] = _bits(value)
    _state_tensors(opt, out)
    return out


def _rna_case(case: Case) -> dict:
    import interpolatron

    torch = _torch()
    dtype = _dtype(case)
    seed = sum(map(ord, case.name)) % 1000
    x0, grad = _problem(SHAPES, dtype, seed)
    tensors = [torch.nn.Parameter(x) for x in x0]
    f = case.feature
    optimizer = torch.optim.SGD(tensors, lr=0.05, weight_decay=0.01) if f == "gradients" else None
    rna = interpolatron.RNA(tensors, window=3, reg=1e-6,
                            residual="gradients" if f == "gradients" else "iterates",
                            mode="online" if f == "online" else "offline", optimizer=optimizer,
                            backend=case.backend)
    out: dict = {}
    for step in range(STEPS):
        with torch.no_grad():
            for i, p in enumerate(tensors):
                g = grad(i, step, p)
                if optimizer is not None:
                    p.grad = g
                else:
                    p.sub_(0.05 * g.to(torch.float64).to(p.dtype))
        if optimizer is not None:
            optimizer.step()
        rna.record()
        for i, p in enumerate(tensors):
            out[f"record{step}/tensor{i}"] = _bits(p)
    for bi, b in enumerate(list(rna._snap) + list(rna._grad_buckets)):
        out[f"window{bi}"] = _bits(b.window)
    if f != "online":
        extrapolated = rna.extrapolate()
        for i, t in enumerate(extrapolated):
            out[f"extrapolated/tensor{i}"] = _bits(t)
    out["coefficients"] = _bits(rna.coefficients)
    out["gram"] = _bits(rna._gram)
    if optimizer is not None:
        rna.close()
    return out


def run_case(case: Case) -> dict:
    torch = _torch()
    torch.set_num_threads(1)
    return _rna_case(case) if case.algo == "rna" else _optimizer_case(case)


def sharded_worker(rank: int, world: int, names: list[str]) -> dict:
    """Every sharded case on this rank (one process group for all of them)."""
    by_name = {c.name: c for c in CASES}
    return {name: _optimizer_case(by_name[name], rank, world) for name in names}


def run_all(names: list[str]) -> dict[str, dict]:
    by_name = {c.name: c for c in CASES}
    chosen = [by_name[n] for n in names]
    results: dict[str, dict] = {}
    sharded = [c.name for c in chosen if c.sharded]
    ranks: list = []
    spawned = None
    if sharded:
        # The two ranks run in their own processes while this one runs the
        # single-process cases (a thread only waits for them).
        sys.path.insert(0, str(HERE.parent / "_support"))
        import golden_record
        from _dist import run_ranks

        failure: list = []

        def spawn() -> None:
            try:
                ranks.extend(run_ranks(golden_record.sharded_worker, 2, sharded, timeout=600.0))
            except BaseException as exc:  # re-raised below
                failure.append(exc)

        spawned = threading.Thread(target=spawn)
        spawned.start()
    timing = os.environ.get("INTERPOLATRON_GOLDEN_TIMES")
    for case in chosen:
        if not case.sharded:
            start = time.perf_counter()
            results[case.name] = run_case(case)
            if timing:
                print(f"{time.perf_counter() - start:7.3f} s  {case.name}", file=sys.stderr)
    if spawned is not None:
        spawned.join()
        if failure:
            raise failure[0]
        for name in sharded:
            first, second = ranks[0][name], ranks[1][name]
            for key, value in first.items():  # gathered whole: every rank holds the same
                assert _same_bits(value, second[key]), f"{name}: ranks differ at {key}"
            results[name] = first
    return {n: results[n] for n in names}


# -- comparing -----------------------------------------------------------------
_INT_OF = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _same_bits(a, b) -> bool:
    torch = _torch()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool or not a.is_floating_point():
        return torch.equal(a, b)
    as_int = getattr(torch, _INT_OF[a.element_size()])
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _difference(want: dict, got: dict) -> str | None:
    """Where ``got`` first differs from ``want``, in words (None: bitwise equal)."""
    if list(want) != list(got):
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        return f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, a in want.items():
        b = got[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{key}: {b.dtype} {tuple(b.shape)}, recorded {a.dtype} {tuple(a.shape)}"
        if not _same_bits(a, b):
            diff = (b.double() - a.double()).abs().max().item() if a.numel() else 0.0
            return f"{key}: values differ (max |difference| {diff:.3g})"
    return None


def _pack(results: dict[str, dict]) -> dict:
    """Every tensor's bytes in one uint8 tensor and an index of (key, dtype,
    shape, offset): a file per tensor costs more than the data here."""
    torch = _torch()
    index, chunks, offset = {}, [], 0
    for name, record in results.items():
        entries = []
        for key, t in record.items():
            flat = t.contiguous().view(-1)
            raw = flat.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            entries.append((key, str(t.dtype).removeprefix("torch."), list(t.shape), offset, raw.numel()))
            chunks.append(raw)
            offset += raw.numel()
        index[name] = entries
    return {"index": index, "data": torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)}


def _unpack(packed: dict) -> dict[str, dict]:
    torch = _torch()
    data, out = packed["data"], {}
    for name, entries in packed["index"].items():
        record = {}
        for key, dtype, shape, offset, nbytes in entries:
            dt = getattr(torch, dtype)
            raw = data[offset:offset + nbytes].clone()
            record[key] = (raw.view(dt) if nbytes else torch.empty(0, dtype=dt)).reshape(shape)
        out[name] = record
    return out


def load_record() -> dict[str, dict]:
    return _unpack(_torch().load(RECORD, weights_only=True))


def check(names: list[str]) -> dict[str, str | None]:
    recorded = load_record()
    got = run_all(names)
    report = {}
    for name in names:
        if name not in recorded:
            report[name] = "not in the record (regenerate with --write)"
        else:
            report[name] = _difference(recorded[name], got[name])
    return report


def _pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record every case into golden.pt")
    parser.add_argument("--check", metavar="OUT",
                        help="compare with golden.pt; write {case: difference} as JSON")
    parser.add_argument("--cases", nargs="*", help="only these cases (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASE_NAMES))
        return 0
    if not _pinned():
        # Re-run in a fresh interpreter: the settings must precede torch's import.
        env = dict(os.environ, **PINNED_ENV)
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env)
    sys.path.insert(0, str(HERE))
    from interpolatron.backends.native_backend import extension_status

    variant = extension_status()["cpu_variant"]
    if variant not in (None, "DEFAULT"):  # None: not built, the native cases fail and say so
        raise RuntimeError(f"the extension runs its {variant} CPU kernels, the record needs DEFAULT")
    names = args.cases or CASE_NAMES
    if args.write:
        import torch

        results = run_all(names)
        if args.cases and RECORD.exists():  # re-record some cases, keep the rest
            kept = load_record()
            kept.update(results)
            results = {n: kept[n] for n in CASE_NAMES if n in kept}
        torch.save(_pack(results), RECORD)
        print(f"recorded {len(names)} cases into {RECORD} ({RECORD.stat().st_size} bytes)")
        return 0
    if args.check:
        report = check(names)
        Path(args.check).write_text(json.dumps(report, indent=1))
        bad = {k: v for k, v in report.items() if v}
        for name, why in bad.items():
            print(f"{name}: {why}")
        print(f"{len(report) - len(bad)} of {len(report)} cases bitwise equal to the record")
        return 1 if bad else 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
