"""One optimizer step per test, timed by pytest-benchmark, for every optimizer x
implementation x parameter set x dtype (``pytest bench/ --benchmark-only``).

The cases, parameter sets and byte counts come from
:mod:`interpolatron.benchmark` (the same library as ``interpolatron bench``);
each test reports its bytes, achieved bytes/s and fraction of the copy
bandwidth (measured once per session) in ``extra_info``.
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch
from bench_settings import bench_device, bench_dtypes, bench_rounds, bench_sets

from interpolatron import benchmark as bm

DEVICE = bench_device()


def _params_of():
    # One parameter set alive at a time (GPT-2 at full size is 0.5 GB per buffer
    # in fp32): the tests are ordered set-major below, so the cache rarely misses.
    @functools.lru_cache(maxsize=1)
    def get(label: str, dtype_name: str):
        gc.collect()
        pset = next(s for s in bench_sets() if s.label == label)
        return pset, bm.make_params(pset, DEVICE, bm.DTYPES[dtype_name])
    return get


PARAMS = _params_of()


def _cases():
    out = []
    for dtype_name in bench_dtypes():
        cases, _ = bm.enumerate_cases(DEVICE, bm.DTYPES[dtype_name])
        for pset in bench_sets():
            for case in cases:
                out.append(pytest.param(pset.label, dtype_name, case,
                                        id=f"{pset.label}-{dtype_name}-{case.optimizer}-{case.impl}"))
    return out


@pytest.mark.parametrize(("set_label", "dtype_name", "case"), _cases())
def test_step(benchmark, copy_bps, set_label: str, dtype_name: str, case: bm.Case):
    pset, params = PARAMS(set_label, dtype_name)
    prepared = bm.prepare_case(case, params)
    step = prepared.step
    if DEVICE.type == "cuda":
        def timed():  # the host returns before the kernels end: wait for them
            step()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = step
    benchmark.group = f"{set_label} {dtype_name}"
    benchmark.pedantic(timed, rounds=bench_rounds(), warmup_rounds=2, iterations=1)
    nbytes = case.accesses * pset.numel * params[0].element_size()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        bytes=nbytes, accesses_per_elem=case.accesses, numel=pset.numel, n_tensors=pset.n_tensors,
        bytes_per_s=nbytes / median, copy_bytes_per_s=copy_bps, fraction_of_copy=nbytes / median / copy_bps)
    assert all(bool(torch.isfinite(p).all()) for p in params)
