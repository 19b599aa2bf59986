// Device helpers shared by the .cu files: GradScaler's skip and sign, what a
// block works on, 16-byte fragments held raw in a uint4 (one LDG.E.128 /
// STG.E.128 each on the vector path, element accesses on the tail path), and
// the deterministic block reduction of float64 dot-product partials.
#pragma once

#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

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

// GradScaler's fused contract: a step with found_inf set writes nothing (the
// flag is uniform across the block, so the whole block returns; partials are
// left unwritten and the caller discards the Gram of a skipped step).
__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The sign of the effective gradient times 1 / grad_scale: one factor, exact
// for GradScaler's power-of-two scales.
template <typename C>
__device__ __forceinline__ C grad_sign(bool maximize, const float* grad_scale) {
  const double s = maximize ? -1.0 : 1.0;
  return static_cast<C>(grad_scale != nullptr ? s / static_cast<double>(*grad_scale) : s);
}

// The chunk this block owns: pointers already at its first element.
struct Work {
  char* a;
  const char* b;
  int64_t len;
  int64_t col;
};

__device__ __forceinline__ Work block_work(const Table& t) {
  // Two independent 16-byte loads of the block's record.
  const longlong2* e = reinterpret_cast<const longlong2*>(t.blocks + static_cast<int64_t>(blockIdx.x) * kFields);
  const longlong2 ab = e[0];
  const longlong2 lc = e[1];
  return {reinterpret_cast<char*>(ab.x), reinterpret_cast<const char*>(ab.y), lc.x, lc.y};
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A 16-byte fragment at p: one 128-bit load when VEC (p aligned, n == N),
// else n <= N element loads with zeros for the missing ones (they add nothing
// to a dot product and are never stored).
template <typename T, bool VEC>
__device__ __forceinline__ uint4 ld_frag(const T* p, int n) {
  if constexpr (VEC) {
    // Explicitly global: pointers read from the tables and launch structs are
    // generic to nvcc, which would emit LD.E.128 (a generic access) for them.
    uint4 r;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
  } else {
    constexpr int N = Frag<T>::N;
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        pk.v[i] = p[i];
      } else {
        std::memset(&pk.v[i], 0, sizeof(T));
      }
    }
    uint4 u;
    std::memcpy(&u, &pk, sizeof(u));
    return u;
  }
}

// Stores the first n elements of a raw fragment: one 128-bit store when VEC.
template <typename T, bool VEC>
__device__ __forceinline__ void st_frag(T* p, int n, const uint4& u) {
  if constexpr (VEC) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
                 : "memory");
  } else {
    constexpr int N = Frag<T>::N;
    Pack<T, N> pk;
    std::memcpy(&pk, &u, sizeof(u));
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) p[i] = pk.v[i];
    }
  }
}

// Master weights: a fragment of the float32 rings and master is 4 elements,
// and the 16-bit parameter and gradient of those elements are 8 bytes, one
// 64-bit access on the vector path (the elements of each thread are the
// float32 kernel's, so its dot products sum in the same order, bit for bit).
constexpr int kHalfN = 4;

template <typename P, bool VEC>
__device__ __forceinline__ uint2 ld_half(const P* p, int n) {
  if constexpr (VEC) {
    uint2 r;
    asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
  } else {
    Pack<P, kHalfN> pk;
#pragma unroll
    for (int i = 0; i < kHalfN; ++i) {
      if (i < n) {
        pk.v[i] = p[i];
      } else {
        std::memset(&pk.v[i], 0, sizeof(P));
      }
    }
    uint2 u;
    std::memcpy(&u, &pk, sizeof(u));
    return u;
  }
}

template <typename P, bool VEC>
__device__ __forceinline__ void st_half(P* p, int n, const uint2& u) {
  if constexpr (VEC) {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(u.x), "r"(u.y) : "memory");
  } else {
    Pack<P, kHalfN> pk;
    std::memcpy(&pk, &u, sizeof(u));
#pragma unroll
    for (int i = 0; i < kHalfN; ++i) {
      if (i < n) p[i] = pk.v[i];
    }
  }
}

template <typename P>
__device__ __forceinline__ void unpack_half(const uint2& u, float (&out)[kHalfN]) {
  Pack<P, kHalfN> pk;
  std::memcpy(&pk, &u, sizeof(u));
#pragma unroll
  for (int i = 0; i < kHalfN; ++i) out[i] = load_c(&pk.v[i]);
}

// The new masters rounded into the 16-bit parameter: to nearest even, or
// stochastically (SR, key of the parameter stream, element e at column col + e).
template <typename P, bool SR>
__device__ __forceinline__ uint2 pack_half(const float (&v)[kHalfN], uint32_t key, int64_t col) {
  Pack<P, kHalfN> pk;
  const uint32_t c0 = static_cast<uint32_t>(static_cast<uint64_t>(col));
#pragma unroll
  for (int e = 0; e < kHalfN; ++e) {
    if constexpr (SR) {
      sr_store(&pk.v[e], v[e], sr_random(lowbias32(c0 + static_cast<uint32_t>(e)), key));
    } else {
      store_c(&pk.v[e], v[e]);
    }
  }
  uint2 u;
  std::memcpy(&u, &pk, sizeof(u));
  return u;
}

