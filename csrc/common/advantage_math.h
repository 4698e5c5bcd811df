// Per-element and per-row math of the advantage estimators (docs/math.md#advantages), shared by
// the C++ CPU kernels and the CUDA kernels so both compute the same formula.
// Everything is accumulated and evaluated in double; scores are fp32 or fp64.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "common/host_device.h"
#if !defined(__CUDACC__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastalign {
namespace adv {

// Columns of the [B, kStats] statistics buffer (one row per group id; groups <= B).
enum Stat : int { kCount = 0, kMean = 1, kStd = 2, kMax = 3, kSecond = 4, kWMean = 5, kStats = 6 };

// How a score becomes an advantage once its group statistics are known.
enum Mode : int {
  kCenter = 0,  // r - mean                                 (grpo, gpg, reinforce_pp_baseline)
  kRloo = 1,    // n / (n - 1) (r - mean) = r - mean(others)
  kOpo = 2,     // r - sum L r / sum L                      (length-weighted baseline)
  kPassk = 3,   // r == max ? max - second : 0              (grpo_passk)
};

FASTALIGN_HD bool is_nan(double x) { return x != x; }

// Running top-2 (largest value, largest of the rest; duplicates count twice).
// dmax/dmin are single maxsd/minsd instructions: branch-free (scores are often 0/1, a branch would
// mispredict). x is never NaN here.
#if defined(__CUDACC__) || !defined(__SSE2__)
FASTALIGN_HD double dmax(double a, double b) { return fmax(a, b); }
FASTALIGN_HD double dmin(double a, double b) { return fmin(a, b); }
#else  // GCC turns `a > b ? a : b` chains back into branches; the intrinsics pin maxsd/minsd
inline double dmax(double a, double b) { return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b))); }
inline double dmin(double a, double b) { return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(a), _mm_set_sd(b))); }
#endif

FASTALIGN_HD void top2_push(double x, double& m1, double& m2) {
  m2 = dmax(m2, dmin(x, m1));
  m1 = dmax(m1, x);
}

FASTALIGN_HD void top2_merge(double b1, double b2, double& m1, double& m2) {
  m2 = dmax(dmax(m2, b2), dmin(m1, b1));
  m1 = dmax(m1, b1);
}

// Running sums of one group's non-NaN scores (in a fixed order).
struct GroupAcc {
  double n = 0, sum = 0, lsum = 0, lxsum = 0;
  double m1 = -HUGE_VAL, m2 = -HUGE_VAL, mn = HUGE_VAL;
  FASTALIGN_HD void push(double x, double len) {
    n += 1.0;
    sum += x;
    lsum += len;
    lxsum += len * x;
    top2_push(x, m1, m2);
    mn = dmin(mn, x);
  }
  // All-equal groups get their exact value as mean, so r - mean is exactly 0.
  FASTALIGN_HD double mean() const {
    if (n == 0.0) return 0.0;
    return m1 == mn ? m1 : sum / n;
  }
};

struct GroupStats {
  double n, mean, sd, mx, second, wmean;
};

// m2 = sum (x - mean)^2 over the group (second pass). std is unbiased, 0 for n < 2 or equal scores.
FASTALIGN_HD GroupStats finish(const GroupAcc& a, double mean, double m2) {
  GroupStats s;
  s.n = a.n;
  s.mean = mean;
  s.sd = (a.n > 1.0 && a.m1 != a.mn) ? sqrt(m2 / (a.n - 1.0)) : 0.0;
  s.mx = a.m1;
  s.second = a.m2;
  s.wmean = (a.lsum > 0.0 && a.m1 != a.mn) ? a.lxsum / a.lsum : mean;  // equal scores: exactly that value
  return s;
}

