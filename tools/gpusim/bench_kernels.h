// The timing-model benchmarks of the harness (tools/gpusim/harness.cpp).
#pragma once

#include <cstdint>

namespace interp_bench {

// Runs one timed launch of `kernel` on n elements per stream; returns the exit
// status. Kernels: copy, adam, combine2_f32, combine2_bf16, gram2_f32,
// record_f32 (see bench_kernels.cu).
int run(const char* kernel, int64_t n);

}  // namespace interp_bench
