// Segmented group statistics and group-normalised advantages (docs/math.md#advantages), on the CPU:
// the CSR path, and the Python entry points of both paths (center / rloo advantages take the
// one-pass affine path of group_affine.cpp first).
//
// Groups come either as an int64 key per score (any order, any values) or as
// consecutive blocks of `group_size`. Keys become dense group ids 0..G-1 in
// order of first appearance through an open-addressing hash table (one
// sequential pass; group_keys.h), then a counting sort lays each group's members out in
// batch order (CSR). Statistics are reduced per group, OpenMP over groups, each
// group summed in batch order: the result does not depend on the thread count
// and is bitwise reproducible. Large batches run on cpu/parallel.h's threads.
//
// Per group g over its non-NaN scores x (lengths L optional, else 1):
//   count n, mean = sum x / n, std = sqrt(sum (x - mean)^2 / (n - 1)) (two-pass),
//   max, second max (largest of the rest), wmean = sum L x / sum L.
// Everything is accumulated in double. Groups with all-equal scores get their
// exact value as mean and std 0. group_stats writes them ([rows, 6], rows past
// G as empty groups); group_advantage keeps each group's statistics in
// registers and writes its members' advantages right away (adv::make_coef).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "common/advantage_math.h"
#include "cpu/group_keys.h"
#include "cpu/group_stats.h"
#include "cpu/parallel.h"
#include "registry.h"

namespace fastalign {
namespace group {
namespace {

// Dense ids of the keys in order of first appearance (KeyTable, group_keys.h): gid[i] for every
// score, the distinct keys in uniq[0 .. G); returns G.
int64_t dense_ids(const int64_t* index, int64_t B, int64_t* gid, int64_t* table, int64_t max_cap, int64_t* uniq) {
  KeyTable t{table};
  t.reset(std::min<int64_t>(max_cap, 1024));
  int64_t G = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = index[i];
    if (i > 0 && k == index[i - 1]) {
      gid[i] = gid[i - 1];
      continue;
    }
    int64_t* slot = t.find(k);
    if (slot[1] < 0) {
      slot[0] = k;
      slot[1] = G;
      uniq[G++] = k;
      if (kLoad * G > t.cap && t.cap < max_cap) {  // grow and re-insert, ids unchanged
        t.reset(2 * t.cap);
        for (int64_t g = 0; g < G; ++g) {
          int64_t* s2 = t.find(uniq[g]);
          s2[0] = uniq[g];
          s2[1] = g;
        }
        slot = t.find(k);
      }
    }
    gid[i] = slot[1];
  }
  return G;
}

// Groups as CSR: returns G; members[off[g] .. off[g+1]) are group g's scores in
// batch order. With a fixed group_size, members is null and group g is the
// block [g * group_size, (g + 1) * group_size).
struct Segments {
  int64_t G;
  const int64_t* off;
  const int64_t* members;
  int64_t group_size;
  int64_t B;
  int64_t begin(int64_t g) const { return members ? off[g] : g * group_size; }
  int64_t end(int64_t g) const { return members ? off[g + 1] : std::min((g + 1) * group_size, B); }
};

Segments segments(int64_t B, const int64_t* index, int64_t group_size, int64_t* gid, int64_t* work, int64_t cap) {
  if (!index) {
    if (gid)
      for (int64_t i = 0; i < B; ++i) gid[i] = i / group_size;
    return {(B + group_size - 1) / group_size, nullptr, nullptr, group_size, B};
  }
  int64_t* off = work + 2 * cap;  // [B + 1], after the hash table
  int64_t* cur = off + (B + 1);   // [B + 1]
  int64_t* mem = cur + (B + 1);   // [B]
  const int64_t G = dense_ids(index, B, gid, work, cap, mem);  // mem holds the distinct keys until the sort
  std::memset(off, 0, sizeof(int64_t) * (G + 1));
  for (int64_t i = 0; i < B; ++i) ++off[gid[i] + 1];
  for (int64_t g = 0; g < G; ++g) off[g + 1] += off[g];
  std::memcpy(cur, off, sizeof(int64_t) * G);
  for (int64_t i = 0; i < B; ++i) mem[cur[gid[i]]++] = i;  // stable: batch order inside a group
  return {G, off, mem, group_size, B};
}

template <typename S>
void group_stats(const S* r, int64_t B, const int64_t* index, int64_t group_size, const double* len, int64_t* gid,
                 double* stats, int64_t rows, int64_t* ngroups, int64_t* work, int64_t cap) {
  const Segments sg = segments(B, index, group_size, gid, work, cap);
  *ngroups = sg.G;
  parallel_for(sg.G, sg.G >= kParallelGroups ? threads_for(B, kParallelScores / 2) : 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      write_stats(stats + g * kStats, stats_one<S>(r, len, sg.members, sg.begin(g), sg.end(g)));
  });
  for (int64_t g = sg.G; g < rows; ++g) write_empty_stats(stats + g * kStats);
}

// Fused: each group's statistics stay in registers and its members' advantages
// are written right away (no statistics buffer, no second pass over the batch).
// gid is scratch (keyed groups only).
template <typename S>
void group_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const double* len,
                     int64_t* gid, int64_t* work, int64_t cap, const AdvParams& p, S* out) {
  const Segments sg = segments(B, index, group_size, index ? gid : nullptr, work, cap);
  parallel_for(sg.G, sg.G >= kParallelGroups ? threads_for(B, kParallelScores / 2) : 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t begin = sg.begin(g), end = sg.end(g);
      const Coef cf = make_coef(stats_one<S>(r, len, sg.members, begin, end), p);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = sg.members ? sg.members[j] : j;
        out[i] = S(apply_coef(double(r[i]), cf));
      }
    }
  });
}

