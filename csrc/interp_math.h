// Per-element math shared by the CPU kernels (host C++, also instantiated with
// at::vec::Vectorized) and the CUDA kernels (nvcc). Nothing here includes torch
// or CUDA-only headers on the host side, so every translation unit can use it.
//
// The formulas are the contract of interpolatron/backends/base.py; keeping
// them in one place is what makes the CPU and CUDA kernels agree with each
// other and with the torch reference backend.
#pragma once

#include <cstdint>
#include <cstring>

// Internal linkage (static): the CPU kernels compile this header once per
// instruction set, and an out-of-line copy built for AVX2 must never be
// merged by the linker with the baseline one.
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define INTERP_HD static __host__ __device__ __forceinline__
#else
#define INTERP_HD static inline
#endif

namespace interp {

// 16-bit storage types as plain bit containers: the same layout as
// c10::BFloat16 / c10::Half / __nv_bfloat16 / __half, without depending on
// any of them (the .cu files must build without torch headers).
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// The dtype the kernels compute in: float64 data stays float64, everything
// else computes in float32 (base.compute_dtype).
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

// Dtype codes exchanged between the torch glue and the torch-free kernels.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Bytes per element of the storage type.
INTERP_HD int64_t dtype_bytes(DType d) {
  switch (d) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

// ---------------------------------------------------------------------------
// Scalar conversions. The host versions are the exact IEEE round-to-nearest-even
// bit recipes (the same results as c10's conversions); device code uses the
// hardware instructions.

INTERP_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

INTERP_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

INTERP_HD float to_float(bf16 v) { return bits_as_float(static_cast<uint32_t>(v.bits) << 16); }

INTERP_HD bf16 to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  bf16 out;
  out.bits = __bfloat16_as_ushort(__float2bfloat16_rn(f));
  return out;
#else
  bf16 out;
  if (f != f) {  // NaN: keep it a quiet NaN (truncation could turn it into Inf)
    out.bits = 0x7FC0;
    return out;
  }
  const uint32_t u = float_as_bits(f);
  const uint32_t rounding_bias = ((u >> 16) & 1u) + 0x7FFFu;
  out.bits = static_cast<uint16_t>((u + rounding_bias) >> 16);
  return out;
#endif
}

INTERP_HD float to_float(fp16 v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  // Exponent rebias by a float multiply handles normals, subnormals (via the
  // magic-number path), Inf and NaN without branches on the exponent.
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_as_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_as_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_as_bits(denormalized) : float_as_bits(normalized));
  return bits_as_float(result);
#endif
}

INTERP_HD fp16 to_fp16(float f) {
  fp16 out;
#if defined(__CUDA_ARCH__)
  out.bits = __half_as_ushort(__float2half_rn(f));
#else
  // Scaling up then down makes the FPU do the round-to-nearest-even at the
  // half-precision boundary, including the subnormal range.
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const float abs_f = bits_as_float(float_as_bits(f) & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_as_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_as_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  out.bits = static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  return out;
}

// load<T>: storage -> compute type; store<T>: compute type -> storage (RNE).
INTERP_HD float load_c(const float* p) { return *p; }
INTERP_HD double load_c(const double* p) { return *p; }
INTERP_HD float load_c(const bf16* p) { return to_float(*p); }
INTERP_HD float load_c(const fp16* p) { return to_float(*p); }

INTERP_HD void store_c(float* p, float v) { *p = v; }
INTERP_HD void store_c(double* p, double v) { *p = v; }
INTERP_HD void store_c(bf16* p, float v) { *p = to_bf16(v); }
INTERP_HD void store_c(fp16* p, float v) { *p = to_fp16(v); }

// ---------------------------------------------------------------------------
// The per-element formulas. Templated on the value type so that the CPU
// kernels instantiate them with Vectorized<float> and the CUDA kernels with
// float / double; only +, - and * are used.

// g = sign * grad + weight_decay * param. The decay term is skipped (not
// multiplied by zero) when weight_decay == 0 so that an infinite parameter
// does not turn the gradient into NaN, exactly as the reference does.
template <typename V>
INTERP_HD V effective_grad(const V& grad, const V& param, const V& sign, const V& wd, bool has_wd) {
  V g = grad * sign;
  if (has_wd) g = g + wd * param;
  return g;
}

// The interpolation step from the two weighted sums:
// x_new = sum_j a_j x(age j) - lr * sum_j a_j g(age j).
template <typename V>
INTERP_HD V interpolate(const V& weighted_x, const V& weighted_g, const V& lr) {
  return weighted_x - lr * weighted_g;
}

// The ring convention (base.py): while count == c, the entry of age j lives in
// slot (c - j) mod S; the entry written now goes to slot c mod S. `c` may be
// negative (rna_extrapolate reads relative to count - 1).
INTERP_HD int64_t ring_slot(int64_t c, int64_t age, int64_t slots) {
  int64_t s = (c - age) % slots;
  return s < 0 ? s + slots : s;
}

}  // namespace interp
