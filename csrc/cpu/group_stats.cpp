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
// exact value as mean and std 0. group_stats writes them ([rows, 6], rows past
// G as empty groups); group_advantage keeps each group's statistics in
// registers and writes its members' advantages right away (adv::make_coef).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/advantage_math.h"
#include "registry.h"

namespace fastalign {
namespace {

using namespace adv;

#define FASTALIGN_ALWAYS_INLINE inline __attribute__((always_inline))

// Below this many groups one thread is faster than waking a team: a group is
// a few dozen flops and the whole pass touches a few MB at most.
constexpr int64_t kParallelGroups = 1 << 16;

// Dense ids in order of first appearance, through an open-addressing table
// (slot = {key, id}, id -1 = empty) with Fibonacci hashing (one multiply;
// spreads hashed prompt ids and 0..n alike). The table starts small and doubles
// whenever it is 1/kLoad full (re-inserting the distinct keys `uniq`), so it stays
// ~kLoad x the number of groups and in cache; `max_cap` (a power of two >= 8B)
// slots are available. A key equal to the previous score's reuses its id.
struct KeyTable {
  int64_t* slots;
  int64_t cap = 0;
  int shift = 64;
  void reset(int64_t c) {
    cap = c;
    shift = 64;
    for (int64_t x = c; x > 1; x >>= 1) --shift;
    for (int64_t s = 0; s < c; ++s) slots[2 * s + 1] = -1;
  }
  // slot of key k: its own, or the empty one where it belongs
  int64_t* find(int64_t k) const {
    const uint64_t mask = uint64_t(cap) - 1;
    uint64_t h = (uint64_t(k) * 0x9e3779b97f4a7c15ULL) >> shift;
    while (slots[2 * h + 1] >= 0 && slots[2 * h] != k) h = (h + 1) & mask;
    return slots + 2 * h;
  }
};

constexpr int64_t kLoad = 8;  // table kept at most 1/8 full: few collisions, so few mispredicted probes

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

template <typename S>
GroupStats stats_one(const S* r, const double* len, const int64_t* members, int64_t begin, int64_t end) {
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
  return finish(a, mean, m2);
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
#pragma omp parallel for schedule(static) if (sg.G >= kParallelGroups)
  for (int64_t g = 0; g < sg.G; ++g)
    write_stats(stats + g * kStats, stats_one<S>(r, len, sg.members, sg.begin(g), sg.end(g)));
  for (int64_t g = sg.G; g < rows; ++g) write_empty_stats(stats + g * kStats);
}

// Fused: each group's statistics stay in registers and its members' advantages
// are written right away (no statistics buffer, no second pass over the batch).
// gid is scratch (keyed groups only).
template <typename S>
void group_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const double* len,
                     int64_t* gid, int64_t* work, int64_t cap, const AdvParams& p, S* out) {
  const Segments sg = segments(B, index, group_size, index ? gid : nullptr, work, cap);
#pragma omp parallel for schedule(static) if (sg.G >= kParallelGroups)
  for (int64_t g = 0; g < sg.G; ++g) {
    const int64_t begin = sg.begin(g), end = sg.end(g);
    const Coef cf = make_coef(stats_one<S>(r, len, sg.members, begin, end), p);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = sg.members ? sg.members[j] : j;
      out[i] = S(apply_coef(double(r[i]), cf));
    }
  }
}


// ---------------------------------------------------------------- affine fast path
// center / rloo (grpo, Dr. GRPO, gpg, rloo, reinforce_pp_baseline) need only
// count, mean and std per group. One pass over the batch assigns the dense ids
// and accumulates shifted sums around the group's first non-NaN score f:
//   n, s1 = sum (x - f), s2 = sum (x - f)^2       (in batch order: deterministic)
//   mean = f + s1 / n, m2 = s2 - s1^2 / n
// Shifting by a member keeps the cancellation small (m2 >= range^2 / 2 while
// s2 <= n range^2), and a group of equal scores gets s1 = s2 = 0 exactly: its
// mean is exactly that score and its std exactly 0. A second pass applies
// (x - base) * mul per score. Keyed groups and fixed blocks run the same
// per-group arithmetic in the same order, so both layouts agree bitwise.
struct ShiftAcc {
  double n, s1, s2, f;
};