int64_t hash_capacity(int64_t B) {  // power of two >= 8B: the generic table stays <= 1/8 full
  int64_t c = 2;
  while (c < kLoad * B) c <<= 1;
  return c;
}

void check_groups(uintptr_t index, int64_t group_size) {
  if (!index && group_size <= 0) throw std::invalid_argument("group_stats: group_size must be > 0");
}

// Scratch of the generic (CSR) path: the hash table, offsets and members.
int64_t* csr_work(int64_t B, uintptr_t index, int64_t& cap) {
  cap = index ? hash_capacity(B) : 0;
  return index ? tls_scratch<int64_t>(size_t(2 * cap + 4 * B + 2)) : nullptr;
}

}  // namespace

FASTALIGN_BINDINGS(group_stats) {
  namespace py = pybind11;
  m.def(
      "group_stats_cpu",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t index, int64_t group_size, uintptr_t lengths,
         uintptr_t gid, uintptr_t stats, int64_t rows, uintptr_t ngroups) {
        check_groups(index, group_size);
        int64_t cap;
        int64_t* work = csr_work(B, index, cap);
        with_score_type(f64, [&](auto tag) {
          using S = decltype(tag);
          group_stats<S>(ptr<const S>(scores), B, ptr<const int64_t>(index), group_size, ptr<const double>(lengths),
                         ptr<int64_t>(gid), ptr<double>(stats), rows, ptr<int64_t>(ngroups), work, cap);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "Dense group ids [B] and statistics [rows, 6] (count, mean, std, max, second, wmean; rows past the "
      "number of groups written as empty groups) of fp32/fp64 scores.");
  m.def(
      "group_advantage_cpu",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t index, int64_t group_size, uintptr_t lengths, int mode,
         bool div_std, double eps, bool singleton_zero, uintptr_t scale, uintptr_t out) {
        check_groups(index, group_size);
        const AdvParams p{mode, div_std, eps, singleton_zero, scale ? ptr<const double>(scale)[0] : 1.0};
        if (mode == kCenter || mode == kRloo) {  // count / mean / std only: the one-pass affine path
          bool done = false;
          with_score_type(f64, [&](auto tag) {
            using S = decltype(tag);
            done = affine_advantage<S>(ptr<const S>(scores), B, ptr<const int64_t>(index), group_size, p, ptr<S>(out));
          });
          if (done) return;  // else an infinite score in a keyed group: the generic path below
        }
        int64_t cap;
        int64_t* work = csr_work(B, index, cap);
        int64_t* gid = work ? work + 2 * cap + 3 * B + 2 : nullptr;
        with_score_type(f64, [&](auto tag) {
          using S = decltype(tag);
          group_advantage<S>(ptr<const S>(scores), B, ptr<const int64_t>(index), group_size, ptr<const double>(lengths),
                             gid, work, cap, p, ptr<S>(out));
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "Group-normalised advantage per score (mode: 0 center, 1 rloo, 2 opo, 3 passk), in place into out.");
}

}  // namespace group
}  // namespace fastalign
