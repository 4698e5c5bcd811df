// Segmented group statistics and group-normalised advantages (docs/math.md#advantages), on the CPU.
//
// Groups come either as an int64 key per score (any order, any values) or as
// consecutive blocks of `group_size`. Keys become dense group ids 0..G-1 in
// order of first appearance through an open-addressing hash table (one
// sequential pass), then a counting sort lays each group's members out in
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
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/advantage_math.h"
#include "cpu/parallel.h"
#include "registry.h"

namespace fastalign {
namespace {

using namespace adv;

#define FASTALIGN_ALWAYS_INLINE inline __attribute__((always_inline))

// Below this many groups one thread is faster than waking a team: a group is
// a few dozen flops and the whole pass touches a few MB at most.
constexpr int64_t kParallelGroups = 1 << 16;
constexpr int64_t kParallelScores = 1 << 18;  // below this the output pass runs on one thread

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


// ---------------------------------------------------------------- affine fast path
// center / rloo (grpo, Dr. GRPO, gpg, rloo, reinforce_pp_baseline) need only
// count, mean and std per group. One pass over the batch finds each score's
// group (its slot in a hash table of keys) and accumulates, at that slot,
// shifted sums around the group's first non-NaN score f:
//   n, s1 = sum (x - f), s2 = sum (x - f)^2       (in batch order: deterministic)
//   mean = f + s1 / n, m2 = s2 - s1^2 / n
// Shifting by a member keeps the cancellation small (m2 >= range^2 / 2 while
// s2 <= n range^2), and a group of equal scores gets s1 = s2 = 0 exactly: its
// mean is exactly that score and its std exactly 0. The slot's sums are then
// replaced by (base, mul) and a second pass applies (x - base) * mul per score.
// Keyed groups and fixed blocks run the same per-group arithmetic in the same
// order, so both layouts agree bitwise.
struct ShiftAcc {
  double n, s1, s2, f;
};

struct AffineCoef {
  double base, mul;
};

// 1 / n for small counts (groups are mostly small): a product instead of a division
// (the divider, not memory, bounds the per-group step). Both layouts use it.
struct Reciprocals {
  static constexpr int kN = 256;
  double v[kN];
  Reciprocals() {
    for (int n = 0; n < kN; ++n) v[n] = n ? 1.0 / n : 0.0;
  }
  FASTALIGN_ALWAYS_INLINE double operator()(double n) const { return n < kN ? v[int(n)] : 1.0 / n; }
};
inline const Reciprocals kRecip;

// e != 0: the sums are of scores times 2^-e (a group that overflowed), scaled back here.
inline AffineCoef affine_coef(const ShiftAcc& a, const AdvParams& p, int e = 0) {
  const double n = a.n;
  if (n < 2.0) return AffineCoef{0.0, p.singleton_zero ? 0.0 : 1.0};  // raw: (x - 0) * 1 = x
  const double inv_n = kRecip(n), inv_n1 = kRecip(n - 1.0);
  const double d1 = a.s1 * inv_n;  // mean - f
  double mean = a.f + d1;
  double m2 = a.s2 - a.s1 * d1;
  if (m2 < 0.0) m2 = 0.0;  // round-off only: a NaN stays NaN
  double mul = p.scale;
  if (p.div_std) {
    double sd = std::sqrt(m2 * inv_n1);
    if (__builtin_expect(e != 0, 0)) sd = std::ldexp(sd, e);
    mul = std_mul(sd, p);
  }
  if (__builtin_expect(e != 0, 0)) mean = std::ldexp(mean, e);
  if (p.mode == kRloo) mul *= n * inv_n1;
  return AffineCoef{mean, mul};
}

// NaN scores (and groups of one under singleton "zero": mul 0) give 0.
template <typename S>
FASTALIGN_ALWAYS_INLINE S apply_affine(S xs, const AffineCoef& c) {
  const double x = double(xs);
  const double y = (x - c.base) * c.mul;
  return (x == x && c.mul != 0.0) ? S(y) : S(0);
}

constexpr int64_t kFastLoad = 4;              // the fast path's key table stays at most 1/4 full

// Per-thread scratch kept across calls (a fresh multi-MB buffer per call costs
// more in page faults than the kernel).
template <typename T>
T* tls_scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(std::max(n, 2 * buf.size()));
  return buf.data();
}

// A group's running sums, kept at its key's slot (24 bytes for fp32 scores: f
// is a score, exact in S).
template <typename S>
struct SlotAcc {
  double s1, s2;
  S f;
  int32_t n;
};

// Keys -> slots for the fast path: linear probing over a keys-only array (8
// bytes a slot, kEmpty = free: the probe loop reads one compact array),
// Fibonacci hashing, power-of-two capacity; a group is known by its slot and
// its sums live at acc[slot]. The key kEmpty itself, if present, gets the
// extra slot `cap`. The table starts small and doubles when 1/kFastLoad full;
// the slots already handed out (pos) follow.
constexpr int64_t kEmpty = INT64_MIN;

template <typename S>
struct SlotTable {
  int64_t* keys = nullptr;    // [cap]
  SlotAcc<S>* acc = nullptr;  // [cap + 1]
  int32_t* used = nullptr;    // occupied slots in order of first appearance (the extra slot last)
  int64_t n_used = 0;
  int64_t cap = 0;
  uint64_t mask = 0;
  int shift = 64;
  // storage per thread, kept across calls and sized to the capacity in use (not to the
  // largest one the batch could need)
  static std::vector<int64_t>& key_store() {
    static thread_local std::vector<int64_t> v;
    return v;
  }
  static std::vector<SlotAcc<S>>& acc_store() {
    static thread_local std::vector<SlotAcc<S>> v;
    return v;
  }
  // an empty table of capacity c (the contents are dropped: grow saves them first)
  void reset(int64_t c) {
    cap = c;
    mask = uint64_t(c) - 1;
    shift = 64;
    for (int64_t x = c; x > 1; x >>= 1) --shift;
    if (int64_t(key_store().size()) < c) key_store().resize(size_t(c));
    if (int64_t(acc_store().size()) < c + 1) acc_store().resize(size_t(c + 1));
    keys = key_store().data();
    acc = acc_store().data();
    std::fill(keys, keys + c, kEmpty);
  }
  FASTALIGN_ALWAYS_INLINE uint64_t find(int64_t k) const {
    uint64_t h = (uint64_t(k) * 0x9e3779b97f4a7c15ULL) >> shift;
    int64_t kk;
    while ((kk = keys[h]) != k && kk != kEmpty) h = (h + 1) & mask;
    return h;
  }
};

// Doubles t's capacity; the slots of scores [0, upto) in pos follow (growth
// happens while few groups exist, early in the batch).
template <typename S>
void grow(SlotTable<S>& t, int32_t* pos, int64_t upto) {
  const int64_t old = t.cap;
  std::vector<int64_t> k(t.n_used);
  std::vector<SlotAcc<S>> a(t.n_used);
  std::vector<int32_t> remap(old + 1);
  for (int64_t u = 0; u < t.n_used; ++u) {
    k[u] = t.keys[t.used[u]];
    a[u] = t.acc[t.used[u]];
    remap[t.used[u]] = int32_t(u);
  }
  const SlotAcc<S> extra = t.acc[old];
  t.reset(2 * old);
  for (int64_t u = 0; u < t.n_used; ++u) {
    const uint64_t h = t.find(k[u]);
    t.keys[h] = k[u];
    t.acc[h] = a[u];
    t.used[u] = int32_t(h);
  }
  t.acc[t.cap] = extra;
  for (int64_t j = 0; j < upto; ++j) pos[j] = pos[j] == old ? int32_t(t.cap) : t.used[remap[pos[j]]];
}

// A key not in the table yet (or the sentinel key): its slot, with fresh sums
// f = x; grows the table when 1/kFastLoad full. Out of line: the hot loop
// stays small.
template <typename S>
__attribute__((noinline)) uint64_t new_slot(SlotTable<S>& t, int64_t k, S x, uint64_t h, bool& has_empty_key,
                                            int32_t* pos, int64_t i, int64_t max_cap) {
  if (k == kEmpty) {  // the sentinel value as a real key: the extra slot
    if (!has_empty_key) t.acc[t.cap] = SlotAcc<S>{0.0, 0.0, x, 0};
    has_empty_key = true;
    return uint64_t(t.cap);
  }
  t.keys[h] = k;
  t.acc[h] = SlotAcc<S>{0.0, 0.0, x, 0};
  t.used[t.n_used++] = int32_t(h);
  if (kFastLoad * t.n_used > t.cap && t.cap < max_cap) {  // double the table; slots move, pos follows
    grow(t, pos, i);
    h = t.find(k);
  }
  return h;
}

// Shifted sums in one sequential pass; pos[i] = slot of score i's group.
template <typename S>
void keyed_accumulate(const S* r, int64_t B, const int64_t* index, int32_t* pos, SlotTable<S>& t, int64_t max_cap) {
  // first size: 1/4 full with groups of ~16 (growing while the batch streams costs more than a
  // sparser table); it doubles if there are more groups
  int64_t cap0 = 4096;
  while (cap0 < B / 4) cap0 <<= 1;
  t.reset(std::min<int64_t>(max_cap, cap0));
  t.n_used = 0;
  bool has_empty_key = false;
  // local copies for the hot loop (stores into the sums would otherwise reload the table's fields)
  const int64_t* keys = t.keys;
  SlotAcc<S>* acc = t.acc;
  uint64_t mask = t.mask;
  int shift = t.shift;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = index[i];
    const S x = r[i];
    uint64_t h = (uint64_t(k) * 0x9e3779b97f4a7c15ULL) >> shift;
    if (__builtin_expect(keys[h] != k || k == kEmpty, 0)) {  // probe on, or a new key
      int64_t kk;
      while ((kk = keys[h]) != k && kk != kEmpty) h = (h + 1) & mask;
      if (kk != k || k == kEmpty) {
        h = new_slot<S>(t, k, x, h, has_empty_key, pos, i, max_cap);
        keys = t.keys, acc = t.acc, mask = t.mask, shift = t.shift;  // a growth may move the table
      }
    }
    pos[i] = int32_t(h);
    // no NaN test here (the loop is bound by its instruction count): a NaN score turns its
    // group's sums NaN, and such groups are summed again by resum_groups
    SlotAcc<S>& a = acc[h];
    const double d = double(x) - double(a.f);
    a.n += 1;
    a.s1 += d;
    a.s2 += d * d;
  }
  if (has_empty_key) t.used[t.n_used++] = int32_t(t.cap);
}

