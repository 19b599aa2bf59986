// RNA: recording a snapshot into the window (optionally with the residual dot
// products <r_0, r_j>, r_j = y(age j) - y(age j + 1), differences taken
// elementwise before the product) and the extrapolation sum_a c_a y(age a).
// Every fragment issues the loads of its dot group (or of four snapshots in
// extrapolate) before the math.
#include "../dispatch.h"
#include "common.cuh"

namespace interp::cuda {
namespace {

constexpr int kExtrapGroup = 4;  // snapshots loaded at once by extrapolate

// Copies the sources into slot count mod slots and writes the block partials
// of the dots. NDOTS > 0: that many dots (<= 4); NDOTS == 0: any number, in
// groups of kDotGroup, the block walking its chunk once per group (the source
// re-reads hit L2). No dot reads slot count mod slots, so the copy (in the
// first walk) races with nothing. 2 blocks per SM: the group's G + 2
// fragments in flight need more than 64 registers (record is not per step).
template <typename T, int NDOTS>
__global__ void __launch_bounds__(kThreads, 2) record_kernel(const RecordLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  constexpr int G = NDOTS > 0 ? NDOTS : kDotGroup;
  const Work w = block_work(p.table);
  const int64_t count = *p.count;
  const T* src = reinterpret_cast<const T*>(w.a);
  T* win = reinterpret_cast<T*>(p.window) + w.col;
  const int64_t woff = ring_slot(count, 0, p.slots) * p.row_elems;
  const int ndots = NDOTS > 0 ? NDOTS : p.ndots();
  const bool base_vec = aligned16(src) && aligned16(win + woff) && w.len % N == 0;

  // Up to 2 dots (3 fragments a step) a thread issues the loads of its whole
  // chunk at once; beyond, one step at a time.
  constexpr int U = NDOTS > 0 && NDOTS <= 2 ? kChunkFrags<sizeof(T)> : 1;
  if (ndots == 0) {  // copy only
    for_each_frag<T, kChunkFrags<sizeof(T)>>(
        w.len, base_vec,
        [&](auto v, int64_t i, int n) { return ld_frag<T, decltype(v)::value>(src + i, n); },
        [&](auto v, int64_t i, int n, const uint4& r) { st_frag<T, decltype(v)::value>(win + woff + i, n, r); });
    return;
  }
  const int64_t off1 = ring_slot(count, 1, p.slots) * p.row_elems;
  for (int d0 = 0; d0 < ndots; d0 += G) {
    const int nd = ndots - d0 < G ? ndots - d0 : G;
    // Rows of ages d0 .. d0 + G (age 0 is the source: row offset unused);
    // ages past the group's end repeat its last valid row (L1 hits, unused).
    int64_t off[G + 1];
    bool vec = base_vec && aligned16(win + off1);
#pragma unroll
    for (int a = 0; a <= G; ++a) {
      const int age = d0 + (a <= nd ? a : nd);
      off[a] = age >= 1 ? ring_slot(count, age, p.slots) * p.row_elems : off1;
      vec = vec && aligned16(win + off[a]);
    }
    double dots[G];
#pragma unroll
    for (int d = 0; d < G; ++d) dots[d] = 0.0;
    const bool copy = d0 == 0;

    // Raw fragments of one step: the snapshots of ages d0 .. d0 + G, the
    // source (age 0) and age 1 always (r_0 needs both).
    struct Raw {
      uint4 y0, y1, s[G + 1];
    };
    auto load = [&](auto v, int64_t i, int n) {
      constexpr bool V = decltype(v)::value;
      Raw r;
      r.y0 = ld_frag<T, V>(src + i, n);
      r.y1 = ld_frag<T, V>(win + off1 + i, n);
#pragma unroll
      for (int a = 0; a <= G; ++a) {
        const int age = d0 + a;
        r.s[a] = age == 0 ? r.y0 : age == 1 ? r.y1 : ld_frag<T, V>(win + off[a] + i, n);
      }
      return r;
    };
    auto finish = [&](auto v, int64_t i, int n, const Raw& r) {
      constexpr bool V = decltype(v)::value;
      if (copy) st_frag<T, V>(win + woff + i, n, r.y0);
      C r0[N], prev[N], next[N];
      unpack<T>(r.y0, r0);
      unpack<T>(r.y1, next);
#pragma unroll
      for (int e = 0; e < N; ++e) r0[e] -= next[e];
      unpack<T>(r.s[0], prev);
#pragma unroll
      for (int dl = 0; dl < G; ++dl) {
        unpack<T>(r.s[dl + 1], next);
        if (dl < nd) {
#pragma unroll
          for (int e = 0; e < N; ++e) {
            prev[e] -= next[e];
            dots[dl] = fma(static_cast<double>(r0[e]), static_cast<double>(prev[e]), dots[dl]);
          }
        }
#pragma unroll
        for (int e = 0; e < N; ++e) prev[e] = next[e];
      }
    };
    for_each_frag<T, U>(w.len, vec, load, finish);
    block_partials<G>(dots, nd, d0, p.table.nblocks, p.partials);
  }
}

// out = sum_a coefs[a] * y(age a), y(age a) in slot (count - 1 - a) mod slots,
// kExtrapGroup snapshots loaded at once.
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
  bool vec = aligned16(out) && w.len % N == 0;
  for (int a = 0; a < p.m; ++a) vec = vec && aligned16(win + off[a]);
  const int m = p.m;
  for_each_frag<T>(w.len, vec, [&](auto v, int64_t i, int n) {
    constexpr bool V = decltype(v)::value;
    C acc[N], y[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = C(0);
    for (int a0 = 0; a0 < m; a0 += kExtrapGroup) {
      uint4 ry[kExtrapGroup];
#pragma unroll
      for (int q = 0; q < kExtrapGroup; ++q) {
        const int a = a0 + q < m ? a0 + q : m - 1;
        ry[q] = ld_frag<T, V>(win + off[a] + i, n);
      }
#pragma unroll
      for (int q = 0; q < kExtrapGroup; ++q) {
        if (a0 + q < m) {
          const C ca = coef[a0 + q];
          unpack<T>(ry[q], y);
          if (a0 + q == 0) {
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] = ca * y[e];
          } else {
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += ca * y[e];
          }
        }
      }
    }
    st_frag<T, V>(out + i, n, pack<T>(acc));
  });
}

template <typename T>
cudaError_t record_typed(const RecordLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  switch (p.ndots()) {
    case 1: record_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: record_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: record_kernel<T, 3><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: record_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: record_kernel<T, 0><<<grid, kThreads, 0, stream>>>(p); break;  // 0 (copy only) or > 4
  }
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
  return INTERP_DISPATCH_DTYPE(p.dtype, T, cudaErrorInvalidValue, [&] { return record_typed<T>(p, stream); });
}

cudaError_t launch_rna_extrapolate(const ExtrapLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  return INTERP_DISPATCH_DTYPE(p.dtype, T, cudaErrorInvalidValue, [&] { return extrapolate_typed<T>(p, stream); });
}

}  // namespace interp::cuda
