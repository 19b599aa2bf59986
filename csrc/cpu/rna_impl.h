// The RNA kernels of the CPU (one copy per instruction set, see
// kernels_impl.h): record (a copy into the window, with the residual dots)
// and extrapolate (a weighted sum of the window's snapshots).
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include "simd.h"

namespace interp::cpu {
namespace {

// ---------------------------------------------------------------------------
// rna_record

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
    const auto w_lo = widen(r0_lo);  // r_0 widened to float64 once for all ND dots
    const auto w_hi = widen(r0_hi);
    V prev_lo, prev_hi;
    IO<S>::load(snaps[0] + e, prev_lo, prev_hi);
    for (int d = 0; d < ND; ++d) {
      V next_lo, next_hi;
      IO<S>::load(snaps[d + 1] + e, next_lo, next_hi);
      fma64(acc[d], w_lo, widen(prev_lo - next_lo));
      fma64(acc[d], w_hi, widen(prev_hi - next_hi));
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
  const int ndots = a.ndots();
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Seg& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    const S* y0 = static_cast<const S*>(sg.a) + ch.begin;
    if (ndots > 0) {
      snaps[0] = y0;
      for (int j = 1; j <= ndots; ++j) snaps[j] = at_col<S>(a.rows[j], off);
      dot_groups(ndots, a.partials + c * ndots, [&](auto nd, int d0, double* out) {
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
    const Seg& sg = a.segs[ch.seg];
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

}  // namespace
}  // namespace interp::cpu