// The groups in `redo` (sums not finite: a NaN score, an infinite one, or finite scores so large
// that (x - f)^2 overflows) summed again over their scores in batch order, NaN scores left out and f
// the first non-NaN score: exactly the sums of a NaN-aware first pass (and of block_sums). A group
// whose sums still overflow while its scores are all finite is summed once more as scores times
// 2^-e (e of its largest |x|), where no sum can overflow; exp[u] = e for redo[u] (affine_coef
// scales back), 0 for the others. Returns false when a group holds an infinite score: shifted sums
// around an infinite f are NaN, so the caller computes the batch with the two-pass formula instead.
template <typename S>
bool resum_groups(const S* r, int64_t B, const int32_t* pos, SlotTable<S>& t, std::vector<int32_t> redo,
                  std::vector<int32_t>& slots, std::vector<int>& exp) {
  std::vector<int32_t> which(size_t(t.cap) + 1, -1);
  std::vector<double> sigma;
  auto resum = [&]() {
    for (size_t u = 0; u < redo.size(); ++u) {
      which[redo[u]] = int32_t(u);
      t.acc[redo[u]] = SlotAcc<S>{0.0, 0.0, S(NAN), 0};
    }
    for (int64_t i = 0; i < B; ++i) {
      const int32_t u = which[pos[i]];
      const S x = r[i];
      if (u < 0 || x != x) continue;
      SlotAcc<S>& a = t.acc[redo[u]];
      if (a.f != a.f) a.f = x;
      const double d = double(x) * sigma[u] - double(a.f) * sigma[u];
      a.n += 1;
      a.s1 += d;
      a.s2 += d * d;
    }
    for (int32_t h : redo) which[h] = -1;
  };
  sigma.assign(redo.size(), 1.0);
  resum();
  slots = redo;
  exp.assign(redo.size(), 0);
  std::vector<int32_t> big;  // positions in `slots` of the groups that overflowed
  for (size_t u = 0; u < redo.size(); ++u)
    if (!is_finite(t.acc[redo[u]].s2)) big.push_back(int32_t(u));
  if (big.empty()) return true;
  std::vector<double> max_abs(big.size(), 0.0);
  for (size_t k = 0; k < big.size(); ++k) which[redo[big[k]]] = int32_t(k);
  for (int64_t i = 0; i < B; ++i) {
    const int32_t k = which[pos[i]];
    const double x = double(r[i]);
    if (k >= 0 && x == x) max_abs[k] = std::max(max_abs[k], std::fabs(x));
  }
  for (size_t k = 0; k < big.size(); ++k) which[redo[big[k]]] = -1;
  redo.clear();
  sigma.clear();
  for (size_t k = 0; k < big.size(); ++k) {
    if (!is_finite(max_abs[k])) return false;  // an infinite score
    const int e = scale_exponent(max_abs[k]);
    exp[big[k]] = e;
    redo.push_back(slots[big[k]]);
    sigma.push_back(std::ldexp(1.0, -e));
  }
  resum();
  return true;
}

