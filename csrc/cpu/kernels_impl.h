// The CPU kernels, written once against at::vec::Vectorized and compiled once
// per instruction set. Include this only from a kernels_<isa>.cpp file, after
// CPU_CAPABILITY (and the matching CPU_CAPABILITY_<ISA> macro) is defined.
//
// Everything lives in an anonymous namespace: the same template compiled for
// AVX2 and for the baseline must never be merged by the linker into one copy
// (that would run AVX2 code on a machine without it, or lose the vector code).
//
// Memory traffic is one pass per op: each element is loaded once. The Gram
// row of a combine is accumulated during the update itself when it fits one
// register group (k <= kDotGroup); a longer one needs a read-only pass over the
// chunk first (the update must not clobber what the dots read). Measured: an
// interleaved second pass over an L2-sized chunk costs nearly as much as the
// update itself, hence the fused path for the common small k.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
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
    at::vec::load_fp32_from_bf16(reinterpret_cast<const c10::BFloat16*>(p), lo, hi);
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
    at::vec::load_fp32_from_fp16(reinterpret_cast<const c10::Half*>(p), lo, hi);
  }
  static void store(fp16* p, const V& lo, const V& hi) {
    at::vec::convert_float_half(lo, hi).store(reinterpret_cast<c10::Half*>(p));
  }
  static void store_nt(fp16* p, const V& lo, const V& hi) {
    store_stream(reinterpret_cast<c10::Half*>(p), at::vec::convert_float_half(lo, hi));
  }
};

static_assert(IO<bf16>::W == Vectorized<c10::BFloat16>::size(), "bf16 IO must move one full vector");
static_assert(IO<fp16>::W == Vectorized<c10::Half>::size(), "fp16 IO must move one full vector");

// ---------------------------------------------------------------------------
// Stochastic rounding (stochastic_rounding.h) of one IO step, W lanes held as
// two float vectors, stored by sr_store_step. The column hash h(col) is
// computed once per step (col_hash) and serves both streams. AVX2 / AVX-512
// hash and round in integer lanes and write the 16-bit bits directly; the
// baseline rounds lane by lane with the scalar definition.

template <typename S>
constexpr bool kSixteenBit = std::is_same_v<S, bf16> || std::is_same_v<S, fp16>;

#if defined(CPU_CAPABILITY_AVX512)

using VI = __m512i;

inline VI lowbias32_v(VI v) {
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(0x7FEB352D));
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 15));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
}

struct ColHash {
  VI lo, hi;
};

inline ColHash col_hash(int64_t col) {
  const VI base = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(col))),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return {lowbias32_v(base), lowbias32_v(_mm512_add_epi32(base, _mm512_set1_epi32(16)))};
}

inline VI random_v(VI h, uint32_t key) {
  return lowbias32_v(_mm512_xor_si512(h, _mm512_set1_epi32(static_cast<int>(key))));
}

// The 16-bit results of bfloat16 rounding in 32-bit lanes, written directly
// (no float round trip): (bits(x) + (r >> 16)) >> 16, NaN as at::vec writes it.
inline VI sr_bits_bf16(__m512 x, VI r) {
  const VI up = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_srli_epi32(r, 16)), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), up, _mm512_set1_epi32(0xFFFF));
}

inline void sr_store_bf16(bf16* p, __m512 lo, __m512 hi, const VI& r_lo, const VI& r_hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(sr_bits_bf16(lo, r_lo)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), _mm512_cvtepi32_epi16(sr_bits_bf16(hi, r_hi)));
}

// float16's bits from the neighbour toward zero th (the conversion toward
// zero, which saturates at the largest finite value): th + 1 where
// u * (|n| - |t|) < |x| - |t|. A non-finite x converts to itself in any
// rounding mode, and its comparison is false (n or t is NaN): no special case.
inline __m256i sr_bits_fp16(__m512 x, VI r) {
  const __m512 mag = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m256i th = _mm512_cvtps_ph(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_and_ps(_mm512_cvtph_ps(th), mag);
  const __m512 n = _mm512_and_ps(_mm512_cvtph_ps(_mm256_add_epi16(th, _mm256_set1_epi16(1))), mag);
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 8)), _mm512_set1_ps(0x1p-24f));
  const __mmask16 away =
      _mm512_cmp_ps_mask(_mm512_mul_ps(u, _mm512_sub_ps(n, t)), _mm512_sub_ps(_mm512_and_ps(x, mag), t), _CMP_LT_OQ);
  return _mm256_mask_add_epi16(th, away, th, _mm256_set1_epi16(1));
}