struct AffineCoef {
  double base, mul;
};

inline AffineCoef affine_coef(const ShiftAcc& a, const AdvParams& p) {
  const double n = a.n;
  if (n < 2.0) return AffineCoef{0.0, p.singleton_zero ? 0.0 : 1.0};  // raw: (x - 0) * 1 = x
  const double mean = a.f + a.s1 / n;
  double m2 = a.s2 - a.s1 * (a.s1 / n);
  if (!(m2 > 0.0)) m2 = 0.0;
  double mul = p.scale;
  if (p.div_std) mul = p.scale / (std::sqrt(m2 / (n - 1.0)) + p.eps);
  if (p.mode == kRloo) mul *= n / (n - 1.0);
  return AffineCoef{mean, mul};
}

// NaN scores (and groups of one under singleton "zero": mul 0) give 0.
template <typename S>
FASTALIGN_ALWAYS_INLINE S apply_affine(S xs, const AffineCoef& c) {
  const double x = double(xs);
  const double y = (x - c.base) * c.mul;
  return (x == x && c.mul != 0.0) ? S(y) : S(0);
}

constexpr int64_t kParallelScores = 1 << 15;  // below this the output pass runs on one thread
constexpr int64_t kFastLoad = 4;              // the fast path's key table stays at most 1/2 full

// Per-thread scratch kept across calls (a fresh multi-MB buffer per call costs
// more in page faults than the kernel).
template <typename T>
T* tls_scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(std::max(n, 2 * buf.size()));
  return buf.data();
}

// Keys -> dense ids for the fast path: linear probing over keys [cap] int64 and
// ids [cap] int32 (-1 = empty), Fibonacci hashing, power-of-two capacity.
struct FastTable {
  int64_t* keys;
  int32_t* ids;
  int64_t cap;
  uint64_t mask;
  int shift;
  void reset(int64_t c) {
    cap = c;
    mask = uint64_t(c) - 1;
    shift = 64;
    for (int64_t x = c; x > 1; x >>= 1) --shift;
    std::fill(ids, ids + c, int32_t(-1));
  }
  // id of key k, or -1 with `slot` set to the empty slot where it belongs
  FASTALIGN_ALWAYS_INLINE int32_t find(int64_t k, uint64_t& slot) const {
    uint64_t h = (uint64_t(k) * 0x9e3779b97f4a7c15ULL) >> shift;
    int32_t id;
    while ((id = ids[h]) >= 0 && keys[h] != k) h = (h + 1) & mask;
    slot = h;
    return id;
  }
  void insert(int64_t k, int32_t id) {
    uint64_t slot;
    find(k, slot);
    keys[slot] = k;
    ids[slot] = id;
  }
};

// Dense ids (first appearance) + shifted sums in one sequential pass; returns G.
template <typename S>
int64_t keyed_accumulate(const S* r, int64_t B, const int64_t* index, int32_t* gid, ShiftAcc* acc, int64_t* uniq,
                         FastTable& t, int64_t max_cap) {
  t.reset(std::min<int64_t>(max_cap, 4096));
  int64_t G = 0;
  int32_t prev_id = -1;
  int64_t prev_key = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = index[i];
    const double x = double(r[i]);
    int32_t id;
    if (k == prev_key && prev_id >= 0) {
      id = prev_id;
    } else {
      uint64_t slot;
      id = t.find(k, slot);
      if (id < 0) {
        id = int32_t(G);
        t.keys[slot] = k;
        t.ids[slot] = id;
        uniq[G] = k;
        acc[G] = ShiftAcc{0.0, 0.0, 0.0, x};
        ++G;
        if (kFastLoad * G > t.cap && t.cap < max_cap) {  // grow and re-insert, ids unchanged
          t.reset(2 * t.cap);
          for (int64_t g = 0; g < G; ++g) t.insert(uniq[g], int32_t(g));
        }
      }
      prev_key = k;
      prev_id = id;
    }
    gid[i] = id;
    ShiftAcc& a = acc[id];
    if (x == x) {
      if (__builtin_expect(a.f != a.f, 0)) a.f = x;  // the group's first scores were NaN
      const double d = x - a.f;
      a.n += 1.0;
      a.s1 += d;
      a.s2 += d * d;
    }
  }
  return G;
}

