// The four bucket ops of interpolatron/backends/base.py in raw pointers: one
// argument struct per op, filled once by the bindings from the op's Python
// argument object (CombineArgs, GramArgs, RecordArgs, ExtrapArgs) or by the
// simulator harness from a case file, and taken whole by the CPU launcher
// (whose kernel arguments derive from it, cpu/cpu_kernels.h) and the CUDA
// launch layer (whose kernel launch structs derive from it, cuda/kernels.h).
// No torch and no CUDA header: every translation unit (nvcc, the per-ISA CPU
// kernels, a test program) can include it.
//
// Pointers point into the bucket's device memory (host memory for CPU
// buckets); the scalars a step changes (coefs, lr, count, GradScaler's
// inputs) are pointers too, read by the kernels, so that a CUDA launch needs
// no host synchronisation and replays in a CUDA graph with new values. Ring
// buffers are contiguous (slots, row_elems) arrays of the bucket's dtype; the
// entry of age j lives in slot (count - j) mod slots (interp_math.h ring_slot).
#pragma once

#include <cstdint>

#include "interp_math.h"

// Member functions the kernels call on both sides.
#if defined(__CUDACC__)
#define INTERP_HD_METHOD __host__ __device__ __forceinline__
#else
#define INTERP_HD_METHOD inline
#endif

