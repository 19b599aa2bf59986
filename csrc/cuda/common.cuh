// Device helpers shared by the .cu files: what a block works on, 16-byte
// vector fragments with a scalar fallback, and the deterministic block
// reduction of dot-product partials.
#pragma once

#include <cuda_runtime.h>

#include "kernels.h"

namespace interp::cuda {

template <typename T>
struct Frag {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access
};

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// The chunk of one tensor this block owns.
struct Work {
  char* a;
  const char* b;
  int64_t col;
  int64_t begin;
  int64_t end;
  bool vec;
};

__device__ __forceinline__ Work block_work(const Table& t) {
  const int64_t blk = blockIdx.x;
  const int64_t* e = t.tensors + t.block_of[blk] * kFields;
  Work w;
  w.a = reinterpret_cast<char*>(e[kA]);
  w.b = reinterpret_cast<const char*>(e[kB]);
  w.col = e[kCol];
  w.begin = (blk - e[kFirstBlock]) * kChunk;
  const int64_t numel = e[kNumel];
  w.end = w.begin + kChunk < numel ? w.begin + kChunk : numel;
  w.vec = (e[kFlags] & kFlagVector) != 0;
  return w;
}

// Loads n <= N elements at p as compute values (missing ones are zero, so they
// add nothing to a dot product). One 16-byte access when the tensor is
// aligned and the fragment is full; element accesses otherwise (the tail of a
// tensor, or a tensor whose pointers are not 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void load_frag(const T* p, int n, bool vec, compute_t<T> (&out)[N]) {
  if (vec && n == N) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = load_c(&pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < n ? load_c(p + i) : compute_t<T>(0);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_frag(T* p, int n, bool vec, const compute_t<T> (&v)[N]) {
  if (vec && n == N) {
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) store_c(&pk.v[i], v[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) store_c(p + i, v[i]);
    }
  }
}

// Bit-exact copy (a snapshot must be the recorded value, NaN payloads included).
template <typename T, int N>
__device__ __forceinline__ void copy_frag(T* dst, const T* src, int n, bool vec) {
  if (vec && n == N) {
    *reinterpret_cast<Pack<T, N>*>(dst) = *reinterpret_cast<const Pack<T, N>*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) dst[i] = src[i];
    }
  }
}

// The element loop of a block: fn(i, n) for the fragments [i, i + n) of
// this block's chunk, each thread taking every kThreads-th fragment.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_frag(const Work& w, Fn&& fn) {
  constexpr int N = Frag<T>::N;
  for (int64_t i = w.begin + static_cast<int64_t>(threadIdx.x) * N; i < w.end;
       i += static_cast<int64_t>(kThreads) * N) {
    const int64_t left = w.end - i;
    fn(i, left < N ? static_cast<int>(left) : N);
  }
}

// Block sum of each of the first `nd` accumulators, written as float64 to
// out[0..nd). A fixed butterfly within each warp, then the warps in order:
// the same bits on every run.
template <typename C, int ND>
__device__ __forceinline__ void block_partials(const C (&acc)[ND], int nd, double* out) {
  __shared__ C red[kThreads / 32][ND];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    C v = acc[d];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp][d] = v;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < nd) {
    C s = C(0);
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][threadIdx.x];
    out[threadIdx.x] = static_cast<double>(s);
  }
}

}  // namespace interp::cuda