// Shifted sums of the block [begin, end) around its first non-NaN score f, scores times sigma.
template <typename S>
ShiftAcc block_sums(const S* r, int64_t begin, int64_t end, double sigma) {
  ShiftAcc a{0.0, 0.0, 0.0, double(r[begin]) * sigma};
  int64_t i0 = begin;
  while (i0 < end && is_nan(double(r[i0]))) ++i0;  // f: the first non-NaN score (as the keyed pass)
  if (i0 < end) a.f = double(r[i0]) * sigma;
  for (int64_t i = i0; i < end; ++i) {
    const double x = double(r[i]) * sigma;
    const bool ok = x == x;
    const double d = ok ? x - a.f : 0.0;
    a.n += ok ? 1.0 : 0.0;
    a.s1 += d;
    a.s2 += d * d;
  }
  return a;
}

// Returns false, having written nothing, when a keyed group holds an infinite score: the caller then
// runs group_advantage (stats_one's two-pass mean and m2, as the torch kernel and the reference).
template <typename S>
bool affine_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const AdvParams& p, S* out) {
  if (B == 0) return true;
  if (index) {
    int64_t max_cap = 4096;
    while (max_cap < kFastLoad * B) max_cap <<= 1;
    SlotTable<S> t;
    t.used = tls_scratch<int32_t>(size_t(2 * B + 1));  // used [B + 1] | pos [B]
    int32_t* pos = t.used + B + 1;
    keyed_accumulate<S>(r, B, index, pos, t, max_cap);
    std::vector<int32_t> redo;  // groups whose sums are not finite
    auto set_coef = [&](SlotAcc<S>& a, int e) {  // a slot's sums become its (base, mul)
      const double f = e ? double(a.f) * std::ldexp(1.0, -e) : double(a.f);
      const AffineCoef c = affine_coef(ShiftAcc{double(a.n), a.s1, a.s2, f}, p, e);
      a.s1 = c.base;
      a.s2 = c.mul;
    };
    for (int64_t u = 0; u < t.n_used; ++u) {
      if (u + 8 < t.n_used) __builtin_prefetch(t.acc + t.used[u + 8], 1);
      SlotAcc<S>& a = t.acc[t.used[u]];
      if (__builtin_expect(!is_finite(a.s2), 0))  // a NaN score leaves s2 NaN for good; an overflow, inf
        redo.push_back(t.used[u]);
      else
        set_coef(a, 0);
    }
    if (!redo.empty()) {
      std::vector<int32_t> slots;
      std::vector<int> exp;
      if (!resum_groups<S>(r, B, pos, t, redo, slots, exp)) return false;
      for (size_t u = 0; u < slots.size(); ++u) set_coef(t.acc[slots[u]], exp[u]);
    }
    const SlotAcc<S>* acc = t.acc;
    parallel_for(B, B >= kParallelScores ? threads_for(B, kParallelScores / 2) : 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const SlotAcc<S>& a = acc[pos[i]];
        out[i] = apply_affine<S>(r[i], AffineCoef{a.s1, a.s2});
      }
    });
    return true;
  }
  const int64_t G = (B + group_size - 1) / group_size;
  parallel_for(G, B >= kParallelScores ? threads_for(B, kParallelScores / 2) : 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t begin = g * group_size, end = std::min(begin + group_size, B);
      ShiftAcc a = block_sums<S>(r, begin, end, 1.0);
      int e = 0;
      if (__builtin_expect(!is_finite(a.s2), 0)) {  // NaN or inf scores, or an overflow
        double max_abs = 0.0;
        for (int64_t i = begin; i < end; ++i)
          if (!is_nan(double(r[i]))) max_abs = std::max(max_abs, std::fabs(double(r[i])));
        if (!is_finite(max_abs)) {  // an infinite score: shifted sums would be NaN; the two-pass formula
          const Coef cf = make_coef(stats_one<S>(r, nullptr, nullptr, begin, end), p);
          for (int64_t i = begin; i < end; ++i) out[i] = S(apply_coef(double(r[i]), cf));
          continue;
        }
        e = scale_exponent(max_abs);
        a = block_sums<S>(r, begin, end, std::ldexp(1.0, -e));
      }
      const AffineCoef c = affine_coef(a, p, e);
      for (int64_t i = begin; i < end; ++i) out[i] = apply_affine<S>(r[i], c);
    }
  });
  return true;
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

}  // namespace fastalign
