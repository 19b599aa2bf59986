// The gram_row kernel of the CPU (one copy per instruction set, see
// kernels_impl.h): the dots of the effective gradient with the ring, one
// chunk at a time; combine reuses gram_row_dots for a Gram row longer than
// one register group.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include "simd.h"

namespace interp::cpu {
namespace {

// Dots of the effective gradient against ND other vectors, over one chunk.
// others[d] == nullptr stands for the effective gradient itself (<g0, g0>).
// If `write` is set, the effective gradient is also stored there (gram_row's
// ring slot, never one of `others`).
template <typename S, int ND>
INTERP_FLATTEN void gram_row_dots(const S* p, const S* g, int64_t len, const S* const* others,
                                  typename IO<S>::C sign, typename IO<S>::C wd, bool has_wd, S* write, double* out) {
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
    const Seg& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    const S* p = static_cast<const S*>(sg.a) + ch.begin;
    const S* g = static_cast<const S*>(sg.b) + ch.begin;
    others[0] = nullptr;
    for (int j = 1; j < k; ++j) others[j] = at_col<S>(a.g_rows[j], off);
    S* gw = a.g_write ? at_col<S>(a.g_write, off) : nullptr;
    // The first group also stores g0: its slot is not among the ones read.
    dot_groups(k, a.partials + c * k, [&](auto nd, int d0, double* out) {
      gram_row_dots<S, decltype(nd)::value>(p, g, ch.len, others + d0, sign, wd, has_wd, d0 == 0 ? gw : nullptr,
                                            out);
    });
  }
  stream_fence();
}

}  // namespace
}  // namespace interp::cpu
