// The one dtype switch of the kernels, as flash-attention's static_switch.h:
// runs a lambda with a type alias bound to the storage type of a DType.
//
//   return INTERP_DISPATCH_DTYPE(p.dtype, T, cudaErrorInvalidValue, [&] { return run<T>(p); });
//
// T is float, double, interp::bf16 or interp::fp16; a value outside DType
// returns FALLBACK (write `void()` for a void lambda). Host code only (it
// expands to a lambda called in place), torch-free.
#pragma once

#include "interp_math.h"

#define INTERP_DISPATCH_DTYPE(DTYPE, T, FALLBACK, ...) \
  [&] {                                                \
    switch (DTYPE) {                                   \
      case ::interp::DType::kFloat32: {                \
        using T = float;                               \
        return __VA_ARGS__();                          \
      }                                                \
      case ::interp::DType::kFloat64: {                \
        using T = double;                              \
        return __VA_ARGS__();                          \
      }                                                \
      case ::interp::DType::kBFloat16: {               \
        using T = ::interp::bf16;                      \
        return __VA_ARGS__();                          \
      }                                                \
      case ::interp::DType::kFloat16: {                \
        using T = ::interp::fp16;                      \
        return __VA_ARGS__();                          \
      }                                                \
    }                                                  \
    return FALLBACK;                                   \
  }()
