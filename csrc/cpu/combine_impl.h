// The combine kernel of the CPU (one copy per instruction set, see
// kernels_impl.h).
//
// Memory traffic is one pass: each element is loaded once. The Gram row is
// accumulated during the update itself when it fits one register group (k <=
// kDotGroup); a longer one needs a read-only gram_row pass over the chunk
// first (the update must not clobber what the dots read). Measured: an
// interleaved second pass over an L2-sized chunk costs nearly as much as the
// update itself, hence the fused path for the common small k.
#pragma once

#ifndef CPU_CAPABILITY
#error "include kernels_impl.h (after defining CPU_CAPABILITY), not this header"
#endif

#include "gram_row_impl.h"
#include "simd.h"
#include "sr_simd.h"

namespace interp::cpu {
namespace {

// What the update of one chunk needs, resolved for that chunk. P: the
// param's and gradient's storage type, S's unless the params have float32
// masters (S float, P 16-bit): then `m` is the chunk's masters, age 0 of the
// iterate, and `p` is only written.
template <typename S, typename P = S>
struct CombineChunk {
  using C = typename IO<S>::C;
  P* p;
  const P* g;
  S* m;                       // masters (P != S only)
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
// the same pass, and written to dots[0..k). SR (16-bit P only): the new param
// (and, without a master, the gradient slot) is rounded stochastically; the
// dots use the unrounded gradient. P != S: master weights (CombineChunk): the
// float32 math is the S = P = float kernel's, op for op, on the master and the
// gradient widened exactly, so master, rings and dots are bitwise the same.
template <typename S, int KK, bool DOTS, bool SR, typename P = S>
INTERP_FLATTEN void combine_update(const CombineChunk<S, P>& u, int k_runtime, double* dots) {
  using C = typename IO<S>::C;
  using V = typename IO<S>::V;
  constexpr int64_t W = IO<S>::W;
  constexpr bool kMaster = !std::is_same_v<S, P>;
  static_assert(IO<S>::W == IO<P>::W, "one step loads as many params as ring entries");
  const S* x_src;
  if constexpr (kMaster) {
    x_src = u.m;
  } else {
    x_src = u.p;
  }
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
    IO<S>::load(x_src + e, x_lo, x_hi);
    V ax_lo = x_lo * a0, ax_hi = x_hi * a0;
    V g_lo, g_hi;
    IO<P>::load(u.g + e, g_lo, g_hi);
    g_lo = effective_grad(g_lo, x_lo, signv, wdv, u.has_wd);
    g_hi = effective_grad(g_hi, x_hi, signv, wdv, u.has_wd);
    V ag_lo = g_lo * a0, ag_hi = g_hi * a0;
    // g0 widened to float64 once for all k dots.
    std::decay_t<decltype(widen(g_lo))> w_lo{}, w_hi{};
    if constexpr (DOTS) {
      w_lo = widen(g_lo);
      w_hi = widen(g_hi);
      fma64(acc[0], w_lo, w_lo);
      fma64(acc[0], w_hi, w_hi);
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
      if constexpr (DOTS) {
        fma64(acc[j], w_lo, widen(h_lo));
        fma64(acc[j], w_hi, widen(h_hi));
      }
    }
    // The write slots are the oldest entries, read above: store only now.
    if (u.xw) IO<S>::store(u.xw + e, x_lo, x_hi);
    const V new_lo = interpolate(ax_lo, ag_lo, lrv), new_hi = interpolate(ax_hi, ag_hi, lrv);
    if constexpr (kMaster) IO<S>::store(u.m + e, new_lo, new_hi);
    if constexpr (SR) {
      const ColHash h = col_hash(u.col + e);
      if constexpr (kMaster) {
        if (u.gw) IO<S>::store(u.gw + e, g_lo, g_hi);  // a float32 ring: nothing to round
      } else {
        if (u.gw) sr_store_step(u.gw + e, g_lo, g_hi, h, u.key_g);
      }
      sr_store_step(u.p + e, new_lo, new_hi, h, u.key_p);
    } else {
      if (u.gw) IO<S>::store(u.gw + e, g_lo, g_hi);
      IO<P>::store(u.p + e, new_lo, new_hi);
    }
  }
  for (; e < u.len; ++e) {
    const C x = load_c(x_src + e);
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
    const C x_new = interpolate(ax, ag, u.lr);
    if constexpr (kMaster) store_c(u.m + e, x_new);
    if constexpr (SR) {
      const uint32_t h = sr_col_hash(u.col + e);
      if constexpr (kMaster) {
        if (u.gw) store_c(u.gw + e, g0);
      } else {
        if (u.gw) sr_store(u.gw + e, g0, sr_random(h, u.key_g));
      }
      sr_store(u.p + e, x_new, sr_random(h, u.key_p));
    } else {
      if (u.gw) store_c(u.gw + e, g0);
      store_c(u.p + e, x_new);
    }
  }
  if (DOTS) {
    for (int d = 0; d < k; ++d) dots[d] = acc_sum(acc[d]) + tail[d];
  }
}

template <typename S, typename P>
using UpdateFn = void (*)(const CombineChunk<S, P>&, int, double*);

// The update kernel for this k (fixed for k <= 3) and this Gram mode.
template <typename S, typename P, bool SR>
UpdateFn<S, P> pick_update(int k, bool fused_dots) {
  if (k <= 3) {
    const UpdateFn<S, P> fixed[2][3] = {
        {&combine_update<S, 1, false, SR, P>, &combine_update<S, 2, false, SR, P>,
         &combine_update<S, 3, false, SR, P>},
        {&combine_update<S, 1, true, SR, P>, &combine_update<S, 2, true, SR, P>, &combine_update<S, 3, true, SR, P>}};
    return fixed[fused_dots][k - 1];
  }
  return fused_dots ? &combine_update<S, 0, true, SR, P> : &combine_update<S, 0, false, SR, P>;
}

// P: the params' storage type (S, or 16-bit with float32 masters: a.master).
template <typename S, typename P = S>
void combine_impl(const CombineArgs& a, int64_t c0, int64_t c1) {
  using C = typename IO<S>::C;
  constexpr bool kMaster = !std::is_same_v<S, P>;
  const int k = a.k;
  C coef[kMaxSlots];
  for (int j = 0; j < k; ++j) coef[j] = static_cast<C>(a.coefs[j]);
  // With k <= kDotGroup the Gram row rides along with the update;
  // a longer row is computed by a read-only pass over the chunk first.
  const bool fused_dots = a.partials != nullptr && k <= kDotGroup;
  UpdateFn<S, P> update = pick_update<S, P, false>(k, fused_dots);
  if constexpr (kSixteenBit<P>) {
    if (a.sr_seed.set) update = pick_update<S, P, true>(k, fused_dots);
  }

  const S* xh[kMaxSlots];
  const S* gh[kMaxSlots];
  CombineChunk<S, P> u{};
  u.xh = xh;
  u.gh = gh;
  u.coef = coef;
  u.lr = static_cast<C>(*a.lr);
  // The sign and GradScaler's unscaling in one factor (-1 times a power of
  // two: grad * sign is exactly -(grad / scale)).
  u.sign = static_cast<C>((a.maximize ? -1.0 : 1.0) * a.grad_mul);
  u.wd = static_cast<C>(a.weight_decay);
  u.has_wd = a.weight_decay != 0.0;
  u.key_p = a.key_param;
  u.key_g = a.key_grad;
  // The read-only pass of a long Gram row takes exact16 products where they
  // are exact (gram_row_impl.h). The fused row keeps widened ones: this pass
  // streams 7 arrays and hides its conversions, and a non-finite exact16 row
  // could not be recomputed after the update overwrote the oldest ring slot.
  const bool exact = !fused_dots && !kMaster && exact16<S>(a.weight_decay, u.sign);
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = a.chunks[c];
    const Seg& sg = a.segs[ch.seg];
    const int64_t off = sg.col + ch.begin;
    u.len = ch.len;
    u.col = off;
    u.p = static_cast<P*>(sg.a) + ch.begin;
    u.g = static_cast<const P*>(sg.b) + ch.begin;
    if constexpr (kMaster) u.m = a.master + off;
    for (int j = 1; j < k; ++j) xh[j] = at_col<S>(a.x_rows[j], off);
    for (int j = 1; j < k; ++j) gh[j] = at_col<S>(a.g_rows[j], off);
    u.xw = a.x_write ? at_col<S>(a.x_write, off) : nullptr;
    u.gw = a.g_write ? at_col<S>(a.g_write, off) : nullptr;

    if (a.partials && !fused_dots) {
      // <g0, g(age j)>, j = 0..k-1, before anything in the chunk changes. The
      // update then re-reads the chunk, mostly from cache: a second pass that
      // only a Gram row longer than one register group (k > 8) pays.
      const S* x0;  // age 0 of the iterate (the weight decay's operand)
      if constexpr (kMaster) {
        x0 = u.m;
      } else {
        x0 = u.p;
      }
      gram_row_chunk<S, P>(x0, u.g, u.len, gh, k, u.sign, u.wd, u.has_wd, exact, nullptr, a.partials + c * k);
    }
    update(u, k, fused_dots ? a.partials + c * k : nullptr);
  }
}

}  // namespace
}  // namespace interp::cpu
