// gram_row: the dot products of the new effective gradient with the ring,
// <g0, g(age j)>, as block partials (reduce.cu sums them). Also the dot pass
// of a combine whose Gram row is longer than one register group (k >
// kDotGroup), run read-only before the update overwrites what it reads.
#include "../dispatch.h"
#include "common.cuh"

namespace interp::cuda {
namespace {

// Block partials of <g0, g(age d)>, d = 0..ndots-1, g0 = sign * grad +
// weight_decay * param; with `store` also g0 into slot count mod slots, which
// no dot reads (the read-only form reads ages 1..ndots-1 = 1..slots).
// NDOTS > 0: ndots fixed (1..4), every load of a fragment issued
// before the math. NDOTS == 0: any ndots, in groups of kDotGroup; the block
// walks its chunk once per group (the later walks hit L2). P != T: master
// weights (T float, P the 16-bit gradient read 8 bytes per 4 elements, the
// weight decay on p.master; read-only), each thread on the float32 kernel's
// elements, so the partials are that kernel's bits.
template <typename T, int NDOTS, typename P = T>
__device__ __forceinline__ void gram_row_body(const GramRowLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  constexpr bool M = !std::is_same_v<T, P>;
  static_assert(!M || (std::is_same_v<T, float> && N == kHalfN), "master weights: float32 rings, 16-bit grads");
  constexpr int G = NDOTS > 0 ? NDOTS : kDotGroup;  // dots per walk
  if (skip_step(p.found_inf)) return;
  const Work w = block_work(p.table);
  const int64_t count = *p.count;
  const C sign = grad_sign<C>(p.maximize, p.grad_scale);
  const C wd = static_cast<C>(p.weight_decay);
  const bool has_wd = p.weight_decay != 0.0;
  const int64_t woff = p.store ? ring_slot(count, 0, p.slots) * p.row_elems : 0;  // read-only: slots may be 0
  // The weight decay's operand: the param, or its master.
  const T* param = M ? reinterpret_cast<const T*>(p.master) + w.col : reinterpret_cast<const T*>(w.a);
  const P* grad = reinterpret_cast<const P*>(w.b);
  T* gr = reinterpret_cast<T*>(p.g_ring) + w.col;
  const int ndots = NDOTS > 0 ? NDOTS : p.ndots();
  const bool base_vec = (M ? aligned8(grad) : aligned16(grad)) && (!has_wd || aligned16(param)) &&
                        aligned16(gr + woff) && w.len % N == 0;

  for (int d0 = 0; d0 < ndots; d0 += G) {
    const int nd = ndots - d0 < G ? ndots - d0 : G;
    // Row of each dot of the group; dot 0 (<g0, g0>) and the dots past the end
    // read the group's first ring row again (an L1 hit, never used).
    int64_t off[G];
    const int first_ring = d0 == 0 ? 1 : d0;
    const int64_t off_first = first_ring < ndots ? ring_slot(count, first_ring, p.slots) * p.row_elems : 0;
    bool vec = base_vec && aligned16(gr + off_first);
#pragma unroll
    for (int dl = 0; dl < G; ++dl) {
      const int d = d0 + dl;
      off[dl] = (d >= 1 && dl < nd) ? ring_slot(count, d, p.slots) * p.row_elems : off_first;
      vec = vec && aligned16(gr + off[dl]);
    }
    const bool store = p.store && d0 == 0;
    double dots[G];
#pragma unroll
    for (int d = 0; d < G; ++d) dots[d] = 0.0;

    // Raw fragments of one step: the gradient, the param (weight decay) and
    // the group's ring rows.
    struct Raw {
      uint4 g, x, h[G];
      uint2 gh;  // a 16-bit gradient (master weights)
    };
    auto load = [&](auto v, int64_t i, int n) {
      constexpr bool V = decltype(v)::value;
      Raw r;
      if constexpr (M) {
        r.gh = ld_half<P, V>(grad + i, n);
      } else {
        r.g = ld_frag<T, V>(grad + i, n);
      }
      r.x = has_wd ? ld_frag<T, V>(param + i, n) : make_uint4(0, 0, 0, 0);
      const bool loads = ndots > 1;  // k = 1: no ring row at all
#pragma unroll
      for (int dl = 0; dl < G; ++dl) {
        r.h[dl] = (loads && d0 + dl != 0) ? ld_frag<T, V>(gr + off[dl] + i, n) : make_uint4(0, 0, 0, 0);
      }
      return r;
    };
    auto finish = [&](auto v, int64_t i, int n, const Raw& r) {
      constexpr bool V = decltype(v)::value;
      C g0[N], x[N], h[N];
      if constexpr (M) {
        unpack_half<P>(r.gh, g0);
      } else {
        unpack<T>(r.g, g0);
      }
      unpack<T>(r.x, x);
#pragma unroll
      for (int e = 0; e < N; ++e) g0[e] = effective_grad(g0[e], x[e], sign, wd, has_wd);
      if (store) st_frag<T, V>(gr + woff + i, n, pack<T>(g0));
#pragma unroll
      for (int dl = 0; dl < G; ++dl) {
        if (dl < nd) {
          if (d0 + dl == 0) {
            dot_acc<N>(dots[dl], g0, g0);
          } else {
            unpack<T>(r.h[dl], h);
            dot_acc<N>(dots[dl], g0, h);
          }
        }
      }
    };
    // Up to 2 dots (3 fragments a step) a thread issues the loads of its whole
    // chunk at once; beyond, one step at a time.
    for_each_frag<T, (NDOTS > 0 && NDOTS <= 2 ? kChunkFrags<sizeof(T)> : 1)>(w.len, vec, load, finish);
    block_partials<G>(dots, nd, d0, p.table.nblocks, p.partials);
  }
}

template <typename T, int NDOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(T), NDOTS>()) gram_row_kernel(const GramRowLaunch p) {
  gram_row_body<T, NDOTS>(p);
}

// Master weights: 16-bit gradients P, float32 ring and masters.
template <typename P, int NDOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(float), NDOTS>()) gram_row_master_kernel(
    const GramRowLaunch p) {
  gram_row_body<float, NDOTS, P>(p);
}

template <typename T>
cudaError_t gram_row_typed(const GramRowLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  switch (p.ndots()) {
    case 1: gram_row_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: gram_row_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: gram_row_kernel<T, 3><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: gram_row_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: gram_row_kernel<T, 0><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

// Master weights (read-only): 16-bit gradients P, float32 ring, the weight
// decay on the masters.
template <typename P>
cudaError_t gram_row_master(const GramRowLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  switch (p.ndots()) {
    case 1: gram_row_master_kernel<P, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: gram_row_master_kernel<P, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: gram_row_master_kernel<P, 3><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: gram_row_master_kernel<P, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: gram_row_master_kernel<P, 0><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gram_row(const GramRowLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  if (p.master != nullptr) {
    if (p.dtype != DType::kFloat32 || p.store) return cudaErrorInvalidValue;
    if (p.param_dtype == DType::kBFloat16) return gram_row_master<bf16>(p, stream);
    if (p.param_dtype == DType::kFloat16) return gram_row_master<fp16>(p, stream);
    return cudaErrorInvalidValue;
  }
  return INTERP_DISPATCH_DTYPE(p.dtype, T, cudaErrorInvalidValue, [&] { return gram_row_typed<T>(p, stream); });
}

}  // namespace interp::cuda
