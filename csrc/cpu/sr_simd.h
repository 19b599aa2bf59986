// Stochastic rounding (stochastic_rounding.h) in the CPU kernels' vector
// loops: AVX-512, AVX2 and the baseline (one copy per instruction set, see
// kernels_impl.h).
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include "simd.h"

namespace interp::cpu {
namespace {

// Stochastic rounding (stochastic_rounding.h) of one IO step, W lanes held as
// two float vectors, stored by sr_store_step. The column hash h(col) is
// computed once per step (col_hash) and serves both streams. AVX2 / AVX-512
// hash and round in integer lanes and write the 16-bit bits directly; the
// baseline rounds lane by lane with the scalar definition.

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

}  // namespace
}  // namespace interp::cpu
