// What the two CPU group-advantage paths share (docs/math.md#advantages): group_stats.cpp (dense
// ids, CSR segments, per-group statistics, and the Python entry points) and group_affine.cpp (the
// one-pass affine fast path for center / rloo). Keys are hashed in group_keys.h.
//
// stats_one is the two-pass statistics of one group, everything accumulated in double: the CSR
// path reduces every group with it, and the affine path falls back to it for a block holding an
// infinite score.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/advantage_math.h"

namespace fastalign {
namespace group {

using namespace adv;

// Below this many groups one thread is faster than waking a team: a group is
// a few dozen flops and the whole pass touches a few MB at most.
constexpr int64_t kParallelGroups = 1 << 16;
constexpr int64_t kParallelScores = 1 << 18;  // below this the output pass runs on one thread

// Per-thread scratch kept across calls (a fresh multi-MB buffer per call costs
// more in page faults than the kernel).
template <typename T>
T* tls_scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(std::max(n, 2 * buf.size()));
  return buf.data();
}

// One group's statistics with every score times sigma (1, or 2^-e for a group that overflows).
template <typename S>
GroupStats stats_pass(const S* r, const double* len, const int64_t* members, int64_t begin, int64_t end,
                      double sigma) {
  GroupAcc a;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t i = members ? members[j] : j;
    const double x = double(r[i]) * sigma;
    if (!is_nan(x)) a.push(x, len ? len[i] : 1.0);
  }
  const double mean = a.mean();
  double m2 = 0.0;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t i = members ? members[j] : j;
    const double x = double(r[i]) * sigma;
    if (!is_nan(x)) m2 += (x - mean) * (x - mean);
  }
  return finish(a, mean, m2);
}

template <typename S>
GroupStats stats_one(const S* r, const double* len, const int64_t* members, int64_t begin, int64_t end) {
  const GroupStats raw = stats_pass<S>(r, len, members, begin, end, 1.0);
  if (__builtin_expect(!stats_overflowed(raw), 1)) return raw;
  double max_abs = 0.0;  // NaN scores are left out; an infinite score keeps the unscaled result
  for (int64_t j = begin; j < end; ++j) {
    const double x = double(r[members ? members[j] : j]);
    if (!is_nan(x)) max_abs = std::max(max_abs, std::fabs(x));
  }
  if (!is_finite(max_abs)) return raw;
  const int e = scale_exponent(max_abs);
  return unscale_stats(stats_pass<S>(r, len, members, begin, end, std::ldexp(1.0, -e)), raw, e);
}

// The affine fast path (group_affine.cpp; mode center or rloo): advantages of fp32/fp64 scores into
// out, groups keyed by index or, when index is null, blocks of group_size. Returns false, having
// written nothing, when a keyed group holds an infinite score: the caller then runs the CSR path.
template <typename S>
bool affine_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const AdvParams& p, S* out);

extern template bool affine_advantage<float>(const float*, int64_t, const int64_t*, int64_t, const AdvParams&, float*);
extern template bool affine_advantage<double>(const double*, int64_t, const int64_t*, int64_t, const AdvParams&,
                                              double*);

}  // namespace group
}  // namespace fastalign