inline void sr_store_fp16(fp16* p, __m512 lo, __m512 hi, const VI& r_lo, const VI& r_hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), sr_bits_fp16(lo, r_lo));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), sr_bits_fp16(hi, r_hi));
}

#elif defined(CPU_CAPABILITY_AVX2)

using VI = __m256i;

inline VI lowbias32_v(VI v) {
  v = _mm256_xor_si256(v, _mm256_srli_epi32(v, 16));
  v = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x7FEB352D));
  v = _mm256_xor_si256(v, _mm256_srli_epi32(v, 15));
  v = _mm256_mullo_epi32(v, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(v, _mm256_srli_epi32(v, 16));
}

struct ColHash {
  VI lo, hi;
};

inline ColHash col_hash(int64_t col) {
  const VI base = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(col))),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return {lowbias32_v(base), lowbias32_v(_mm256_add_epi32(base, _mm256_set1_epi32(8)))};
}

inline VI random_v(VI h, uint32_t key) {
  return lowbias32_v(_mm256_xor_si256(h, _mm256_set1_epi32(static_cast<int>(key))));
}

// The 16-bit results of bfloat16 rounding in 32-bit lanes, written directly
// (no float round trip): (bits(x) + (r >> 16)) >> 16, NaN as at::vec writes it.
inline VI sr_bits_bf16(__m256 x, VI r) {
  const VI up = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), _mm256_srli_epi32(r, 16)), 16);
  return _mm256_blendv_epi8(up, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

inline void sr_store_bf16(bf16* p, __m256 lo, __m256 hi, const VI& r_lo, const VI& r_hi) {
  // packus interleaves the 128-bit lanes; the permute restores element order.
  const VI packed = _mm256_packus_epi32(sr_bits_bf16(lo, r_lo), sr_bits_bf16(hi, r_hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}

// float16's bits from the neighbour toward zero th (the conversion toward
// zero, which saturates at the largest finite value): th + 1 where
// u * (|n| - |t|) < |x| - |t|. A non-finite x converts to itself in any
// rounding mode, and its comparison is false (n or t is NaN): no special case.
inline __m128i sr_bits_fp16(__m256 x, VI r) {
  const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m128i th = _mm256_cvtps_ph(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 t = _mm256_and_ps(_mm256_cvtph_ps(th), mag);
  const __m256 n = _mm256_and_ps(_mm256_cvtph_ps(_mm_add_epi16(th, _mm_set1_epi16(1))), mag);
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 8)), _mm256_set1_ps(0x1p-24f));
  const __m256i away = _mm256_castps_si256(
      _mm256_cmp_ps(_mm256_mul_ps(u, _mm256_sub_ps(n, t)), _mm256_sub_ps(_mm256_and_ps(x, mag), t), _CMP_LT_OQ));
  // The all-ones lanes of the mask, narrowed to 16 bits, are -1: subtracting them adds one.
  const __m128i away16 = _mm_packs_epi32(_mm256_castsi256_si128(away), _mm256_extracti128_si256(away, 1));
  return _mm_sub_epi16(th, away16);
}

inline void sr_store_fp16(fp16* p, __m256 lo, __m256 hi, const VI& r_lo, const VI& r_hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_set_m128i(sr_bits_fp16(hi, r_hi), sr_bits_fp16(lo, r_lo)));
}

#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)

// One IO step stored with stochastic rounding, its 16-bit bits packed
// directly. Measured on an AMD EPYC (AVX2, one 2^22-element bucket, k = 2, one
// thread): bfloat16 took 4.8 ms with a float round trip through IO::store,
// 3.9 ms packed (rounding to nearest: 2.2 ms; the rest is the three hashes
// per element).
inline void sr_store_step(bf16* p, Vectorized<float> lo, Vectorized<float> hi, const ColHash& h, uint32_t key) {
  sr_store_bf16(p, lo, hi, random_v(h.lo, key), random_v(h.hi, key));
}
inline void sr_store_step(fp16* p, Vectorized<float> lo, Vectorized<float> hi, const ColHash& h, uint32_t key) {
  sr_store_fp16(p, lo, hi, random_v(h.lo, key), random_v(h.hi, key));
}

