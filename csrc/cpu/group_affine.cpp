// The affine fast path of the CPU group advantages (docs/math.md#advantages): center / rloo (grpo,
// Dr. GRPO, gpg, rloo, reinforce_pp_baseline) need only count, mean and std per group. One pass
// over the batch finds each score's group (its slot in a hash table of keys, group_keys.h) and
// accumulates, at that slot, shifted sums around the group's first non-NaN score f:
//   n, s1 = sum (x - f), s2 = sum (x - f)^2       (in batch order: deterministic)
//   mean = f + s1 / n, m2 = s2 - s1^2 / n
// Shifting by a member keeps the cancellation small (m2 >= range^2 / 2 while
// s2 <= n range^2), and a group of equal scores gets s1 = s2 = 0 exactly: its
// mean is exactly that score and its std exactly 0. The slot's sums are then
// replaced by (base, mul) and a second pass applies (x - base) * mul per score.
// Keyed groups and fixed blocks run the same per-group arithmetic in the same
// order, so both layouts agree bitwise. The entry point, affine_advantage, is declared in
// group_stats.h and called by the bindings in group_stats.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/advantage_math.h"
#include "cpu/group_keys.h"
#include "cpu/group_stats.h"
#include "cpu/parallel.h"

namespace fastalign {
namespace group {
namespace {

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

// A group's running sums, kept at its key's slot (24 bytes for fp32 scores: f
// is a score, exact in S).
template <typename S>
struct SlotAcc {
  double s1, s2;
  S f;
  int32_t n;
};

// The fast path's table: a group's sums at its key's slot.
template <typename S>
using AffineTable = SlotTable<SlotAcc<S>>;

// A key not in the table yet (or the sentinel key): its slot, with fresh sums
// f = x; grows the table when 1/kFastLoad full. Out of line: the hot loop
// stays small.
template <typename S>
__attribute__((noinline)) uint64_t new_slot(AffineTable<S>& t, int64_t k, S x, uint64_t h, bool& has_empty_key,
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
void keyed_accumulate(const S* r, int64_t B, const int64_t* index, int32_t* pos, AffineTable<S>& t, int64_t max_cap) {
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
    uint64_t h = key_hash(k, shift);
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
bool resum_groups(const S* r, int64_t B, const int32_t* pos, AffineTable<S>& t, std::vector<int32_t> redo,
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

}  // namespace

// Returns false, having written nothing, when a keyed group holds an infinite score: the caller then
// runs group_advantage (stats_one's two-pass mean and m2, as the torch kernel and the reference).
template <typename S>
bool affine_advantage(const S* r, int64_t B, const int64_t* index, int64_t group_size, const AdvParams& p, S* out) {
  if (B == 0) return true;
  if (index) {
    int64_t max_cap = 4096;
    while (max_cap < kFastLoad * B) max_cap <<= 1;
    AffineTable<S> t;
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

template bool affine_advantage<float>(const float*, int64_t, const int64_t*, int64_t, const AdvParams&, float*);
template bool affine_advantage<double>(const double*, int64_t, const int64_t*, int64_t, const AdvParams&, double*);

}  // namespace group
}  // namespace fastalign
