// The gram_row kernel of the CPU (one copy per instruction set, see
// kernels_impl.h): the dots of the effective gradient with the ring, one
// chunk at a time; combine reuses gram_row_dots for a Gram row longer than
// one register group.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include <cmath>
#include <type_traits>

#include "simd.h"

namespace interp::cpu {
namespace {

// How a dot reaches float64, and why it is layout-invariant
// ----------------------------------------------------------
// A dot <a, b> over a bucket is cut into pieces nobody chooses for it: the
// kChunk-element chunks of each tensor here, thread blocks on CUDA, and in
// sharded training the shards, whose boundaries fall anywhere in a tensor.
// Inside a piece an element's vector lane is its offset from the piece's
// start, and the scalar tail is wherever the piece ends. Which elements are
// summed together, and in which order, therefore depends on the layout; what
// does not is each element's own product. Hence the rule every kernel keeps:
// an element's product is a function of its two values alone, and every sum
// (lanes, tail, chunk partials, blocks, ranks) is a float64 sum. Two layouts
// then differ by float64 rounding of the sums only (relative to sum |a_i b_i|;
// the distributed tests hold the coefficients to 1e-14). A float32 sum of
// even two products would break it: its rounding depends on which neighbour
// shares the lane.
//
// The products, exact either way:
// - widened (any data): both factors converted to float64 and multiplied
//   there (fused into the sum); a float32 x float32 product has at most 48
//   significant bits, float64 holds 53. One conversion per value, shared by
//   every dot the value enters.
// - exact16 (16-bit data, no weight decay, a power-of-two sign): g0 = grad *
//   sign and the ring entries are 16-bit values times powers of two (8
//   significant bits for bfloat16, 11 for float16), so their float32 product
//   (16 / 22 bits) is exact; it is converted once and added in float64. No
//   float64 multiply, one dependent add per dot per step instead of two fused
//   multiply-adds. float16 values times 2^-40..2^40 multiply inside float32's
//   range. bfloat16 spans float32's exponent range, so g0 is scaled by 2^64
//   before the products and the chunk's sums by 2^-64 after (both exact):
//   products from 2^-190 to 2^64 in magnitude are exact; a larger one (or
//   |g0| >= 2^64) overflows, the chunk's dots come out non-finite and the
//   chunk is recomputed widened; a smaller one (e.g. both factors below
//   2^-95) is rounded to float32's subnormal grid, at most 2^-214 off, the
//   same in the vector body and the tail (still a function of the element
//   alone, so invariance holds). It matters only to a dot whose products are
//   all that small, and the gradients it would steer move no bfloat16
//   parameter larger than ~2^-80 (their updates are below its half ulp).
// The conversions bound a 16-bit pass on AVX2: measured on Zen 3 (one thread,
// 16M elements, CPU time) exact16 costs 1.2-1.25x the float32 accumulation
// before D3, the widened products with weight decay 1.0-1.1x (D3 as first
// written: 2.0-2.2x).
template <typename S>
constexpr float kExactUp = std::is_same_v<S, bf16> ? 0x1p64f : 1.0f;
template <typename S>
constexpr double kExactDown = std::is_same_v<S, bf16> ? 0x1p-64 : 1.0;

// Whether this call's products qualify for exact16 (see above).
template <typename S>
bool exact16(double weight_decay, float sign) {
  if constexpr (!kSixteenBit<S>) {
    return false;
  } else {
    int e = 0;
    return weight_decay == 0.0 && std::frexp(std::fabs(sign), &e) == 0.5f && e >= -39 && e <= 41;
  }
}

// Dots of the effective gradient g0 against ND vectors, over one chunk. SELF:
// dot 0 is <g0, g0> (others[0] unused) and dots 1..ND-1 read others[1..];
// else all ND read others[]. STORE (with SELF): g0 is also stored to `write`
// (gram_row's ring slot, never one of `others`); without it the lanes may be
// loaded in any order (IO::load_unordered), the same for every operand.
// EXACT: the exact16 products (16-bit S, no weight decay; the caller checks
// exact16 and recomputes a non-finite result without EXACT). G: the gradient's
// storage type, S's unless the params have float32 masters (S float, G
// 16-bit, `p` the masters): every lane then stays in order, as S's loads.
template <typename S, int ND, bool SELF, bool EXACT, bool STORE, typename G = S>
INTERP_FLATTEN void gram_row_dots(const S* p, const G* g, int64_t len, const S* const* others,
                                  typename IO<S>::C sign, typename IO<S>::C wd, bool has_wd, S* write,
                                  double* out) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  constexpr int D0 = SELF ? 1 : 0;  // first dot that reads others[]
  constexpr bool kOrdered = STORE || !std::is_same_v<S, G>;
  static_assert(!EXACT || (kSixteenBit<S> && std::is_same_v<S, G>), "exact16 products are for 16-bit data");
  static_assert(SELF || !STORE, "only the first dot group stores g0");
  static_assert(IO<S>::W == IO<G>::W, "one step loads as many gradients as ring entries");
  const auto load = [](const auto* q, V& lo, V& hi) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(q)>>;
    if constexpr (kOrdered) {
      IO<T>::load(q, lo, hi);
    } else {
      IO<T>::load_unordered(q, lo, hi);
    }
  };
  const bool wd_on = !EXACT && has_wd;
  const V signv(sign), wdv(wd);
  // Local copies: the stores through `write` could alias others[] for the
  // compiler, which then reloaded every pointer every step.
  const S* o[ND];
  for (int d = D0; d < ND; ++d) o[d] = others[d];
  // Widened: two float64 accumulators per dot (the low and high halves of a
  // float vector), fused multiply-adds: four per dot spilled the AVX2 register
  // file at two dots (stack stores every iteration: bf16 gram_row 3x slower).
  // exact16: acc[d][0] only, one add of the step's products per dot.
  VD acc[ND][2];
  for (int d = 0; d < ND; ++d) acc[d][0] = acc[d][1] = VD(0.0);
  const V zero(C(0));
  [[maybe_unused]] const V up(C(kExactUp<S>));
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V g_lo, g_hi, x_lo = zero, x_hi = zero;
    load(g + e, g_lo, g_hi);
    if (wd_on) load(p + e, x_lo, x_hi);
    g_lo = effective_grad(g_lo, x_lo, signv, wdv, wd_on);
    g_hi = effective_grad(g_hi, x_hi, signv, wdv, wd_on);
    if constexpr (STORE) IO<S>::store_nt(write + e, g_lo, g_hi);
    if constexpr (EXACT) {
      const V s_lo = kExactUp<S> == 1.0f ? g_lo : g_lo * up;
      const V s_hi = kExactUp<S> == 1.0f ? g_hi : g_hi * up;
      // The step's products of one dot, widened and summed in float64.
      const auto add = [](VD& a, const V& p_lo, const V& p_hi) {
        const Wide l = widen(p_lo), h = widen(p_hi);
        a = a + ((l.lo + l.hi) + (h.lo + h.hi));
      };
      if constexpr (SELF) add(acc[0][0], s_lo * g_lo, s_hi * g_hi);
      for (int d = D0; d < ND; ++d) {
        V o_lo, o_hi;
        load(o[d] + e, o_lo, o_hi);
        add(acc[d][0], s_lo * o_lo, s_hi * o_hi);
      }
    } else {
      // Each value widened once, whatever the number of dots it enters.
      const auto w_lo = widen(g_lo);
      const auto w_hi = widen(g_hi);
      if constexpr (SELF) {
        fma64(acc[0], w_lo, w_lo);
        fma64(acc[0], w_hi, w_hi);
      }
      for (int d = D0; d < ND; ++d) {
        V o_lo, o_hi;
        load(o[d] + e, o_lo, o_hi);
        fma64(acc[d], w_lo, widen(o_lo));
        fma64(acc[d], w_hi, widen(o_hi));
      }
    }
  }
  double tail[ND];
  for (int d = 0; d < ND; ++d) tail[d] = 0.0;
  for (; e < len; ++e) {
    const C x = wd_on ? load_c(p + e) : C(0);
    const C g0 = effective_grad(load_c(g + e), x, sign, wd, wd_on);
    if constexpr (STORE) store_c(write + e, g0);
    if constexpr (EXACT) {
      const C s0 = g0 * C(kExactUp<S>);  // the vector body's products, one element at a time
      if constexpr (SELF) tail[0] += static_cast<double>(s0 * g0);
      for (int d = D0; d < ND; ++d) tail[d] += static_cast<double>(s0 * load_c(o[d] + e));
    } else {
      if constexpr (SELF) tail[0] += static_cast<double>(g0) * static_cast<double>(g0);
      for (int d = D0; d < ND; ++d) tail[d] += static_cast<double>(g0) * static_cast<double>(load_c(o[d] + e));
    }
  }
  for (int d = 0; d < ND; ++d) {
    if constexpr (EXACT) {
      out[d] = (lane_sum(acc[d][0]) + tail[d]) * kExactDown<S>;
    } else {
      out[d] = acc_sum(acc[d]) + tail[d];
    }
  }
}