__device__ __forceinline__ bool aligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7u) == 0; }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, compute_t<T> (&out)[Frag<T>::N]) {
  constexpr int N = Frag<T>::N;
  Pack<T, N> pk;
  std::memcpy(&pk, &u, sizeof(u));
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = load_c(&pk.v[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const compute_t<T> (&v)[Frag<T>::N]) {
  constexpr int N = Frag<T>::N;
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) store_c(&pk.v[i], v[i]);
  uint4 u;
  std::memcpy(&u, &pk, sizeof(u));
  return u;
}

// The stochastically rounded packs of one fragment of 16-bit T
// (stochastic_rounding.h): a with key_a and, when TWO, b with key_b, element e
// having ring column col + e. The column hash is shared by both streams.
template <typename T, bool TWO>
__device__ __forceinline__ void pack_sr(const float (&a)[Frag<T>::N], uint32_t key_a, const float (&b)[Frag<T>::N],
                                        uint32_t key_b, int64_t col, uint4& ua, uint4& ub) {
  constexpr int N = Frag<T>::N;
  const uint32_t c0 = static_cast<uint32_t>(static_cast<uint64_t>(col));
  Pack<T, N> pa, pb;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const uint32_t h = lowbias32(c0 + static_cast<uint32_t>(e));
    sr_store(&pa.v[e], a[e], sr_random(h, key_a));
    if constexpr (TWO) sr_store(&pb.v[e], b[e], sr_random(h, key_b));
  }
  std::memcpy(&ua, &pa, sizeof(ua));
  if constexpr (TWO) std::memcpy(&ub, &pb, sizeof(ub));
}

// acc += a * b per element in float64 (D3: the product of two fp32 values is
// exact in float64, so a dot depends on the summation order only at float64
// rounding).
template <int N, typename C>
__device__ __forceinline__ void dot_acc(double& acc, const C (&a)[N], const C (&b)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) acc = fma(static_cast<double>(a[e]), static_cast<double>(b[e]), acc);
}

// The element loop of a block over its chunk (kChunkFrags fragments per
// thread at most): thread t takes fragments t, t + kThreads, ..., U of them
// at a time, and issues every load of those U fragments (load(v, i, n) ->
// the raw fragments) before it finishes the first one (finish(v, i, n, raw):
// the math and the stores), so U times the fragments of one step are in
// flight per thread. The fragments are finished in the same order whatever U
// is (t, t + kThreads, ...): a thread's dot partial does not depend on U.
// The vector path (every pointer of the block 16-byte aligned, length a
// multiple of N) is chosen once per block, so its body has no per-fragment
// branch beyond the one that skips a fragment past the block's end.
template <typename T, int U, typename Load, typename Finish>
__device__ __forceinline__ void for_each_frag(int64_t len, bool vec, Load&& load, Finish&& finish) {
  constexpr int N = Frag<T>::N;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * N;  // elements between a thread's fragments
  auto walk = [&](auto v) {
    constexpr bool V = decltype(v)::value;
    for (int64_t i0 = static_cast<int64_t>(threadIdx.x) * N; i0 < len; i0 += U * kStep) {
      using Raw = decltype(load(v, i0, N));
      Raw raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + u * kStep;
        const int64_t left = len - i;
        if (u == 0 || left > 0) raw[u] = load(v, i, V || left >= N ? N : static_cast<int>(left));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + u * kStep;
        const int64_t left = len - i;
        if (u == 0 || left > 0) finish(v, i, V || left >= N ? N : static_cast<int>(left), raw[u]);
      }
    }
  };
  if (vec) {
    walk(std::integral_constant<bool, true>{});
  } else {
    walk(std::integral_constant<bool, false>{});
  }
}

// One fragment at a time: body(v, i, n) loads, computes and stores fragment i.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_frag(int64_t len, bool vec, Body&& body) {
  for_each_frag<T, 1>(
      len, vec, [](auto, int64_t, int) { return 0; },
      [&](auto v, int64_t i, int n, int) { body(v, i, n); });
}

// Block sums of dots[0..nd) (float64), dot d written to
// partials[((d0 + d) / kDotGroup * nblocks + blockIdx.x) * kDotGroup + (d0 + d) % kDotGroup],
// the layout launch_reduce reads. A fixed butterfly within each warp, then the
// warps in order: the same bits on every run. Ends with a barrier so that the
// caller may reduce again.
template <int ND>
__device__ __forceinline__ void block_partials(const double (&acc)[ND], int nd, int d0, int64_t nblocks,
                                               double* partials) {
  __shared__ double red[kThreads / 32][ND];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    double v = acc[d];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp][d] = v;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < nd) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][threadIdx.x];
    const int d = d0 + static_cast<int>(threadIdx.x);
    partials[(static_cast<int64_t>(d / kDotGroup) * nblocks + blockIdx.x) * kDotGroup + d % kDotGroup] = s;
  }
  __syncthreads();
}

}  // namespace interp::cuda