#else

struct ColHash {
  uint32_t h[2 * Vectorized<float>::size()];
};

inline ColHash col_hash(int64_t col) {
  ColHash out;
  for (int i = 0; i < 2 * Vectorized<float>::size(); ++i) out.h[i] = sr_col_hash(col + i);
  return out;
}

template <typename S>
inline void sr_store_step(S* p, Vectorized<float> lo, Vectorized<float> hi, const ColHash& h, uint32_t key) {
  constexpr int L = Vectorized<float>::size();
  float f[2 * L];
  lo.store(f);
  hi.store(f + L);
  for (int i = 0; i < 2 * L; ++i) sr_store(p + i, f[i], sr_random(h.h[i], key));
}

#endif

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

// acc += a * b elementwise in float64 (two accumulators per float vector).
inline void dot64(VD (&acc)[2], const Vectorized<float>& a, const Vectorized<float>& b) {
  VD al, ah, bl, bh;
  halves(a, al, ah);
  halves(b, bl, bh);
  acc[0] = at::vec::fmadd(al, bl, acc[0]);
  acc[1] = at::vec::fmadd(ah, bh, acc[1]);
}
inline void dot64(VD (&acc)[2], const VD& a, const VD& b) { acc[0] = at::vec::fmadd(a, b, acc[0]); }

inline double acc_sum(const VD (&acc)[2]) { return lane_sum(acc[0] + acc[1]); }

template <typename S>
S* at_col(char* row, int64_t col) {
  return reinterpret_cast<S*>(row) + col;
}

// ---------------------------------------------------------------------------
// Dots of the effective gradient against ND other vectors, over one chunk.
// others[d] == nullptr stands for the effective gradient itself (<g0, g0>).
// If `write` is set, the effective gradient is also stored there (gram_row's
// ring slot, never one of `others`).
template <typename S, int ND>
INTERP_FLATTEN void grad_dots(const S* p, const S* g, int64_t len, const S* const* others, typename IO<S>::C sign,
               typename IO<S>::C wd, bool has_wd, S* write, double* out) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  const V signv(sign), wdv(wd);
  // Two float64 accumulators per dot (the low and high halves of a float
  // vector), fused multiply-adds: four per dot spilled the AVX2 register file
  // at two dots (stack stores every iteration: bf16 gram_row 3x slower).
  VD acc[ND][2];
  for (int d = 0; d < ND; ++d) acc[d][0] = acc[d][1] = VD(0.0);
  const V zero(C(0));
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V g_lo, g_hi, x_lo = zero, x_hi = zero;
    IO<S>::load(g + e, g_lo, g_hi);
    if (has_wd) IO<S>::load(p + e, x_lo, x_hi);
    g_lo = effective_grad(g_lo, x_lo, signv, wdv, has_wd);
    g_hi = effective_grad(g_hi, x_hi, signv, wdv, has_wd);
    if (write) IO<S>::store_nt(write + e, g_lo, g_hi);
    for (int d = 0; d < ND; ++d) {
      V o_lo = g_lo, o_hi = g_hi;
      if (others[d]) IO<S>::load(others[d] + e, o_lo, o_hi);
      dot64(acc[d], g_lo, o_lo);
      dot64(acc[d], g_hi, o_hi);
    }
  }
  double tail[ND];
  for (int d = 0; d < ND; ++d) tail[d] = 0.0;
  for (; e < len; ++e) {
    const C x = has_wd ? load_c(p + e) : C(0);
    const C g0 = effective_grad(load_c(g + e), x, sign, wd, has_wd);
    if (write) store_c(write + e, g0);
    for (int d = 0; d < ND; ++d) {
      tail[d] += static_cast<double>(g0) * static_cast<double>(others[d] ? load_c(others[d] + e) : g0);
    }
  }
  for (int d = 0; d < ND; ++d) out[d] = acc_sum(acc[d]) + tail[d];
}

