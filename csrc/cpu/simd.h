// Vector helpers of the CPU kernels (one copy per instruction set, see
// kernels_impl.h): IO<S> (two float vectors in and out of S storage), the
// non-temporal stores of write-only destinations, and the float64 dot-product
// accumulation every op with dots shares.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

namespace interp::cpu {
namespace {

using at::vec::Vectorized;

// GCC does not inline the at::vec operators into these loops on its own (it
// emitted calls to operator* and operator+ per vector, leaving a 2-stream dot
// compute-bound at ~1 cycle per element, under half the memory speed):
// flatten every inner loop.
#if defined(__GNUC__)
#define INTERP_FLATTEN __attribute__((flatten))
#else
#define INTERP_FLATTEN
#endif

// A destination written without being read (gram_row's ring slot, the RNA
// record slot, extrapolate outputs) takes non-temporal stores where the address
// is vector-aligned: a plain store first pulls each line into the cache, a
// hidden extra read of the destination (measured: gram_row went from 4 to 3
// effective passes). Callers end their chunk range with stream_fence().
template <typename T, typename Vec>
inline void store_stream(T* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if (reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, v);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, v);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, v);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
    }
    return;
  }
#endif
  v.store(p);
}

// Orders this thread's non-temporal stores before the parallel region joins.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

#if defined(CPU_CAPABILITY_AVX2)
template <typename T>
inline __m128i load128(const T* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
#endif

// IO<S>: loads W = 2 * Vectorized<C>::size() elements of storage type S as two
// compute vectors, and stores two compute vectors back (rounding to nearest
// even for 16-bit storage).
template <typename S>
struct IO;

template <>
struct IO<float> {
  using C = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const float* p, V& lo, V& hi) {
    lo = V::loadu(p);
    hi = V::loadu(p + V::size());
  }
  static void load_unordered(const float* p, V& lo, V& hi) { load(p, lo, hi); }
  static void store(float* p, const V& lo, const V& hi) {
    lo.store(p);
    hi.store(p + V::size());
  }
  static void store_nt(float* p, const V& lo, const V& hi) {
    store_stream(p, lo);
    store_stream(p + V::size(), hi);
  }
};

template <>
struct IO<double> {
  using C = double;
  using V = Vectorized<double>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const double* p, V& lo, V& hi) {
    lo = V::loadu(p);
    hi = V::loadu(p + V::size());
  }
  static void load_unordered(const double* p, V& lo, V& hi) { load(p, lo, hi); }
  static void store(double* p, const V& lo, const V& hi) {
    lo.store(p);
    hi.store(p + V::size());
  }
  static void store_nt(double* p, const V& lo, const V& hi) {
    store_stream(p, lo);
    store_stream(p + V::size(), hi);
  }
};

template <>
struct IO<bf16> {
  using C = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const bf16* p, V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX2)
    // Two 128-bit widening loads: at::vec's one 256-bit load and a lane
    // extract made the 16-bit Gram pass 25 % slower (measured on Zen 3).
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p + 8)), 16));
#else
    at::vec::load_fp32_from_bf16(reinterpret_cast<const c10::BFloat16*>(p), lo, hi);
#endif
  }
  // The same values with the lanes in another order, the same for every
  // pointer: for dot products only (nothing stored from them). AVX2: one
  // 256-bit load, interleaved with zeros into the high halves of 32-bit lanes
  // (elements 0-3 and 8-11 in lo, 4-7 and 12-15 in hi).
  static void load_unordered(const bf16* p, V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
#else
    load(p, lo, hi);
#endif
  }
  static void store(bf16* p, const V& lo, const V& hi) {
    at::vec::convert_float_bfloat16(lo, hi).store(reinterpret_cast<c10::BFloat16*>(p));
  }
  static void store_nt(bf16* p, const V& lo, const V& hi) {
    store_stream(reinterpret_cast<c10::BFloat16*>(p), at::vec::convert_float_bfloat16(lo, hi));
  }
};

