// Segmented group statistics and group-normalised advantages (SPEC §5), on the CPU.
//
// Groups come either as an int64 key per score (any order, any values) or as
// consecutive blocks of `group_size`. Keys become dense group ids 0..G-1 in
// order of first appearance through an open-addressing hash table (one
// sequential pass), then a counting sort lays each group's members out in
// batch order (CSR). Statistics are reduced per group, OpenMP over groups, each
// group summed in batch order: the result does not depend on the thread count
// and is bitwise reproducible.
//
// Per group g over its non-NaN scores x (lengths L optional, else 1):
//   count n, mean = sum x / n, std = sqrt(sum (x - mean)^2 / (n - 1)) (two-pass),
//   max, second max (largest of the rest), wmean = sum L x / sum L.
// Everything is accumulated in double. Groups with all-equal scores get their
// exact value as mean and std 0. Buffers are sized by B (G <= B); columns
// G..B-1 of the statistics are written as empty groups.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "cpu/advantage_math.h"
#include "registry.h"

namespace fastalign {
namespace {

using namespace adv;

inline uint64_t mix64(uint64_t z) {  // splitmix64 finaliser: spreads hashed prompt ids and 0..n alike
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Dense ids in order of first appearance. keys/ids: `cap` slots (a power of two >= 2B).
int64_t dense_ids(const int64_t* index, int64_t B, int64_t* gid, int64_t* keys, int64_t* ids, int64_t cap) {
  std::memset(ids, 0xff, sizeof(int64_t) * cap);  // -1: empty slot
  const uint64_t mask = uint64_t(cap) - 1;
  int64_t G = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = index[i];
    uint64_t h = mix64(uint64_t(k)) & mask;
    while (ids[h] >= 0 && keys[h] != k) h = (h + 1) & mask;
    if (ids[h] < 0) {
      ids[h] = G++;
      keys[h] = k;
    }
    gid[i] = ids[h];
  }
  return G;
}

template <typename S>
void stats_one(const S* r, const double* len, const int64_t* members, int64_t begin, int64_t end, double* stats,
               int64_t B, int64_t g) {
  GroupAcc a;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t i = members ? members[j] : j;
    const double x = double(r[i]);
    if (!is_nan(x)) a.push(x, len ? len[i] : 1.0);
  }
  const double mean = a.mean();
  double m2 = 0.0;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t i = members ? members[j] : j;
    const double x = double(r[i]);
    if (!is_nan(x)) m2 += (x - mean) * (x - mean);
  }
  write_stats(stats, B, g, a, mean, m2);
}

template <typename S>
void group_stats(const S* r, int64_t B, const int64_t* index, int64_t group_size, const double* len, int64_t* gid,
                 double* stats, int64_t* ngroups, int64_t* work, int64_t cap) {
  int64_t G;
  const int64_t* members = nullptr;
  int64_t* off = nullptr;
  if (index) {
    int64_t* keys = work;
    int64_t* ids = work + cap;
    off = work + 2 * cap;                // [B + 1]
    int64_t* cur = off + (B + 1);        // [B + 1]
    int64_t* mem = cur + (B + 1);        // [B]
    G = dense_ids(index, B, gid, keys, ids, cap);
    std::memset(off, 0, sizeof(int64_t) * (G + 1));
    for (int64_t i = 0; i < B; ++i) ++off[gid[i] + 1];
    for (int64_t g = 0; g < G; ++g) off[g + 1] += off[g];
    std::memcpy(cur, off, sizeof(int64_t) * G);
    for (int64_t i = 0; i < B; ++i) mem[cur[gid[i]]++] = i;  // stable: batch order inside a group
    members = mem;
  } else {
    G = (B + group_size - 1) / group_size;
    for (int64_t i = 0; i < B; ++i) gid[i] = i / group_size;
  }
  *ngroups = G;
#pragma omp parallel for schedule(static) if (B > 16384)
  for (int64_t g = 0; g < B; ++g) {
    if (g >= G) {
      write_empty_stats(stats, B, g);
      continue;
    }
    const int64_t begin = members ? off[g] : g * group_size;
    const int64_t end = members ? off[g + 1] : std::min(begin + group_size, B);
    stats_one<S>(r, len, members, begin, end, stats, B, g);
  }
}

template <typename S>
void group_normalize(const S* r, int64_t B, const int64_t* gid, const double* stats, int mode, bool div_std,
                     double eps, bool singleton_zero, const double* scale, S* out) {
  const double sc = scale ? scale[0] : 1.0;
#pragma omp parallel for schedule(static) if (B > 65536)
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = gid[i];
    out[i] = S(group_advantage(double(r[i]), stats[kCount * B + g], stats[kMean * B + g], stats[kStd * B + g],
                               stats[kMax * B + g], stats[kSecond * B + g], stats[kWMean * B + g], mode, div_std,
                               eps, singleton_zero, sc));
  }
}

template <typename P>
P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

}  // namespace

FASTALIGN_BINDINGS(group_stats) {
  namespace py = pybind11;
  m.def(
      "group_stats_cpu",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t index, int64_t group_size, uintptr_t lengths,
         uintptr_t gid, uintptr_t stats, uintptr_t ngroups, uintptr_t work, int64_t cap) {
        if (!index && group_size <= 0) throw std::invalid_argument("group_stats: group_size must be > 0");
        if (index && (cap < 2 * B || (cap & (cap - 1)) != 0))
          throw std::invalid_argument("group_stats: hash capacity must be a power of two >= 2B");
        if (f64)
          group_stats<double>(ptr<const double>(scores), B, ptr<const int64_t>(index), group_size,
                              ptr<const double>(lengths), ptr<int64_t>(gid), ptr<double>(stats),
                              ptr<int64_t>(ngroups), ptr<int64_t>(work), cap);
        else
          group_stats<float>(ptr<const float>(scores), B, ptr<const int64_t>(index), group_size,
                             ptr<const double>(lengths), ptr<int64_t>(gid), ptr<double>(stats),
                             ptr<int64_t>(ngroups), ptr<int64_t>(work), cap);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Dense group ids [B] and statistics [6, B] (count, mean, std, max, second, wmean) of fp32/fp64 scores.");
  m.def(
      "group_normalize_cpu",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t gid, uintptr_t stats, int mode, bool div_std, double eps,
         bool singleton_zero, uintptr_t scale, uintptr_t out) {
        if (f64)
          group_normalize<double>(ptr<const double>(scores), B, ptr<const int64_t>(gid), ptr<const double>(stats),
                                  mode, div_std, eps, singleton_zero, ptr<const double>(scale), ptr<double>(out));
        else
          group_normalize<float>(ptr<const float>(scores), B, ptr<const int64_t>(gid), ptr<const double>(stats),
                                 mode, div_std, eps, singleton_zero, ptr<const double>(scale), ptr<float>(out));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Per-score advantage from its group statistics (mode: 0 center, 1 rloo, 2 opo, 3 passk).");
}

}  // namespace fastalign