// <r_0, r_j> for j = j0 .. j0+ND-1 over one chunk, with r_j = y_j - y_{j+1}.
// snaps[i] is snapshot y_{j0 + i}, i = 0..ND (ND + 1 of them); y0 and y1 give r_0.
template <typename S, int ND>
INTERP_FLATTEN void residual_dots(const S* y0, const S* y1, const S* const* snaps, int64_t len, double* out) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  // Two float64 accumulators per dot (the low and high halves of a float
  // vector): four per dot would spill the AVX2 register file at two dots.
  VD acc[ND][2];
  for (int d = 0; d < ND; ++d) acc[d][0] = acc[d][1] = VD(0.0);
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V a_lo, a_hi, b_lo, b_hi;
    IO<S>::load(y0 + e, a_lo, a_hi);
    IO<S>::load(y1 + e, b_lo, b_hi);
    const V r0_lo = a_lo - b_lo, r0_hi = a_hi - b_hi;
    V prev_lo, prev_hi;
    IO<S>::load(snaps[0] + e, prev_lo, prev_hi);
    for (int d = 0; d < ND; ++d) {
      V next_lo, next_hi;
      IO<S>::load(snaps[d + 1] + e, next_lo, next_hi);
      dot64(acc[d], r0_lo, prev_lo - next_lo);
      dot64(acc[d], r0_hi, prev_hi - next_hi);
      prev_lo = next_lo;
      prev_hi = next_hi;
    }
  }
  double tail[ND];
  for (int d = 0; d < ND; ++d) tail[d] = 0.0;
  for (; e < len; ++e) {
    const C r0 = load_c(y0 + e) - load_c(y1 + e);
    for (int d = 0; d < ND; ++d) {
      tail[d] += static_cast<double>(r0) * static_cast<double>(load_c(snaps[d] + e) - load_c(snaps[d + 1] + e));
    }
  }
  for (int d = 0; d < ND; ++d) out[d] = acc_sum(acc[d]) + tail[d];
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

// ---------------------------------------------------------------------------
// combine

// What the update of one chunk needs, resolved for that chunk.
template <typename S>
struct CombineChunk {
  using C = typename IO<S>::C;
  S* p;
  const S* g;
  const S* const* xh;         // [j], j = 1..k-1
  const S* const* gh;         // [j], j = 1..k-1
  S* xw;                      // nullptr when k == 1
  S* gw;                      // nullptr when k == 1
  int64_t len;
  const C* coef;
  C lr, sign, wd;
  bool has_wd;
  int64_t col;               // ring column of the chunk's first element
  uint32_t key_p, key_g;     // stochastic rounding keys (SR kernels only)
};