// <g0, g(age j)> for j = 0..ndots-1 over one chunk in register groups of
// kDotGroup: others[j] is the row of age j (others[0] unused: age 0 is g0
// itself); the first group also stores g0 into `write` if given (a slot no
// dot reads). exact: the caller checked exact16; a group whose exact16 dots
// are not all finite (a bfloat16 product overflowed, or the data hold an Inf
// or NaN) is recomputed widened, so it ends as it would have without exact16.
template <typename S, typename G = S>
void gram_row_chunk(const S* p, const G* g, int64_t len, const S* const* others, int ndots, typename IO<S>::C sign,
                    typename IO<S>::C wd, bool has_wd, bool exact, S* write, double* out) {
  dot_groups(ndots, out, [&](auto nd, int d0, double* group_out) {
    constexpr int ND = decltype(nd)::value;
    // One group: its first dot is <g0, g0> iff d0 == 0; it stores g0 iff d0 == 0 and `store`.
    const auto run = [&](auto exact_products, bool store) {
      constexpr bool X = decltype(exact_products)::value;
      if (d0 != 0) {
        gram_row_dots<S, ND, false, X, false, G>(p, g, len, others + d0, sign, wd, has_wd, nullptr, group_out);
      } else if (store) {
        gram_row_dots<S, ND, true, X, true, G>(p, g, len, others, sign, wd, has_wd, write, group_out);
      } else {
        gram_row_dots<S, ND, true, X, false, G>(p, g, len, others, sign, wd, has_wd, nullptr, group_out);
      }
    };
    if constexpr (kSixteenBit<S> && std::is_same_v<S, G>) {
      if (exact) {
        run(std::true_type{}, write != nullptr);
        bool finite = true;
        for (int d = 0; d < ND; ++d) finite = finite && std::isfinite(group_out[d]);
        if (finite) return;
        run(std::false_type{}, false);  // g0 is stored already
        return;
      }
    }
    run(std::false_type{}, write != nullptr);
  });
}

