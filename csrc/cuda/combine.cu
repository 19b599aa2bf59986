// The interpolation step (Interpolatron and Anderson), with the Gram row of
// the new gradient when it fits one register group (k <= kDotGroup; a longer
// row is a gram_row pass first, gram_row.cu). Scalars (coefs, lr, count) are
// read on the device: a launch can be captured in a CUDA graph and replayed
// with new values.
//
// Every fragment issues all of its loads (param, grad, the 2(k-1) ring rows)
// before any math, held raw in uint4 registers; k is a template parameter for
// k <= 4 (the common Interpolatron / Anderson sizes) with a run-time k kernel
// for the rest.
#include "../dispatch.h"
#include "common.cuh"

namespace interp::cuda {
namespace {

constexpr int kMaxStaticK = 4;

// The stochastic rounding keys of this launch, from the count read on the
// device: {parameter, gradient}.
__device__ __forceinline__ uint2 sr_keys(const CombineLaunch& p, int64_t count) {
  return make_uint2(sr_key(p.salt_param, count), sr_key(p.salt_grad, count));
}

// The stochastically rounded stores of one fragment (16-bit T): the new param
// x and, with STORE_G, the gradient slot g, element e having ring column col + e.
template <typename T, bool V, bool STORE_G>
__device__ __forceinline__ void store_sr(T* pp, T* gp, int n, const float (&x)[Frag<T>::N],
                                         const float (&g)[Frag<T>::N], uint2 keys, int64_t col) {
  uint4 ux, ug;
  pack_sr<T, STORE_G>(x, keys.x, g, keys.y, col, ux, ug);
  if constexpr (STORE_G) st_frag<T, V>(gp, n, ug);
  st_frag<T, V>(pp, n, ux);
}

// x = sum_j a_j x(age j) - lr * sum_j a_j g(age j) over one chunk per block,
// k = K fixed at compile time. DOTS: also the block partials of
// <g0, g(age j)>, j < K, from the values loaded for the update (no second pass).
// SR (16-bit T): the new param and the gradient slot rounded stochastically
// (the dots use the unrounded gradient). The kernels below instantiate it.
// P != T: master weights (T float: rings and p.master; P the 16-bit param and
// gradient, 8-byte accesses of the same 4 elements): age 0 of the iterate is
// the master, the new iterate goes to the master and, rounded (SR: stochastically),
// to the param, which is never read; the float32 g ring is not rounded. Each
// element meets the float32 kernel's operations in its order, and each thread
// the float32 kernel's elements: master, rings and dots are that kernel's bits.
template <typename T, int K, bool DOTS, bool SR, typename P = T>
__device__ __forceinline__ void combine_body(const CombineLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  constexpr bool M = !std::is_same_v<T, P>;
  static_assert(!M || (std::is_same_v<T, float> && N == kHalfN), "master weights: float32 rings, 16-bit params");
  constexpr int R = K > 1 ? K - 1 : 1;  // ring rows read (both rings hold ages 1..K-1)
  if (skip_step(p.found_inf)) return;
  const Work w = block_work(p.table);
  const int64_t count = *p.count;
  const uint2 keys = SR ? sr_keys(p, count) : make_uint2(0, 0);
  C coef[K];
#pragma unroll
  for (int j = 0; j < K; ++j) coef[j] = static_cast<C>(p.coefs[j]);
  const C lr = static_cast<C>(*p.lr);
  const C sign = grad_sign<C>(p.maximize, p.grad_scale);
  const C wd = static_cast<C>(p.weight_decay);
  const bool has_wd = p.weight_decay != 0.0;

  P* param = reinterpret_cast<P*>(w.a);
  const P* grad = reinterpret_cast<const P*>(w.b);
  T* xr = reinterpret_cast<T*>(p.x_ring) + w.col;
  T* gr = reinterpret_cast<T*>(p.g_ring) + w.col;
  // Age 0 of the iterate: the param, or its master.
  T* mst = M ? reinterpret_cast<T*>(p.master) + w.col : reinterpret_cast<T*>(param);
  int64_t off[R];
  bool vec = (M ? aligned16(mst) && aligned8(param) && aligned8(grad) : aligned16(param) && aligned16(grad)) &&
             w.len % N == 0;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    off[j] = K > 1 ? ring_slot(count, j + 1, K - 1) * p.row_elems : 0;
    if (K > 1) vec = vec && aligned16(xr + off[j]) && aligned16(gr + off[j]);
  }
  // Slot count mod (k-1) holds the oldest entries (age k-1, read below), then replaced.
  const int64_t woff = K > 1 ? off[K > 1 ? K - 2 : 0] : 0;