// Scores near the top of the double range (|x| > ~1e154): the sums of x, L x or (x - mean)^2
// overflow although every score is finite. Such a group is summed again with each score times
// 2^-e, e the exponent of its largest |x| (scaled scores are below 1 in magnitude, so no sum can
// overflow), and mean, std and wmean are scaled back by 2^e; max and second come from the
// unscaled pass, which cannot overflow. A power of two scales exactly.
FASTALIGN_HD bool is_finite(double x) { return fabs(x) <= 1.7976931348623157e308; }

FASTALIGN_HD bool stats_overflowed(const GroupStats& s) {
  return !(is_finite(s.mean) && is_finite(s.sd) && is_finite(s.wmean));
}

FASTALIGN_HD int scale_exponent(double max_abs) {
  int e;
  frexp(max_abs, &e);
  return e;
}

FASTALIGN_HD GroupStats unscale_stats(GroupStats scaled, const GroupStats& raw, int e) {
  scaled.mean = ldexp(scaled.mean, e);
  scaled.sd = ldexp(scaled.sd, e);
  scaled.wmean = ldexp(scaled.wmean, e);
  scaled.mx = raw.mx;
  scaled.second = raw.second;
  return scaled;
}

FASTALIGN_HD void write_stats(double* st, const GroupStats& s) {  // st: one group's row of kStats
  st[kCount] = s.n;
  st[kMean] = s.mean;
  st[kStd] = s.sd;
  st[kMax] = s.mx;
  st[kSecond] = s.second;
  st[kWMean] = s.wmean;
}

FASTALIGN_HD void write_empty_stats(double* st) { write_stats(st, finish(GroupAcc(), 0.0, 0.0)); }

struct AdvParams {
  int mode;
  bool div_std;
  double eps;
  bool singleton_zero;
  double scale;
};

// A group's advantages are affine in the score: a = (x - base) * mul, except
// grpo_passk (only the best response gets the gap) and groups of one. Coef
// holds that per-group form, so the per-score work is a subtract and a multiply.
//   NaN score            -> 0 (and it never entered the statistics)
//   group of one (n < 2) -> x (singleton "raw": mean 0, std 1) or 0 ("zero")
//   center  (x - mean) * s        rloo  (x - mean) * n/(n-1) * s       opo  (x - wmean) * s
//   passk   x == max ? (max - second) * s : 0
// with s = scale [/ (std + eps)]; std + eps = 0 (eps 0, a group of equal scores) divides by 1, not 0:
// every x - mean (and max - second) is exactly 0 there, and 0 * (1 / 0) would be NaN.
enum CoefKind : int { kAffine = 0, kBest = 1, kRaw = 2, kZero = 3 };

struct Coef {
  double base, mul, mx;
  int kind;
};

FASTALIGN_HD double std_mul(double sd, const AdvParams& p) {
  if (!p.div_std) return p.scale;
  const double d = sd + p.eps;
  return d == 0.0 ? p.scale : p.scale / d;
}

FASTALIGN_HD Coef make_coef(const GroupStats& s, const AdvParams& p) {
  if (s.n < 2.0) return Coef{0.0, 1.0, 0.0, p.singleton_zero ? kZero : kRaw};
  double mul = std_mul(s.sd, p);
  switch (p.mode) {
    case kRloo: return Coef{s.mean, mul * (s.n / (s.n - 1.0)), 0.0, kAffine};
    case kOpo: return Coef{s.wmean, mul, 0.0, kAffine};
    case kPassk: return Coef{s.mx - s.second, mul, s.mx, kBest};
    default: return Coef{s.mean, mul, 0.0, kAffine};
  }
}

FASTALIGN_HD double apply_coef(double x, const Coef& c) {
  if (is_nan(x)) return 0.0;
  switch (c.kind) {
    case kAffine: return (x - c.base) * c.mul;
    case kBest: return x == c.mx ? c.base * c.mul : 0.0;
    case kRaw: return x;
    default: return 0.0;
  }
}

