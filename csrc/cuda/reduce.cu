// Second stage of every dot product: the block partials of one dot summed in
// float64 in a fixed order (strided per thread, then a fixed tree), one block
// per dot. No atomics: the result is the same bits on every run.
#include "common.cuh"

namespace interp::cuda {
namespace {

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    reduce_kernel(const double* partials, int64_t nblocks, double* out, int64_t out_stride) {
  __shared__ double red[kThreads];
  const int d = static_cast<int>(blockIdx.x);
  // Partials of dot d: group d / kDotGroup, lane d % kDotGroup of every block.
  const double* base = partials + static_cast<int64_t>(d / kDotGroup) * nblocks * kDotGroup + d % kDotGroup;
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += kThreads) s += base[b * kDotGroup];
  red[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[d * out_stride] = red[0];
}

}  // namespace

cudaError_t launch_reduce(const double* partials, int64_t nblocks, int ndots, double* out, int64_t out_stride,
                          cudaStream_t stream) {
  if (ndots <= 0) return cudaSuccess;
  reduce_kernel<<<static_cast<unsigned>(ndots), kThreads, 0, stream>>>(partials, nblocks, out, out_stride);
  return cudaGetLastError();
}

}  // namespace interp::cuda