template <typename S>
void affine_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const AdvParams& p, S* out) {
  if (B == 0) return;
  if (index) {
    int64_t max_cap = 4;
    while (max_cap < kFastLoad * B) max_cap <<= 1;
    // scratch: keys [max_cap] | uniq [B] | acc [B] (reused as coef) | ids [max_cap] i32 | gid [B] i32
    int64_t* base = tls_scratch<int64_t>(size_t(max_cap + B + 4 * B + (max_cap + B + 1) / 2 + 1));
    FastTable t{base, nullptr, 0, 0, 64};
    int64_t* uniq = base + max_cap;
    ShiftAcc* acc = reinterpret_cast<ShiftAcc*>(uniq + B);
    t.ids = reinterpret_cast<int32_t*>(uniq + 5 * B);
    int32_t* gid = t.ids + max_cap;
    const int64_t G = keyed_accumulate<S>(r, B, index, gid, acc, uniq, t, max_cap);
    AffineCoef* coef = reinterpret_cast<AffineCoef*>(acc);  // in place: row g read before written
    for (int64_t g = 0; g < G; ++g) coef[g] = affine_coef(acc[g], p);
#pragma omp parallel for schedule(static) if (B >= kParallelScores)
    for (int64_t i = 0; i < B; ++i) out[i] = apply_affine<S>(r[i], coef[gid[i]]);
    return;
  }
  const int64_t G = (B + group_size - 1) / group_size;
#pragma omp parallel for schedule(static) if (B >= kParallelScores)
  for (int64_t g = 0; g < G; ++g) {
    const int64_t begin = g * group_size, end = std::min(begin + group_size, B);
    ShiftAcc a{0.0, 0.0, 0.0, double(r[begin])};
    int64_t i0 = begin;
    while (i0 < end && is_nan(double(r[i0]))) ++i0;  // f: the first non-NaN score (as the keyed pass)
    if (i0 < end) a.f = double(r[i0]);
    for (int64_t i = i0; i < end; ++i) {
      const double x = double(r[i]);
      const bool ok = x == x;
      const double d = ok ? x - a.f : 0.0;
      a.n += ok ? 1.0 : 0.0;
      a.s1 += d;
      a.s2 += d * d;
    }
    const AffineCoef c = affine_coef(a, p);
    for (int64_t i = begin; i < end; ++i) out[i] = apply_affine<S>(r[i], c);
  }
}

template <typename P>
P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

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
        if (f64)
          group_stats<double>(ptr<const double>(scores), B, ptr<const int64_t>(index), group_size,
                              ptr<const double>(lengths), ptr<int64_t>(gid), ptr<double>(stats), rows,
                              ptr<int64_t>(ngroups), work, cap);
        else
          group_stats<float>(ptr<const float>(scores), B, ptr<const int64_t>(index), group_size,
                             ptr<const double>(lengths), ptr<int64_t>(gid), ptr<double>(stats), rows,
                             ptr<int64_t>(ngroups), work, cap);
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
          if (f64)
            affine_advantage<double>(ptr<const double>(scores), B, ptr<const int64_t>(index), group_size, p,
                                     ptr<double>(out));
          else
            affine_advantage<float>(ptr<const float>(scores), B, ptr<const int64_t>(index), group_size, p,
                                    ptr<float>(out));
          return;
        }
        int64_t cap;
        int64_t* work = csr_work(B, index, cap);
        int64_t* gid = work ? work + 2 * cap + 3 * B + 2 : nullptr;
        if (f64)
          group_advantage<double>(ptr<const double>(scores), B, ptr<const int64_t>(index), group_size,
                                  ptr<const double>(lengths), gid, work, cap, p, ptr<double>(out));
        else
          group_advantage<float>(ptr<const float>(scores), B, ptr<const int64_t>(index), group_size,
                                 ptr<const double>(lengths), gid, work, cap, p, ptr<float>(out));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Group-normalised advantage per score (mode: 0 center, 1 rloo, 2 opo, 3 passk), in place into out.");
}

}  // namespace fastalign