  double dots[K];
#pragma unroll
  for (int d = 0; d < K; ++d) dots[d] = 0.0;

  // Raw fragments of one step: param (or master), grad (16-bit: gh) and the
  // K - 1 rows of both rings.
  struct Raw {
    uint4 x, g, hx[R], hg[R];
    uint2 gh;
  };
  auto load = [&](auto v, int64_t i, int n) {
    constexpr bool V = decltype(v)::value;
    Raw r;
    r.x = ld_frag<T, V>(mst + i, n);  // the param, or its master
    if constexpr (M) {
      r.gh = ld_half<P, V>(grad + i, n);
    } else {
      r.g = ld_frag<T, V>(grad + i, n);
    }
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      r.hx[j] = ld_frag<T, V>(xr + off[j] + i, n);
      r.hg[j] = ld_frag<T, V>(gr + off[j] + i, n);
    }
    return r;
  };
  auto finish = [&](auto v, int64_t i, int n, const Raw& r) {
    constexpr bool V = decltype(v)::value;
    C x0[N], g0[N], ax[N], ag[N], h[N];
    unpack<T>(r.x, x0);
    if constexpr (M) {
      unpack_half<P>(r.gh, g0);
    } else {
      unpack<T>(r.g, g0);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      g0[e] = effective_grad(g0[e], x0[e], sign, wd, has_wd);
      ax[e] = coef[0] * x0[e];
      ag[e] = coef[0] * g0[e];
    }
    if constexpr (DOTS) dot_acc<N>(dots[0], g0, g0);
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      unpack<T>(r.hx[j], h);
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] += coef[j + 1] * h[e];
      unpack<T>(r.hg[j], h);
#pragma unroll
      for (int e = 0; e < N; ++e) ag[e] += coef[j + 1] * h[e];
      if constexpr (DOTS) dot_acc<N>(dots[j + 1], g0, h);
    }
    if constexpr (M) {
      if constexpr (K > 1) {
        st_frag<T, V>(xr + woff + i, n, r.x);  // the old master, bit for bit
        st_frag<T, V>(gr + woff + i, n, pack<T>(g0));
      }
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      st_frag<T, V>(mst + i, n, pack<T>(ax));
      st_half<P, V>(param + i, n, pack_half<P, SR>(ax, keys.x, w.col + i));
    } else if constexpr (SR) {
      if constexpr (K > 1) st_frag<T, V>(xr + woff + i, n, r.x);  // the old iterate, bit for bit
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      store_sr<T, V, (K > 1)>(param + i, gr + woff + i, n, ax, g0, keys, w.col + i);
    } else {
      if constexpr (K > 1) {
        st_frag<T, V>(xr + woff + i, n, r.x);  // the old iterate, bit for bit
        st_frag<T, V>(gr + woff + i, n, pack<T>(g0));
      }
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      st_frag<T, V>(param + i, n, pack<T>(ax));
    }
  };
  // Up to k = 2 (4 fragments a step) a thread issues the loads of its whole
  // chunk at once; beyond, one step at a time (the 64-register cap).
  for_each_frag<T, (K <= 2 ? kChunkFrags<sizeof(T)> : 1)>(w.len, vec, load, finish);

  if constexpr (DOTS) block_partials<K>(dots, K, 0, p.table.nblocks, p.partials);
}