// The update pass over one chunk. KK > 0 fixes k at compile time (the common
// Interpolatron k = 1..3: history loops unrolled, pointers in registers);
// KK == 0 takes k at run time. DOTS (k <= kDotGroup, grads given): the Gram
// row <g0, g(age j)> is accumulated from the values loaded for the update, in
// the same pass, and written to dots[0..k). SR (16-bit S only): the new param
// and the gradient slot are rounded stochastically; the dots use the unrounded
// gradient.
template <typename S, int KK, bool DOTS, bool SR>
INTERP_FLATTEN void combine_update(const CombineChunk<S>& u, int k_runtime, double* dots) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  constexpr int ND = DOTS ? kDotGroup : 1;
  const int k = KK > 0 ? KK : k_runtime;
  const V a0(u.coef[0]), lrv(u.lr), signv(u.sign), wdv(u.wd);
  VD acc[ND][2];
  double tail[ND];
  for (int d = 0; d < ND; ++d) {
    acc[d][0] = acc[d][1] = VD(0.0);
    tail[d] = 0.0;
  }
  int64_t e = 0;
  for (; e + W <= u.len; e += W) {
    V x_lo, x_hi;
    IO<S>::load(u.p + e, x_lo, x_hi);
    V ax_lo = x_lo * a0, ax_hi = x_hi * a0;
    V g_lo, g_hi;
    IO<S>::load(u.g + e, g_lo, g_hi);
    g_lo = effective_grad(g_lo, x_lo, signv, wdv, u.has_wd);
    g_hi = effective_grad(g_hi, x_hi, signv, wdv, u.has_wd);
    V ag_lo = g_lo * a0, ag_hi = g_hi * a0;
    if (DOTS) {
      dot64(acc[0], g_lo, g_lo);
      dot64(acc[0], g_hi, g_hi);
    }
    for (int j = 1; j < k; ++j) {
      const V aj(u.coef[j]);
      V h_lo, h_hi;
      IO<S>::load(u.xh[j] + e, h_lo, h_hi);
      ax_lo = ax_lo + h_lo * aj;
      ax_hi = ax_hi + h_hi * aj;
      IO<S>::load(u.gh[j] + e, h_lo, h_hi);
      ag_lo = ag_lo + h_lo * aj;
      ag_hi = ag_hi + h_hi * aj;
      if (DOTS) {
        dot64(acc[j], g_lo, h_lo);
        dot64(acc[j], g_hi, h_hi);
      }
    }
    // The write slots are the oldest entries, read above: store only now.
    if (u.xw) IO<S>::store(u.xw + e, x_lo, x_hi);
    if constexpr (SR) {
      const ColHash h = col_hash(u.col + e);
      if (u.gw) sr_store_step(u.gw + e, g_lo, g_hi, h, u.key_g);
      sr_store_step(u.p + e, interpolate(ax_lo, ag_lo, lrv), interpolate(ax_hi, ag_hi, lrv), h, u.key_p);
    } else {
      if (u.gw) IO<S>::store(u.gw + e, g_lo, g_hi);
      IO<S>::store(u.p + e, interpolate(ax_lo, ag_lo, lrv), interpolate(ax_hi, ag_hi, lrv));
    }
  }
  for (; e < u.len; ++e) {
    const C x = load_c(u.p + e);
    C ax = x * u.coef[0];
    const C g0 = effective_grad(load_c(u.g + e), x, u.sign, u.wd, u.has_wd);
    C ag = g0 * u.coef[0];
    if (DOTS) tail[0] += static_cast<double>(g0) * static_cast<double>(g0);
    for (int j = 1; j < k; ++j) {
      ax = ax + load_c(u.xh[j] + e) * u.coef[j];
      const C h = load_c(u.gh[j] + e);
      ag = ag + h * u.coef[j];
      if (DOTS) tail[j] += static_cast<double>(g0) * static_cast<double>(h);
    }
    if (u.xw) store_c(u.xw + e, x);
    if constexpr (SR) {
      const uint32_t h = sr_col_hash(u.col + e);
      if (u.gw) sr_store(u.gw + e, g0, sr_random(h, u.key_g));
      sr_store(u.p + e, interpolate(ax, ag, u.lr), sr_random(h, u.key_p));
    } else {
      if (u.gw) store_c(u.gw + e, g0);
      store_c(u.p + e, interpolate(ax, ag, u.lr));
    }
  }
  if (DOTS) {
    for (int d = 0; d < k; ++d) dots[d] = acc_sum(acc[d]) + tail[d];
  }
}

template <typename S>
using UpdateFn = void (*)(const CombineChunk<S>&, int, double*);

// The update kernel for this k (fixed for k <= 3) and this Gram mode.
template <typename S, bool SR>
UpdateFn<S> pick_update(int k, bool fused_dots) {
  if (k <= 3) {
    const UpdateFn<S> fixed[2][3] = {
        {&combine_update<S, 1, false, SR>, &combine_update<S, 2, false, SR>, &combine_update<S, 3, false, SR>},
        {&combine_update<S, 1, true, SR>, &combine_update<S, 2, true, SR>, &combine_update<S, 3, true, SR>}};
    return fixed[fused_dots][k - 1];
  }
  return fused_dots ? &combine_update<S, 0, true, SR> : &combine_update<S, 0, false, SR>;
}

