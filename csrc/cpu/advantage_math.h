// Per-element and per-row math of the advantage estimators (SPEC §5), shared by
// the C++ CPU kernels and the CUDA kernels so both compute the same formula.
// Everything is accumulated and evaluated in double; scores are fp32 or fp64.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTALIGN_HD __host__ __device__ __forceinline__
#else
#define FASTALIGN_HD inline
#endif

namespace fastalign {
namespace adv {

// Rows of the [kStats, B] statistics buffer (one column per group id; groups <= B).
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
FASTALIGN_HD void top2_push(double x, double& m1, double& m2) {
  if (x > m1) {
    m2 = m1;
    m1 = x;
  } else if (x > m2) {
    m2 = x;
  }
}

FASTALIGN_HD void top2_merge(double b1, double b2, double& m1, double& m2) {
  const double hi = m1 > b1 ? m1 : b1;
  const double lo = m1 > b1 ? b1 : m1;
  const double r2 = m2 > b2 ? m2 : b2;
  m1 = hi;
  m2 = lo > r2 ? lo : r2;
}

// Advantage of one valid-or-NaN score x given its group's statistics.
//   NaN score            -> 0 (and it never entered the statistics)
//   group of one (n < 2) -> x (singleton "raw": mean 0, std 1) or 0 ("zero")
//   otherwise            -> base(mode) [/ (std + eps)] * scale
FASTALIGN_HD double group_advantage(double x, double n, double mean, double sd, double mx, double second,
                                    double wmean, int mode, bool div_std, double eps, bool singleton_zero,
                                    double scale) {
  if (is_nan(x)) return 0.0;
  if (n < 2.0) return singleton_zero ? 0.0 : x;
  double a;
  switch (mode) {
    case kRloo: a = (x - mean) * (n / (n - 1.0)); break;
    case kOpo: a = x - wmean; break;
    case kPassk: a = x == mx ? mx - second : 0.0; break;
    default: a = x - mean; break;
  }
  if (div_std) a = a / (sd + eps);
  return a * scale;
}

// Final statistics of one group from its sums. All-equal groups get their
// exact value as mean (so r - mean is exactly 0) and std 0.
struct GroupAcc {
  double n = 0, sum = 0, lsum = 0, lxsum = 0;
  double m1 = -HUGE_VAL, m2 = -HUGE_VAL, mn = HUGE_VAL;
  FASTALIGN_HD void push(double x, double len) {
    n += 1.0;
    sum += x;
    lsum += len;
    lxsum += len * x;
    top2_push(x, m1, m2);
    mn = x < mn ? x : mn;
  }
  FASTALIGN_HD double mean() const {
    if (n == 0.0) return 0.0;
    return m1 == mn ? m1 : sum / n;
  }
};

FASTALIGN_HD void write_stats(double* stats, int64_t B, int64_t g, const GroupAcc& a, double mean, double m2) {
  stats[kCount * B + g] = a.n;
  stats[kMean * B + g] = mean;
  stats[kStd * B + g] = (a.n > 1.0 && a.m1 != a.mn) ? sqrt(m2 / (a.n - 1.0)) : 0.0;
  stats[kMax * B + g] = a.m1;
  stats[kSecond * B + g] = a.m2;
  stats[kWMean * B + g] = a.lsum > 0.0 ? a.lxsum / a.lsum : mean;
}

FASTALIGN_HD void write_empty_stats(double* stats, int64_t B, int64_t g) {
  GroupAcc a;
  write_stats(stats, B, g, a, 0.0, 0.0);
}

// Reverse scans over one row of T tokens (m is the 0/1 response mask):
enum Scan : int {
  kReturnReset = 0,  // run = x_t m_t + gamma run; out_t = run m_t; run *= m_t   (reinforce_pp, PRIME)
  kReturnCarry = 1,  // run = x_t m_t + gamma run; out_t = run m_t              (remax: sum_{s>=t} r_s m_s)
  kGae = 2,          // delta = r_t + gamma V_next - V_t; A = delta + gamma lam A_next; masked tokens
                     // carry V_next and A_next unchanged; out = A m, out2 = (A + V) m
};

template <typename S>
FASTALIGN_HD void scan_row(const S* x, const S* v, const S* m, S* out, S* out2, int64_t T, double gamma, double lam,
                           int mode) {
  if (mode == kGae) {
    double next_v = 0.0, a_next = 0.0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const double mt = double(m[t]), vt = double(v[t]);
      const double delta = double(x[t]) + gamma * next_v - vt;
      const double a = delta + gamma * lam * a_next;
      next_v = vt * mt + (1.0 - mt) * next_v;
      a_next = a * mt + (1.0 - mt) * a_next;
      out[t] = S(a_next * mt);
      out2[t] = S((a_next + vt) * mt);
    }
    return;
  }
  double run = 0.0;
  for (int64_t t = T - 1; t >= 0; --t) {
    const double mt = double(m[t]);
    run = double(x[t]) * mt + gamma * run;
    out[t] = S(run * mt);
    if (mode == kReturnReset) run *= mt;
  }
}

}  // namespace adv
}  // namespace fastalign
