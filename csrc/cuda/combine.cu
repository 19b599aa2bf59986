// The interpolation step (Interpolatron and Anderson) and the gradient dot
// products (gram_row, and the Gram row of a combine with k > kDotGroup).
// Scalars (coefs, lr, count) are read on the device: a launch can be
// captured in a CUDA graph and replayed with new values.
#include "common.cuh"

namespace interp::cuda {
namespace {

// x = sum_j a_j x(age j) - lr * sum_j a_j g(age j) over one chunk per block.
// kDots: also the block partials of <g0, g(age j)>, j < k <= kDotGroup, computed
// from the values loaded for the update (no second pass).
template <typename T, bool kDots>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) combine_kernel(const CombineLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  const int k = p.k;
  // Ring row offsets by age and the coefficients, once per block.
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* off = reinterpret_cast<int64_t*>(smem);  // the same slot in both rings
  C* coef = reinterpret_cast<C*>(off + k);
  const int64_t count = *p.count;
  const int64_t slots = k - 1;  // both rings hold ages 1..k-1
  for (int j = threadIdx.x; j < k; j += kThreads) {
    coef[j] = static_cast<C>(p.coefs[j]);
    off[j] = j >= 1 ? ring_slot(count, j, slots) * p.row_elems : 0;
  }
  __syncthreads();

  const Work w = block_work(p.table);
  const C lr = static_cast<C>(*p.lr);
  const C sign = p.maximize ? C(-1) : C(1);
  const C wd = static_cast<C>(p.weight_decay);
  const bool has_wd = p.weight_decay != 0.0;
  // Slot count mod (k-1) holds the oldest entries: read below, then replaced.
  const int64_t woff = k > 1 ? ring_slot(count, 0, slots) * p.row_elems : 0;
  T* param = reinterpret_cast<T*>(w.a);
  const T* grad = reinterpret_cast<const T*>(w.b);
  T* xr = reinterpret_cast<T*>(p.x_ring) + w.col;
  T* gr = reinterpret_cast<T*>(p.g_ring) + w.col;
  const C a0 = coef[0];

  C dots[kDots ? kDotGroup : 1];
#pragma unroll
  for (int d = 0; d < (kDots ? kDotGroup : 1); ++d) dots[d] = C(0);

  for_each_frag<T>(w, [&](int64_t i, int n) {
    C x0[N], g0[N], ax[N], ag[N], h[N];
    load_frag<T, N>(param + i, n, w.vec, x0);
    load_frag<T, N>(grad + i, n, w.vec, g0);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      g0[e] = effective_grad(g0[e], x0[e], sign, wd, has_wd);
      ag[e] = a0 * g0[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) ax[e] = a0 * x0[e];
    if constexpr (kDots) {
#pragma unroll
      for (int e = 0; e < N; ++e) dots[0] += g0[e] * g0[e];
      // Unrolled to the register group so that dots[j] stays in registers.
#pragma unroll
      for (int j = 1; j < kDotGroup; ++j) {
        if (j < k) {
          const C aj = coef[j];
          load_frag<T, N>(xr + off[j] + i, n, w.vec, h);
#pragma unroll
          for (int e = 0; e < N; ++e) ax[e] += aj * h[e];
          load_frag<T, N>(gr + off[j] + i, n, w.vec, h);
#pragma unroll
          for (int e = 0; e < N; ++e) {
            ag[e] += aj * h[e];
            dots[j] += g0[e] * h[e];
          }
        }
      }
    } else {
      for (int j = 1; j < k; ++j) {
        const C aj = coef[j];
        load_frag<T, N>(xr + off[j] + i, n, w.vec, h);
#pragma unroll
        for (int e = 0; e < N; ++e) ax[e] += aj * h[e];
        load_frag<T, N>(gr + off[j] + i, n, w.vec, h);
#pragma unroll
        for (int e = 0; e < N; ++e) ag[e] += aj * h[e];
      }
    }
    if (k > 1) {
      store_frag<T, N>(xr + woff + i, n, w.vec, x0);
      store_frag<T, N>(gr + woff + i, n, w.vec, g0);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
    store_frag<T, N>(param + i, n, w.vec, ax);
  });

  if constexpr (kDots) block_partials<C, kDotGroup>(dots, k, p.partials + static_cast<int64_t>(blockIdx.x) * kDotGroup);
}

// Block partials of <g0, g(age d)> for the dots d of this block's group
// (blockIdx.y); g0 = sign * grad + weight_decay * param. The first group
// optionally stores g0 into slot count mod slots, which no group reads (the
// read-only form reads ages 1..ndots-1 = 1..slots).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) grad_dots_kernel(const GradDotsLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  __shared__ int64_t off[kDotGroup];
  const int d0 = static_cast<int>(blockIdx.y) * kDotGroup;
  const int64_t count = *p.count;
  if (threadIdx.x < kDotGroup) {
    const int d = d0 + static_cast<int>(threadIdx.x);
    off[threadIdx.x] = (d >= 1 && d < p.ndots) ? ring_slot(count, d, p.slots) * p.row_elems : 0;
  }
  __syncthreads();

  const Work w = block_work(p.table);
  const C sign = p.maximize ? C(-1) : C(1);
  const C wd = static_cast<C>(p.weight_decay);
  const bool has_wd = p.weight_decay != 0.0;
  const bool store = p.store && blockIdx.y == 0;
  const int64_t woff = p.store ? ring_slot(count, 0, p.slots) * p.row_elems : 0;  // read-only: slots may be 0
  const T* param = reinterpret_cast<const T*>(w.a);
  const T* grad = reinterpret_cast<const T*>(w.b);
  T* gr = reinterpret_cast<T*>(p.g_ring) + w.col;

  C dots[kDotGroup];
#pragma unroll
  for (int d = 0; d < kDotGroup; ++d) dots[d] = C(0);

  for_each_frag<T>(w, [&](int64_t i, int n) {
    C g0[N], x[N], h[N];
    load_frag<T, N>(grad + i, n, w.vec, g0);
    if (has_wd) {
      load_frag<T, N>(param + i, n, w.vec, x);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) x[e] = C(0);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) g0[e] = effective_grad(g0[e], x[e], sign, wd, has_wd);
    if (store) store_frag<T, N>(gr + woff + i, n, w.vec, g0);
#pragma unroll
    for (int dl = 0; dl < kDotGroup; ++dl) {
      const int d = d0 + dl;
      if (d < p.ndots) {
        if (d == 0) {
#pragma unroll
          for (int e = 0; e < N; ++e) dots[dl] += g0[e] * g0[e];
        } else {
          load_frag<T, N>(gr + off[dl] + i, n, w.vec, h);
#pragma unroll
          for (int e = 0; e < N; ++e) dots[dl] += g0[e] * h[e];
        }
      }
    }
  });

