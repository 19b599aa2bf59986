// The CPU kernels, written once against at::vec::Vectorized and compiled once
// per instruction set: the index of the per-op headers, their dtype dispatch
// and this instruction set's kernel table. Include this only from a
// kernels_<isa>.cpp file, after CPU_CAPABILITY (and the matching
// CPU_CAPABILITY_<ISA> macro) is defined.
//
//   simd.h          IO<S>, non-temporal stores, float64 dot accumulation, dot_groups
//   sr_simd.h       stochastic rounding of a vector step (AVX-512, AVX2, baseline)
//   gram_row_impl.h gram_row, and gram_row_dots (also combine's k > kDotGroup dot pass)
//   combine_impl.h  combine (with its Gram row fused for k <= kDotGroup)
//   rna_impl.h      rna_record (copy + residual dots), rna_extrapolate
//
// Everything lives in an anonymous namespace: the same template compiled for
// AVX2 and for the baseline must never be merged by the linker into one copy
// (that would run AVX2 code on a machine without it, or lose the vector code).
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include "../dispatch.h"
#include "combine_impl.h"
#include "cpu_kernels.h"
#include "gram_row_impl.h"
#include "rna_impl.h"

namespace interp::cpu {
namespace {

// With master weights the rings are float32 and the segments 16-bit.
void combine_entry(const CombineArgs& a, int64_t c0, int64_t c1) {
  if (a.master != nullptr) {
    if (a.param_dtype == DType::kBFloat16) combine_impl<float, bf16>(a, c0, c1);
    if (a.param_dtype == DType::kFloat16) combine_impl<float, fp16>(a, c0, c1);
    return;
  }
  INTERP_DISPATCH_DTYPE(a.dtype, S, void(), [&] { combine_impl<S, S>(a, c0, c1); });
}
void gram_row_entry(const GramArgs& a, int64_t c0, int64_t c1) {
  if (a.master != nullptr) {
    if (a.param_dtype == DType::kBFloat16) gram_row_impl<float, bf16>(a, c0, c1);
    if (a.param_dtype == DType::kFloat16) gram_row_impl<float, fp16>(a, c0, c1);
    return;
  }
  INTERP_DISPATCH_DTYPE(a.dtype, S, void(), [&] { gram_row_impl<S, S>(a, c0, c1); });
}
void rna_record_entry(const RecordArgs& a, int64_t c0, int64_t c1) {
  INTERP_DISPATCH_DTYPE(a.dtype, S, void(), [&] { rna_record_impl<S>(a, c0, c1); });
}
void rna_extrapolate_entry(const ExtrapArgs& a, int64_t c0, int64_t c1) {
  INTERP_DISPATCH_DTYPE(a.dtype, S, void(), [&] { rna_extrapolate_impl<S>(a, c0, c1); });
}

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
