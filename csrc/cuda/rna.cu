// RNA: recording a snapshot into the window (optionally with the residual dot
// products <r_0, r_j>, r_j = y(age j) - y(age j + 1), differences taken
// elementwise before the product) and the extrapolation sum_a c_a y(age a).
#include "common.cuh"

namespace interp::cuda {
namespace {

// Copies the sources into slot count mod slots (the first dot group only) and
// writes the block partials of the dots of this block's group (blockIdx.y).
// No group reads slot count mod slots, so the copy races with nothing.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) record_kernel(const RecordLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  // Row offsets of the snapshots of ages d0 .. d0 + kDotGroup (age 0 is the source).
  __shared__ int64_t off[kDotGroup + 1];
  const int d0 = static_cast<int>(blockIdx.y) * kDotGroup;
  const int64_t count = *p.count;
  if (threadIdx.x <= kDotGroup) {
    const int a = d0 + static_cast<int>(threadIdx.x);
    off[threadIdx.x] = (a >= 1 && a < p.slots) ? ring_slot(count, a, p.slots) * p.row_elems : 0;
  }
  __syncthreads();

  const Work w = block_work(p.table);
  const T* src = reinterpret_cast<const T*>(w.a);
  T* win = reinterpret_cast<T*>(p.window) + w.col;
  const bool copy = blockIdx.y == 0;
  const int64_t woff = ring_slot(count, 0, p.slots) * p.row_elems;
  const int64_t off1 = p.slots > 1 ? ring_slot(count, 1, p.slots) * p.row_elems : 0;

  C dots[kDotGroup];
#pragma unroll
  for (int d = 0; d < kDotGroup; ++d) dots[d] = C(0);

  for_each_frag<T>(w, [&](int64_t i, int n) {
    if (copy) copy_frag<T, N>(win + woff + i, src + i, n, w.vec);
    if (p.ndots > 0) {
      C y0[N], r0[N], prev[N], next[N];
      load_frag<T, N>(src + i, n, w.vec, y0);
      load_frag<T, N>(win + off1 + i, n, w.vec, next);
#pragma unroll
      for (int e = 0; e < N; ++e) r0[e] = y0[e] - next[e];
      if (d0 == 0) {
#pragma unroll
        for (int e = 0; e < N; ++e) prev[e] = y0[e];
      } else {
        load_frag<T, N>(win + off[0] + i, n, w.vec, prev);
      }
#pragma unroll
      for (int dl = 0; dl < kDotGroup; ++dl) {
        if (d0 + dl < p.ndots) {
          load_frag<T, N>(win + off[dl + 1] + i, n, w.vec, next);
#pragma unroll
          for (int e = 0; e < N; ++e) {
            dots[dl] += r0[e] * (prev[e] - next[e]);
            prev[e] = next[e];
          }
        }
      }
    }
  });

  if (p.ndots > 0) {
    const int nd = p.ndots - d0 < kDotGroup ? p.ndots - d0 : kDotGroup;
    block_partials<C, kDotGroup>(
        dots, nd, p.partials + (static_cast<int64_t>(blockIdx.y) * p.table.nblocks + blockIdx.x) * kDotGroup);
  }
}

// out = sum_a coefs[a] * y(age a), y(age a) in slot (count - 1 - a) mod slots.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) extrapolate_kernel(const ExtrapLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* off = reinterpret_cast<int64_t*>(smem);
  C* coef = reinterpret_cast<C*>(off + p.m);
  const int64_t count = *p.count;
  for (int a = threadIdx.x; a < p.m; a += kThreads) {
    off[a] = ring_slot(count - 1, a, p.slots) * p.row_elems;
    coef[a] = static_cast<C>(p.coefs[a]);
  }
  __syncthreads();

  const Work w = block_work(p.table);
  T* out = reinterpret_cast<T*>(w.a);
  const T* win = reinterpret_cast<const T*>(p.window) + w.col;
  for_each_frag<T>(w, [&](int64_t i, int n) {
    C acc[N], y[N];
    load_frag<T, N>(win + off[0] + i, n, w.vec, acc);
    const C c0 = coef[0];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] *= c0;
    for (int a = 1; a < p.m; ++a) {
      const C ca = coef[a];
      load_frag<T, N>(win + off[a] + i, n, w.vec, y);
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += ca * y[e];
    }
    store_frag<T, N>(out + i, n, w.vec, acc);
  });
}

template <typename T>
cudaError_t record_typed(const RecordLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks), static_cast<unsigned>(dot_groups(p.ndots)));
  record_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t extrapolate_typed(const ExtrapLaunch& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.m) * (sizeof(int64_t) + sizeof(compute_t<T>));
  extrapolate_kernel<T><<<static_cast<unsigned>(p.table.nblocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rna_record(const RecordLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return record_typed<float>(p, stream);
    case DType::kFloat64: return record_typed<double>(p, stream);
    case DType::kBFloat16: return record_typed<bf16>(p, stream);
    case DType::kFloat16: return record_typed<fp16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_rna_extrapolate(const ExtrapLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return extrapolate_typed<float>(p, stream);
    case DType::kFloat64: return extrapolate_typed<double>(p, stream);
    case DType::kBFloat16: return extrapolate_typed<bf16>(p, stream);
    case DType::kFloat16: return extrapolate_typed<fp16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace interp::cuda