template <typename S>
void combine_impl(const CombineArgs& a, int64_t c0, int64_t c1) {
  using C = typename IO<S>::C;
  const int k = a.k;
  C coef[kMaxSlots];
  for (int j = 0; j < k; ++j) coef[j] = static_cast<C>(a.coefs[j]);
  // With k <= kDotGroup the Gram row rides along with the update;
  // a longer row is computed by a read-only pass over the chunk first.
  const bool fused_dots = a.partials != nullptr && k <= kDotGroup;
  UpdateFn<S> update = pick_update<S, false>(k, fused_dots);
  if constexpr (kSixteenBit<S>) {
    if (a.stochastic) update = pick_update<S, true>(k, fused_dots);
  }

  const S* xh[kMaxSlots];
  const S* gh[kMaxSlots];
  CombineChunk<S> u{};
  u.xh = xh;
  u.gh = gh;
  u.coef = coef;
  u.lr = static_cast<C>(a.lr);
  // The sign and GradScaler's unscaling in one factor (-1 times a power of
  // two: grad * sign is exactly -(grad / scale)).
  u.sign = static_cast<C>((a.maximize ? -1.0 : 1.0) * a.grad_mul);
  u.wd = static_cast<C>(a.weight_decay);
  u.has_wd = a.weight_decay != 0.0;
  u.key_p = a.key_param;
  u.key_g = a.key_grad;
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Segment& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    u.len = ch.len;
    u.col = off;
    u.p = static_cast<S*>(sg.a) + ch.begin;
    u.g = static_cast<const S*>(sg.b) + ch.begin;
    for (int j = 1; j < k; ++j) xh[j] = at_col<S>(a.x_rows[j], off);
    for (int j = 1; j < k; ++j) gh[j] = at_col<S>(a.g_rows[j], off);
    u.xw = a.x_write ? at_col<S>(a.x_write, off) : nullptr;
    u.gw = a.g_write ? at_col<S>(a.g_write, off) : nullptr;

    if (a.partials && !fused_dots) {
      // <g0, g(age j)>, j = 0..k-1, before anything in the chunk changes. The
      // update then re-reads the chunk, mostly from cache: a second pass that
      // only a Gram row longer than one register group (k > 8) pays.
      const S* others[kMaxSlots];
      others[0] = nullptr;
      for (int j = 1; j < k; ++j) others[j] = gh[j];
      dot_groups(k, a.partials + c * k, [&](auto nd, int d0, double* out) {
        grad_dots<S, decltype(nd)::value>(u.p, u.g, u.len, others + d0, u.sign, u.wd, u.has_wd, nullptr, out);
      });
    }
    update(u, k, fused_dots ? a.partials + c * k : nullptr);
  }
}

// ---------------------------------------------------------------------------
// gram_row

template <typename S>
void gram_row_impl(const GramArgs& a, int64_t c0, int64_t c1) {
  using C = typename IO<S>::C;
  const int k = a.ndots;
  const C sign = static_cast<C>((a.maximize ? -1.0 : 1.0) * a.grad_mul);
  const C wd = static_cast<C>(a.weight_decay);
  const bool has_wd = a.weight_decay != 0.0;
  const S* others[kMaxSlots];
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Segment& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    const S* p = static_cast<const S*>(sg.a) + ch.begin;
    const S* g = static_cast<const S*>(sg.b) + ch.begin;
    others[0] = nullptr;
    for (int j = 1; j < k; ++j) others[j] = at_col<S>(a.g_rows[j], off);
    S* gw = a.g_write ? at_col<S>(a.g_write, off) : nullptr;
    // The first group also stores g0: its slot is not among the ones read.
    dot_groups(k, a.partials + c * k, [&](auto nd, int d0, double* out) {
      grad_dots<S, decltype(nd)::value>(p, g, ch.len, others + d0, sign, wd, has_wd, d0 == 0 ? gw : nullptr,
                                        out);
    });
  }
  stream_fence();
}

// ---------------------------------------------------------------------------
// rna_record

// A bit-exact copy (16-bit values round-trip through fp32 unchanged) with
// non-temporal stores.
template <typename S>
INTERP_FLATTEN void copy_stream(S* dst, const S* src, int64_t len) {
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V lo, hi;
    IO<S>::load(src + e, lo, hi);
    IO<S>::store_nt(dst + e, lo, hi);
  }
  if (e < len) std::memcpy(dst + e, src + e, static_cast<size_t>(len - e) * sizeof(S));
}

template <typename S>
void rna_record_impl(const RecordArgs& a, int64_t c0, int64_t c1) {
  const S* snaps[kMaxSlots];
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Segment& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    const S* y0 = static_cast<const S*>(sg.a) + ch.begin;
    if (a.ndots > 0) {
      snaps[0] = y0;
      for (int j = 1; j <= a.ndots; ++j) snaps[j] = at_col<S>(a.rows[j], off);
      dot_groups(a.ndots, a.partials + c * a.ndots, [&](auto nd, int d0, double* out) {
        residual_dots<S, decltype(nd)::value>(y0, snaps[1], snaps + d0, ch.len, out);
      });
    }
    // Slot c mod S is never read, so the copy can come after the dots.
    copy_stream(at_col<S>(a.write, off), y0, ch.len);
  }
  stream_fence();
}