namespace interp {

// One active tensor of a bucket: dense, of the bucket's dtype, its elements
// in storage order mapped to the ring columns [col, col + numel).
struct Seg {
  void* a;        // param (combine, gram_row), source (rna_record), out (rna_extrapolate)
  const void* b;  // grad (combine, gram_row), else nullptr
  int64_t numel;
  int64_t col;  // first ring column
};

// An optional 32-bit seed: Python's None (set = false) or an int taken mod
// 2^32, as interpolatron.rounding takes a seed.
struct Seed {
  bool set;
  uint32_t value;
};

// ---------------------------------------------------------------------------
// The host scalars of each op (the schema's float, bool and optional int
// arguments), listed once as X(type, name), `name` being the attribute of the
// op's Python argument object. The structs below declare them from these
// lists, and every conversion into a struct walks the list through
// for_each_scalar: the bindings read each one from the Python object by name
// (bindings.cpp), the simulator harness from its case file by name
// (tools/gpusim/harness.cpp). A new scalar is therefore one line here, its
// field of the Python argument object, and the kernels that read it.
// Types: double, bool, Seed.

// The effective gradient's scalars (base.py), which combine and gram_row
// share: the combine's Gram dot pass on CUDA copies them whole (cuda/launch.cpp).
#define INTERP_GRAD_SCALARS(X) \
  X(double, weight_decay)      \
  X(bool, maximize)

#define INTERP_COMBINE_SCALARS(X) \
  INTERP_GRAD_SCALARS(X)          \
  X(Seed, sr_seed)

#define INTERP_GRAM_ROW_SCALARS(X) \
  INTERP_GRAD_SCALARS(X)           \
  X(bool, store)

#define INTERP_RECORD_SCALARS(X)
#define INTERP_EXTRAP_SCALARS(X)

#define INTERP_DECLARE_SCALAR(type, name) type name;
#define INTERP_VISIT_SCALAR(type, name) f(#name, op.name);
// for_each_scalar(op, f): f(name, field) for each scalar of the op, in list order.
#define INTERP_SCALAR_VISITOR(Op, LIST)               \
  template <typename F>                               \
  void for_each_scalar(Op& op, F&& f) {               \
    (void)op;                                         \
    (void)f;                                          \
    LIST(INTERP_VISIT_SCALAR)                         \
  }                                                   \
  template <typename F>                               \
  void for_each_scalar(const Op& op, F&& f) {         \
    (void)op;                                         \
    (void)f;                                          \
    LIST(INTERP_VISIT_SCALAR)                         \
  }

// x = sum_j a_j x(age j) - lr * sum_j a_j g(age j), age 0 being the param and
// the effective gradient g0 = sign * grad / grad_scale + weight_decay * param;
// the old param and g0 then replace the oldest ring entries. With `gram`,
// also <g0, g(age j)>, j = 0..k-1 (float64, layout-invariant).
//
// Master weights (`master` set): the segments are 16-bit (`param_dtype`), the
// rings float32 (`dtype`), and age 0 of the iterate is the float32 master
// (row_elems floats in the rings' columns), not the param: the op reads the
// master and the 16-bit gradient (weight decay on the master) and writes the
// new master, the rings and the param = the new master rounded to nearest
// even (stochastically with `sr_seed`, stream 1; the float32 g ring is not
// rounded). The param is never read. The float32 math is that of a float32
// bucket holding the masters and the upcast gradients, op for op.
struct CombineOp {
  DType dtype;        // the rings' dtype (and the segments' without a master)
  DType param_dtype;  // the segments' dtype: dtype, or bf16/fp16 with a master
  int k;              // coefficients (1..cpu::kMaxSlots); each ring has k - 1 slots
  void* x_ring;       // (k - 1, row_elems)
  void* g_ring;       // (k - 1, row_elems)
  int64_t row_elems;
  const double* coefs;   // k, coefs[j] weighs age j
  const double* lr;      // 1
  const int64_t* count;  // 1
  // GradScaler's fused contract: the gradient is divided by *grad_scale; a
  // nonzero *found_inf skips the op (nothing written, gram included). Each
  // one element, or nullptr.
  const float* grad_scale;
  const float* found_inf;
  double* gram;  // k entries at gram[j * gram_stride], or nullptr
  int64_t gram_stride;
  float* master;  // row_elems float32 masters (ring columns), or nullptr
  // weight_decay, maximize; sr_seed: stochastic rounding of the 16-bit writes
  // (the new param, the gradient slot; stochastic_rounding.h), 32/64-bit data
  // ignores it.
  INTERP_COMBINE_SCALARS(INTERP_DECLARE_SCALAR)
};
INTERP_SCALAR_VISITOR(CombineOp, INTERP_COMBINE_SCALARS)

// <g0, g(age j)>, j = 0..ndots()-1, g0 the effective gradient as in combine.
// store: the ring's `slots` slots hold ages 0..slots-1 (g0 is written to slot
// count mod slots first, ndots == slots); read-only: they hold ages 1..slots,
// nothing is written, ndots == slots + 1.
struct GramRowOp {
  DType dtype;        // the ring's dtype
  DType param_dtype;  // the segments' dtype (16-bit with a master, else dtype)
  void* g_ring;       // (slots, row_elems)
  int slots;
  int64_t row_elems;
  const int64_t* count;     // 1
  const float* grad_scale;  // as in CombineOp
  const float* found_inf;
  double* out;  // ndots() entries at out[j * out_stride]
  int64_t out_stride;
  // Master weights (as CombineOp; read-only ops only): the float32 masters
  // (ring columns) the weight decay reads instead of the params, or nullptr.
  const float* master;
  INTERP_GRAM_ROW_SCALARS(INTERP_DECLARE_SCALAR)  // weight_decay, maximize, store
  INTERP_HD_METHOD int ndots() const { return store ? slots : slots + 1; }
};
INTERP_SCALAR_VISITOR(GramRowOp, INTERP_GRAM_ROW_SCALARS)

// Copies the sources into slot count mod slots of the window; with `out`,
// also the residual dots <r_0, r_j>, j = 0..slots-2, r_j = y(age j) - y(age
// j + 1), y(age 0) the sources.
struct RecordOp {
  DType dtype;
  void* window;  // (slots, row_elems)
  int slots;
  int64_t row_elems;
  const int64_t* count;  // 1
  double* out;           // slots - 1 entries at out[j * out_stride], or nullptr
  int64_t out_stride;
  INTERP_RECORD_SCALARS(INTERP_DECLARE_SCALAR)
  INTERP_HD_METHOD int ndots() const { return out != nullptr ? slots - 1 : 0; }
};
INTERP_SCALAR_VISITOR(RecordOp, INTERP_RECORD_SCALARS)

// outs = sum_a coefs[a] * y(age a), a = 0..m-1, y(age a) in slot
// (count - 1 - a) mod slots of the window (the newest snapshot is age 0).
struct ExtrapOp {
  DType dtype;
  void* window;  // (slots, row_elems)
  int slots;
  int64_t row_elems;
  int m;                 // 1 <= m <= slots
  const double* coefs;   // m
  const int64_t* count;  // 1
  INTERP_EXTRAP_SCALARS(INTERP_DECLARE_SCALAR)
};
INTERP_SCALAR_VISITOR(ExtrapOp, INTERP_EXTRAP_SCALARS)

}  // namespace interp
