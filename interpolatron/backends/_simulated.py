"""Which dtypes' native CUDA kernels passed the simulated-GPU matrix
(tests/gpusim, GPGPU-Sim built by tools/gpusim/build.sh at the simulator
commit and patch below): for these, ``backend="auto"`` on a CUDA device tries
the native kernels first; for any other dtype it tries Triton first. No GPU
has run the native kernels, so the simulation is the only evidence there is.

Update with the result of ``pytest -m gpusim tests/gpusim`` after a change to
csrc/cuda or to the simulator patch (tests/gpusim/test_verified.py checks
that the patch named here is the one in the repository).
"""

SIMULATOR_COMMIT = "667834cfe5214523edd7769aeab77f91b7137686"
PATCH_SHA256_16 = "e830e9ae25c051a9"  # sha256 of tools/gpusim/gpgpu-sim.patch, first 16 hex digits

# Every op (combine k = 1..10 with and without the Gram row, gram_row, RNA
# record / extrapolate) and path of the matrix passed for these dtypes.
# (2026-12-07: 96 cases, all passed; fp64 on a smaller matrix: combine k = 1,
# 2, 5, gram_row, record, extrapolate. Then with master weights, branch
# master-kernels: 113 cases, all passed, the 17 new ones bf16/fp16 parameters
# with float32 masters and rings, to nearest and stochastic, combine k = 1, 2,
# 3, 4, 6, 9 and read-only gram_row.)
NATIVE_CUDA_VERIFIED: frozenset[str] = frozenset({"float32", "bfloat16", "float16", "float64"})