// ---------------------------------------------------------------------------
// rna_extrapolate

template <typename S>
INTERP_FLATTEN void rna_extrapolate_impl(const ExtrapArgs& a, int64_t c0, int64_t c1) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  const int m = a.m;
  C coef[kMaxSlots];
  for (int j = 0; j < m; ++j) coef[j] = static_cast<C>(a.coefs[j]);
  const S* ys[kMaxSlots];
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Segment& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    S* out = static_cast<S*>(sg.a) + ch.begin;
    for (int j = 0; j < m; ++j) ys[j] = at_col<S>(a.rows[j], off);
    int64_t e = 0;
    for (; e + W <= ch.len; e += W) {
      V acc_lo, acc_hi;
      IO<S>::load(ys[0] + e, acc_lo, acc_hi);
      const V c0v(coef[0]);
      acc_lo = acc_lo * c0v;
      acc_hi = acc_hi * c0v;
      for (int j = 1; j < m; ++j) {
        const V cj(coef[j]);
        V y_lo, y_hi;
        IO<S>::load(ys[j] + e, y_lo, y_hi);
        acc_lo = acc_lo + y_lo * cj;
        acc_hi = acc_hi + y_hi * cj;
      }
      IO<S>::store_nt(out + e, acc_lo, acc_hi);
    }
    for (; e < ch.len; ++e) {
      C acc = load_c(ys[0] + e) * coef[0];
      for (int j = 1; j < m; ++j) acc = acc + load_c(ys[j] + e) * coef[j];
      store_c(out + e, acc);
    }
  }
  stream_fence();
}

// ---------------------------------------------------------------------------
// dtype dispatch

template <template <typename> class Fn, typename Args>
void by_dtype(const Args& a, int64_t c0, int64_t c1) {
  switch (a.dtype) {
    case DType::kFloat32: Fn<float>::run(a, c0, c1); break;
    case DType::kFloat64: Fn<double>::run(a, c0, c1); break;
    case DType::kBFloat16: Fn<bf16>::run(a, c0, c1); break;
    case DType::kFloat16: Fn<fp16>::run(a, c0, c1); break;
  }
}

template <typename S>
struct CombineFn {
  static void run(const CombineArgs& a, int64_t c0, int64_t c1) { combine_impl<S>(a, c0, c1); }
};
template <typename S>
struct GramFn {
  static void run(const GramArgs& a, int64_t c0, int64_t c1) { gram_row_impl<S>(a, c0, c1); }
};
template <typename S>
struct RecordFn {
  static void run(const RecordArgs& a, int64_t c0, int64_t c1) { rna_record_impl<S>(a, c0, c1); }
};
template <typename S>
struct ExtrapFn {
  static void run(const ExtrapArgs& a, int64_t c0, int64_t c1) { rna_extrapolate_impl<S>(a, c0, c1); }
};

void combine_entry(const CombineArgs& a, int64_t c0, int64_t c1) { by_dtype<CombineFn>(a, c0, c1); }
void gram_row_entry(const GramArgs& a, int64_t c0, int64_t c1) { by_dtype<GramFn>(a, c0, c1); }
void rna_record_entry(const RecordArgs& a, int64_t c0, int64_t c1) { by_dtype<RecordFn>(a, c0, c1); }
void rna_extrapolate_entry(const ExtrapArgs& a, int64_t c0, int64_t c1) { by_dtype<ExtrapFn>(a, c0, c1); }

}  // namespace

#define INTERP_STRINGIFY_(x) #x
#define INTERP_STRINGIFY(x) INTERP_STRINGIFY_(x)

// The table of this translation unit's kernels.
#define INTERP_DEFINE_KERNEL_TABLE(getter)                                                          \
  const KernelTable* getter() {                                                                     \
    static const KernelTable table{INTERP_STRINGIFY(CPU_CAPABILITY), &combine_entry, &gram_row_entry, \
                                   &rna_record_entry, &rna_extrapolate_entry};                      \
    return &table;                                                                                  \
  }

}  // namespace interp::cpu