template <>
struct IO<fp16> {
  using C = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = 2 * V::size();
  static void load(const fp16* p, V& lo, V& hi) {
#if defined(CPU_CAPABILITY_AVX2)
    lo = _mm256_cvtph_ps(load128(p));  // as IO<bf16>::load: two 128-bit loads
    hi = _mm256_cvtph_ps(load128(p + 8));
#else
    at::vec::load_fp32_from_fp16(reinterpret_cast<const c10::Half*>(p), lo, hi);
#endif
  }
  static void load_unordered(const fp16* p, V& lo, V& hi) { load(p, lo, hi); }
  static void store(fp16* p, const V& lo, const V& hi) {
    at::vec::convert_float_half(lo, hi).store(reinterpret_cast<c10::Half*>(p));
  }
  static void store_nt(fp16* p, const V& lo, const V& hi) {
    store_stream(reinterpret_cast<c10::Half*>(p), at::vec::convert_float_half(lo, hi));
  }
};

static_assert(IO<bf16>::W == Vectorized<c10::BFloat16>::size(), "bf16 IO must move one full vector");
static_assert(IO<fp16>::W == Vectorized<c10::Half>::size(), "fp16 IO must move one full vector");

template <typename S>
constexpr bool kSixteenBit = std::is_same_v<S, bf16> || std::is_same_v<S, fp16>;

// ---------------------------------------------------------------------------
// Dot products

// Lane sum in lane order, in float64: the chunk partial.
template <typename V>
double lane_sum(const V& v) {
  using C = typename V::value_type;
  C lanes[V::size()];
  v.store(lanes);
  double s = 0.0;
  for (int i = 0; i < V::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

// D3: dot products accumulate in float64 per element. The product of two
// fp32 values is exact in float64, so a dot depends on how it is cut into
// partial sums only at float64 rounding (layout and sharding invariance).
using VD = Vectorized<double>;

// The two float64 halves of a float vector.
inline void halves(const Vectorized<float>& v, VD& lo, VD& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
#else
  static_assert(Vectorized<float>::size() == 2 * VD::size(), "a float vector is two double vectors");
  float f[Vectorized<float>::size()];
  double d[Vectorized<float>::size()];
  v.store(f);
  for (int i = 0; i < Vectorized<float>::size(); ++i) d[i] = static_cast<double>(f[i]);
  lo = VD::loadu(d);
  hi = VD::loadu(d + VD::size());
#endif
}

// A compute vector in float64: the two halves of a float vector, a double
// vector as it is. Widened once, a value serves every dot it enters.
struct Wide {
  VD lo, hi;
};
inline Wide widen(const Vectorized<float>& v) {
  Wide w;
  halves(v, w.lo, w.hi);
  return w;
}
inline const VD& widen(const VD& v) { return v; }

// acc += a * b elementwise in float64 (two accumulators per float vector).
inline void fma64(VD (&acc)[2], const Wide& a, const Wide& b) {
  acc[0] = at::vec::fmadd(a.lo, b.lo, acc[0]);
  acc[1] = at::vec::fmadd(a.hi, b.hi, acc[1]);
}
inline void fma64(VD (&acc)[2], const VD& a, const VD& b) { acc[0] = at::vec::fmadd(a, b, acc[0]); }

inline double acc_sum(const VD (&acc)[2]) { return lane_sum(acc[0] + acc[1]); }

template <typename S>
S* at_col(char* row, int64_t col) {
  return reinterpret_cast<S*>(row) + col;
}

// Runs a dot kernel over `ndots` dots in register groups of kDotGroup:
// fn(integral_constant<ND>, d0, out) computes dots d0 .. d0+ND-1 into out[0..ND).
template <typename Fn>
void dot_groups(int ndots, double* out, Fn&& fn) {
  for (int d0 = 0; d0 < ndots; d0 += kDotGroup) {
    switch (ndots - d0 >= kDotGroup ? kDotGroup : ndots - d0) {
      case 1: fn(std::integral_constant<int, 1>{}, d0, out + d0); break;
      case 2: fn(std::integral_constant<int, 2>{}, d0, out + d0); break;
      case 3: fn(std::integral_constant<int, 3>{}, d0, out + d0); break;
      case 4: fn(std::integral_constant<int, 4>{}, d0, out + d0); break;
      case 5: fn(std::integral_constant<int, 5>{}, d0, out + d0); break;
      case 6: fn(std::integral_constant<int, 6>{}, d0, out + d0); break;
      case 7: fn(std::integral_constant<int, 7>{}, d0, out + d0); break;
      default: fn(std::integral_constant<int, 8>{}, d0, out + d0); break;
    }
  }
}
static_assert(kDotGroup == 8, "dot_groups dispatches group sizes 1..8");

}  // namespace
}  // namespace interp::cpu