// Reverse scans over one row of T tokens (m is the response mask; m_t = 0 marks a masked token).
// A masked token is skipped by selection, never multiplied by 0, so a NaN or inf there (a
// padded reward or value) cannot reach the valid tokens; its outputs are exactly 0.
enum Scan : int {
  kReturnReset = 0,  // run = x_t m_t + gamma run; out_t = run m_t; run *= m_t   (reinforce_pp, PRIME)
  kReturnCarry = 1,  // run = x_t m_t + gamma run; out_t = run m_t              (remax: sum_{s>=t} r_s m_s)
  kGae = 2,          // delta = r_t + gamma V_next - V_t; A = delta + gamma lam A_next; masked tokens
                     // carry V_next and A_next unchanged; out = A m, out2 = (A + V) m
};

// Tokens [lo, hi) of one row, from the last to the first, starting from the state carried in
// from the tokens after hi: run (the return), or a_next and next_v (gae's A and V of the next
// valid token). The state is updated to the one carried out before lo.
template <int MODE, typename S>
FASTALIGN_HD void scan_segment(const S* x, const S* v, const S* m, S* out, S* out2, int64_t lo, int64_t hi,
                               double gamma, double lam, double& run, double& next_v) {
  for (int64_t t = hi - 1; t >= lo; --t) {
    const double mt = double(m[t]);
    if (mt == 0.0) {
      out[t] = S(0);
      if (MODE == kGae) out2[t] = S(0);
      if (MODE == kReturnReset) run = 0.0;
      if (MODE == kReturnCarry) run = gamma * run;
      continue;
    }
    if (MODE == kGae) {
      const double vt = double(v[t]);
      const double delta = double(x[t]) + gamma * next_v - vt;
      const double a = delta + gamma * lam * run;
      if (mt == 1.0) {  // a valid token takes the new state: the blend below would give 0 * inf = NaN
        next_v = vt;    // for an infinite old state, where A_t = delta_t + gamma lam A_{t+1} gives inf
        run = a;
      } else {  // a fractional mask blends the new state with the carried one
        next_v = vt * mt + (1.0 - mt) * next_v;
        run = a * mt + (1.0 - mt) * run;
      }
      out[t] = S(run * mt);
      out2[t] = S((run + vt) * mt);
    } else {
      run = double(x[t]) * mt + gamma * run;
      out[t] = S(run * mt);
      if (MODE == kReturnReset) run *= mt;
    }
  }
}

template <typename S>
FASTALIGN_HD void scan_segment(const S* x, const S* v, const S* m, S* out, S* out2, int64_t lo, int64_t hi,
                               double gamma, double lam, int mode, double& run, double& next_v) {
  switch (mode) {
    case kGae: scan_segment<kGae>(x, v, m, out, out2, lo, hi, gamma, lam, run, next_v); break;
    case kReturnReset: scan_segment<kReturnReset>(x, v, m, out, out2, lo, hi, gamma, lam, run, next_v); break;
    default: scan_segment<kReturnCarry>(x, v, m, out, out2, lo, hi, gamma, lam, run, next_v); break;
  }
}

// The whole row of T tokens, from a zero state.
template <typename S>
FASTALIGN_HD void scan_row(const S* x, const S* v, const S* m, S* out, S* out2, int64_t T, double gamma, double lam,
                           int mode) {
  double run = 0.0, next_v = 0.0;
  scan_segment(x, v, m, out, out2, 0, T, gamma, lam, mode, run, next_v);
}

// Host side: f(S{}) with S the score type of the call, double when f64 else float.
template <typename F>
inline void with_score_type(bool f64, F&& f) {
  if (f64)
    f(double{});
  else
    f(float{});
}

#ifndef __CUDACC__  // the CUDA sources' host side throws nothing (csrc/cuda/entry_points.h)
// Host side, before a launch: gae reads the values and writes out2.
inline void check_scan_args(int mode, uintptr_t values, uintptr_t out2) {
  if (mode == kGae && (!values || !out2)) throw std::invalid_argument("reverse_scan: gae needs values and out2");
}
#endif

}  // namespace adv
}  // namespace fastalign