// G: the gradients' storage type; G != S (16-bit gradients, float32 ring) is
// master weights, whose weight decay reads the masters (a.master).
template <typename S, typename G = S>
void gram_row_impl(const GramArgs& a, int64_t c0, int64_t c1) {
  using C = typename IO<S>::C;
  constexpr bool kMaster = !std::is_same_v<S, G>;
  const int k = a.ndots();
  const C sign = static_cast<C>((a.maximize ? -1.0 : 1.0) * a.grad_mul);
  const C wd = static_cast<C>(a.weight_decay);
  const bool has_wd = a.weight_decay != 0.0;
  const bool exact = !kMaster && exact16<S>(a.weight_decay, sign);
  const S* others[kMaxSlots];
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Seg& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    const S* p = nullptr;
    if constexpr (kMaster) {
      p = a.master + off;
    } else {
      p = static_cast<const S*>(sg.a) + ch.begin;
    }
    const G* g = static_cast<const G*>(sg.b) + ch.begin;
    others[0] = nullptr;
    for (int j = 1; j < k; ++j) others[j] = at_col<S>(a.g_rows[j], off);
    S* gw = a.g_write ? at_col<S>(a.g_write, off) : nullptr;
    gram_row_chunk<S, G>(p, g, ch.len, others, k, sign, wd, has_wd, exact, gw, a.partials + c * k);
  }
  stream_fence();
}

}  // namespace
}  // namespace interp::cpu