template <typename T, int K, bool DOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(T), K>()) combine_kernel(const CombineLaunch p) {
  combine_body<T, K, DOTS, false>(p);
}

// Stochastic rounding (16-bit T only): a kernel of its own, so that the
// round-to-nearest kernel above stays exactly what it was.
template <typename T, int K, bool DOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(T), K>()) combine_sr_kernel(const CombineLaunch p) {
  combine_body<T, K, DOTS, true>(p);
}

// Master weights (16-bit P, float32 rings and master), to nearest or SR.
template <typename P, int K, bool DOTS, bool SR>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(float), K>()) combine_master_kernel(
    const CombineLaunch p) {
  combine_body<float, K, DOTS, SR, P>(p);
}

// The same step for any k at run time (k > kMaxStaticK): ring rows one at a
// time. DOTS needs k <= kDotGroup (the register group).
template <typename T, bool DOTS, bool SR, typename P = T>
__device__ __forceinline__ void combine_any_body(const CombineLaunch p) {
  using C = compute_t<T>;
  constexpr int N = Frag<T>::N;
  constexpr bool M = !std::is_same_v<T, P>;  // master weights, as in combine_body
  static_assert(!M || (std::is_same_v<T, float> && N == kHalfN), "master weights: float32 rings, 16-bit params");
  if (skip_step(p.found_inf)) return;
  extern __shared__ __align__(16) unsigned char smem[];
  const int k = p.k;
  int64_t* off = reinterpret_cast<int64_t*>(smem);
  C* coef = reinterpret_cast<C*>(off + k);
  const int64_t count = *p.count;
  const uint2 keys = SR ? sr_keys(p, count) : make_uint2(0, 0);
  const int64_t slots = k - 1;
  for (int j = threadIdx.x; j < k; j += kThreads) {
    coef[j] = static_cast<C>(p.coefs[j]);
    off[j] = j >= 1 ? ring_slot(count, j, slots) * p.row_elems : 0;
  }
  __syncthreads();

  const Work w = block_work(p.table);
  const C lr = static_cast<C>(*p.lr);
  const C sign = grad_sign<C>(p.maximize, p.grad_scale);
  const C wd = static_cast<C>(p.weight_decay);
  const bool has_wd = p.weight_decay != 0.0;
  const int64_t woff = k > 1 ? ring_slot(count, 0, slots) * p.row_elems : 0;
  P* param = reinterpret_cast<P*>(w.a);
  const P* grad = reinterpret_cast<const P*>(w.b);
  T* xr = reinterpret_cast<T*>(p.x_ring) + w.col;
  T* gr = reinterpret_cast<T*>(p.g_ring) + w.col;
  T* mst = M ? reinterpret_cast<T*>(p.master) + w.col : reinterpret_cast<T*>(param);
  bool vec = (M ? aligned16(mst) && aligned8(param) && aligned8(grad) : aligned16(param) && aligned16(grad)) &&
             w.len % N == 0;
  for (int j = 1; j < k; ++j) vec = vec && aligned16(xr + off[j]) && aligned16(gr + off[j]);
  const C a0 = coef[0];

  double dots[DOTS ? kDotGroup : 1];
#pragma unroll
  for (int d = 0; d < (DOTS ? kDotGroup : 1); ++d) dots[d] = 0.0;

  for_each_frag<T>(w.len, vec, [&](auto v, int64_t i, int n) {
    constexpr bool V = decltype(v)::value;
    const uint4 rx = ld_frag<T, V>(mst + i, n);
    C x0[N], g0[N], ax[N], ag[N], h[N];
    if constexpr (M) {
      unpack_half<P>(ld_half<P, V>(grad + i, n), g0);
    } else {
      unpack<T>(ld_frag<T, V>(grad + i, n), g0);
    }
    unpack<T>(rx, x0);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      g0[e] = effective_grad(g0[e], x0[e], sign, wd, has_wd);
      ag[e] = a0 * g0[e];
      ax[e] = a0 * x0[e];
    }
    if constexpr (DOTS) {
      dot_acc<N>(dots[0], g0, g0);
      // Unrolled to the register group so that dots[j] stays in registers.
#pragma unroll
      for (int j = 1; j < kDotGroup; ++j) {
        if (j < k) {
          const uint4 rxh = ld_frag<T, V>(xr + off[j] + i, n);
          const uint4 rgh = ld_frag<T, V>(gr + off[j] + i, n);
          const C aj = coef[j];
          unpack<T>(rxh, h);
#pragma unroll
          for (int e = 0; e < N; ++e) ax[e] += aj * h[e];
          unpack<T>(rgh, h);
#pragma unroll
          for (int e = 0; e < N; ++e) ag[e] += aj * h[e];
          dot_acc<N>(dots[j], g0, h);
        }
      }
    } else {
      for (int j = 1; j < k; ++j) {
        const uint4 rxh = ld_frag<T, V>(xr + off[j] + i, n);
        const uint4 rgh = ld_frag<T, V>(gr + off[j] + i, n);
        const C aj = coef[j];
        unpack<T>(rxh, h);
#pragma unroll
        for (int e = 0; e < N; ++e) ax[e] += aj * h[e];
        unpack<T>(rgh, h);
#pragma unroll
        for (int e = 0; e < N; ++e) ag[e] += aj * h[e];
      }
    }
    if constexpr (M) {
      // k > kMaxStaticK here: both ring slots are always stored.
      st_frag<T, V>(xr + woff + i, n, rx);
      st_frag<T, V>(gr + woff + i, n, pack<T>(g0));
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      st_frag<T, V>(mst + i, n, pack<T>(ax));
      st_half<P, V>(param + i, n, pack_half<P, SR>(ax, keys.x, w.col + i));
    } else if constexpr (SR) {
      // k > kMaxStaticK here: both ring slots are always stored.
      st_frag<T, V>(xr + woff + i, n, rx);
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      store_sr<T, V, true>(param + i, gr + woff + i, n, ax, g0, keys, w.col + i);
    } else {
      if (k > 1) {
        st_frag<T, V>(xr + woff + i, n, rx);
        st_frag<T, V>(gr + woff + i, n, pack<T>(g0));
      }
#pragma unroll
      for (int e = 0; e < N; ++e) ax[e] = interpolate(ax[e], ag[e], lr);
      st_frag<T, V>(param + i, n, pack<T>(ax));
    }
  });

  if constexpr (DOTS) block_partials<kDotGroup>(dots, k, 0, p.table.nblocks, p.partials);
}