  const int nd = p.ndots - d0 < kDotGroup ? p.ndots - d0 : kDotGroup;
  block_partials<C, kDotGroup>(
      dots, nd, p.partials + (static_cast<int64_t>(blockIdx.y) * p.table.nblocks + blockIdx.x) * kDotGroup);
}

template <typename T>
cudaError_t combine_typed(const CombineLaunch& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.k) * (sizeof(int64_t) + sizeof(compute_t<T>));
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  if (p.partials) {
    combine_kernel<T, true><<<grid, kThreads, smem, stream>>>(p);
  } else {
    combine_kernel<T, false><<<grid, kThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_dots_typed(const GradDotsLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks), static_cast<unsigned>(dot_groups(p.ndots)));
  grad_dots_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine(const CombineLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return combine_typed<float>(p, stream);
    case DType::kFloat64: return combine_typed<double>(p, stream);
    case DType::kBFloat16: return combine_typed<bf16>(p, stream);
    case DType::kFloat16: return combine_typed<fp16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_dots(const GradDotsLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return grad_dots_typed<float>(p, stream);
    case DType::kFloat64: return grad_dots_typed<double>(p, stream);
    case DType::kBFloat16: return grad_dots_typed<bf16>(p, stream);
    case DType::kFloat16: return grad_dots_typed<fp16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace interp::cuda
