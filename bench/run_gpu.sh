#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the C++/CUDA extension, run the GPU
# tests, then the step benchmark (fp32 and bf16; ResNet-50, GPT-2 124M and the
# 1,152-tensor set at full size) and the pytest-benchmark suite, writing into
# bench/results/. Usage, from anywhere:  bash bench/run_gpu.sh
#   PYTHON=python3.11 bash bench/run_gpu.sh   to choose the interpreter
#   SKIP_BUILD=1 bash bench/run_gpu.sh        to keep an extension already built
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=bench/results
mkdir -p "$OUT"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"

if [[ -z "${SKIP_BUILD:-}" ]]; then
    # --no-build-isolation: build against the installed (CUDA) torch;
    # INTERPOLATRON_FORCE_CUDA: fail loudly instead of silently building CPU kernels only.
    MAX_JOBS=${MAX_JOBS:-8} INTERPOLATRON_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation -e ".[test]"
fi
"$PY" -m interpolatron info | tee "$OUT/gpu-info.txt"

# The whole suite on the GPU machine: the `gpu` tests run, and the Triton op
# matrix is compiled natively instead of interpreted. A failure is recorded
# and the benchmark still runs (a GPU session is short).
tests_rc=0
INTERPOLATRON_TRITON_NATIVE=1 "$PY" -m pytest tests/ -q -ra 2>&1 | tee "$OUT/gpu-tests.txt" || tests_rc=$?

# The step benchmark: JSON + markdown + PNG named after the GPU and the versions.
"$PY" -m interpolatron bench --device cuda --dtype fp32 bf16 \
    --sets resnet50 gpt2 many-small --out "$OUT"

# The same cases through pytest-benchmark (its own statistics, saved as JSON).
INTERPOLATRON_BENCH_DEVICE=cuda INTERPOLATRON_BENCH_SETS="resnet50 gpt2 many-small" \
    "$PY" -m pytest bench/ --benchmark-only -q \
    --benchmark-json="$OUT/pytest-benchmark-cuda.json" | tail -n 5
echo "results in $OUT/"
if [[ $tests_rc -ne 0 ]]; then
    echo "THE TEST SUITE FAILED on this GPU machine (exit $tests_rc): see $OUT/gpu-tests.txt" >&2
    exit "$tests_rc"
fi
