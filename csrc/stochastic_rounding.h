// Stochastic rounding of float32 values to bfloat16 / float16: the scalar
// definition of interpolatron/rounding.py, shared by the CPU kernels (their
// tails and baseline variant; the AVX2 / AVX-512 lanes in cpu/sr_simd.h
// compute the same bits) and the CUDA kernels.
//
//   h(v)   = lowbias32(v)
//   key    = h(h(seed ^ stream) + count)   (per op call; count read on the device)
//   r(col) = h(h(col) ^ key)               (col: the element's ring column)
//
// all mod 2^32. h(col) does not depend on the stream: the kernels hash each
// column once and draw the parameter's and the gradient's bits from it.
#pragma once

#include <cstdint>

#include "interp_math.h"

namespace interp {

// The streams of rounding.py: the new parameter and the gradient ring.
constexpr uint32_t kStreamParam = 1;
constexpr uint32_t kStreamGrad = 2;

INTERP_HD uint32_t lowbias32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  v ^= v >> 16;
  return v;
}

// h(seed ^ stream): the host half of the key (the seed is a setting).
INTERP_HD uint32_t sr_salt(uint64_t seed, uint32_t stream) {
  return lowbias32(static_cast<uint32_t>(seed) ^ stream);
}

// The key of one call: the device half, from the bucket's step count.
INTERP_HD uint32_t sr_key(uint32_t salt, int64_t count) {
  return lowbias32(salt + static_cast<uint32_t>(static_cast<uint64_t>(count)));
}

INTERP_HD uint32_t sr_col_hash(int64_t col) { return lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(col))); }

INTERP_HD uint32_t sr_random(uint32_t col_hash, uint32_t key) { return lowbias32(col_hash ^ key); }

INTERP_HD bool finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

INTERP_HD float abs_float(float f) { return bits_as_float(float_as_bits(f) & 0x7FFFFFFFu); }

// bfloat16: the upper half of bits(x) + (r >> 16); a carry out of the low half
// is the round away from zero. Non-finite values round to nearest.
INTERP_HD bf16 sr_to_bf16(float x, uint32_t r) {
  const uint32_t u = float_as_bits(x);
  if (!finite_bits(u)) return to_bf16(x);
  bf16 out;
  out.bits = static_cast<uint16_t>((u + (r >> 16)) >> 16);
  return out;
}

// float16: away from zero iff (r >> 8) * 2^-24 * (|n| - |t|) < |x| - |t|, t the
// neighbour toward zero (round toward zero, which saturates at the largest
// finite value), n the next one out. Both sides are exact in float32.
INTERP_HD fp16 sr_to_fp16(float x, uint32_t r) {
  if (!finite_bits(float_as_bits(x))) return to_fp16(x);
  fp16 toward;
#if defined(__CUDA_ARCH__)
  toward.bits = __half_as_ushort(__float2half_rz(x));
#else
  // Round to nearest, then one step in where that went out (sign-magnitude
  // bits: minus one shrinks the magnitude on either sign).
  toward = to_fp16(x);
  if (abs_float(to_float(toward)) > abs_float(x)) toward.bits = static_cast<uint16_t>(toward.bits - 1u);
#endif
  fp16 away;
  away.bits = static_cast<uint16_t>(toward.bits + 1u);
  const float t = abs_float(to_float(toward));
  const float gap = abs_float(to_float(away)) - t;
  const float u = static_cast<float>(r >> 8) * 0x1p-24f;
  return u * gap < abs_float(x) - t ? away : toward;
}

INTERP_HD void sr_store(bf16* p, float v, uint32_t r) { *p = sr_to_bf16(v, r); }
INTERP_HD void sr_store(fp16* p, float v, uint32_t r) { *p = sr_to_fp16(v, r); }

}  // namespace interp