template <typename T, bool DOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(T), 0>()) combine_any_kernel(const CombineLaunch p) {
  combine_any_body<T, DOTS, false>(p);
}

template <typename T, bool DOTS>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(T), 0>()) combine_any_sr_kernel(const CombineLaunch p) {
  combine_any_body<T, DOTS, true>(p);
}

template <typename P, bool DOTS, bool SR>
__global__ void __launch_bounds__(kThreads, min_blocks<sizeof(float), 0>()) combine_any_master_kernel(
    const CombineLaunch p) {
  combine_any_body<float, DOTS, SR, P>(p);
}

template <typename T>
constexpr bool kSixteenBit = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <typename T, int K, bool SR>
void combine_static(const CombineLaunch& p, dim3 grid, cudaStream_t stream) {
  if constexpr (SR) {
    if (p.partials) {
      combine_sr_kernel<T, K, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      combine_sr_kernel<T, K, false><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    if (p.partials) {
      combine_kernel<T, K, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      combine_kernel<T, K, false><<<grid, kThreads, 0, stream>>>(p);
    }
  }
}

template <typename T, bool SR>
void combine_dispatch(const CombineLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  switch (p.k) {
    case 1: combine_static<T, 1, SR>(p, grid, stream); break;
    case 2: combine_static<T, 2, SR>(p, grid, stream); break;
    case 3: combine_static<T, 3, SR>(p, grid, stream); break;
    case 4: combine_static<T, 4, SR>(p, grid, stream); break;
    default: {
      static_assert(kMaxStaticK == 4, "combine_typed dispatches k = 1..4 statically");
      const size_t smem = static_cast<size_t>(p.k) * (sizeof(int64_t) + sizeof(compute_t<T>));
      if constexpr (SR) {
        if (p.partials) {
          combine_any_sr_kernel<T, true><<<grid, kThreads, smem, stream>>>(p);
        } else {
          combine_any_sr_kernel<T, false><<<grid, kThreads, smem, stream>>>(p);
        }
      } else {
        if (p.partials) {
          combine_any_kernel<T, true><<<grid, kThreads, smem, stream>>>(p);
        } else {
          combine_any_kernel<T, false><<<grid, kThreads, smem, stream>>>(p);
        }
      }
    }
  }
}

template <typename T>
cudaError_t combine_typed(const CombineLaunch& p, cudaStream_t stream) {
  // Only 16-bit data is rounded stochastically; wider dtypes ignore the seed.
  if constexpr (kSixteenBit<T>) {
    if (p.sr_seed.set) {
      combine_dispatch<T, true>(p, stream);
      return cudaGetLastError();
    }
  }
  combine_dispatch<T, false>(p, stream);
  return cudaGetLastError();
}

// Master weights: 16-bit P, float32 rings and master.
template <typename P, int K, bool SR>
void combine_master_static(const CombineLaunch& p, dim3 grid, cudaStream_t stream) {
  if (p.partials) {
    combine_master_kernel<P, K, true, SR><<<grid, kThreads, 0, stream>>>(p);
  } else {
    combine_master_kernel<P, K, false, SR><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename P, bool SR>
void combine_master_dispatch(const CombineLaunch& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.table.nblocks));
  switch (p.k) {
    case 1: combine_master_static<P, 1, SR>(p, grid, stream); break;
    case 2: combine_master_static<P, 2, SR>(p, grid, stream); break;
    case 3: combine_master_static<P, 3, SR>(p, grid, stream); break;
    case 4: combine_master_static<P, 4, SR>(p, grid, stream); break;
    default: {
      const size_t smem = static_cast<size_t>(p.k) * (sizeof(int64_t) + sizeof(float));
      if (p.partials) {
        combine_any_master_kernel<P, true, SR><<<grid, kThreads, smem, stream>>>(p);
      } else {
        combine_any_master_kernel<P, false, SR><<<grid, kThreads, smem, stream>>>(p);
      }
    }
  }
}

template <typename P>
cudaError_t combine_master_typed(const CombineLaunch& p, cudaStream_t stream) {
  if (p.sr_seed.set) {
    combine_master_dispatch<P, true>(p, stream);
  } else {
    combine_master_dispatch<P, false>(p, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine(const CombineLaunch& p, cudaStream_t stream) {
  if (p.table.nblocks == 0) return cudaSuccess;
  if (p.master != nullptr) {
    if (p.dtype != DType::kFloat32) return cudaErrorInvalidValue;
    if (p.param_dtype == DType::kBFloat16) return combine_master_typed<bf16>(p, stream);
    if (p.param_dtype == DType::kFloat16) return combine_master_typed<fp16>(p, stream);
    return cudaErrorInvalidValue;
  }
  return INTERP_DISPATCH_DTYPE(p.dtype, T, cudaErrorInvalidValue, [&] { return combine_typed<T>(p, stream); });
}

}  // namespace interp::cuda
