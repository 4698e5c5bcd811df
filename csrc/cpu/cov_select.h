// Clip-Cov / KL-Cov selection on the CPU, shared by cov_select.cpp (the selection mask alone) and
// policy_loss_cov.cpp (the selection inside the loss pass): "the k smallest 64-bit keys" of
// common/cov_select_keys.h, collected per thread and merged.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "common/cov_select_keys.h"

namespace fastalign {

struct Pick {
  uint64_t key;
  int64_t idx;
  bool operator<(const Pick& o) const { return key < o.key || (key == o.key && idx < o.idx); }
};

// A thread's candidates that may be among the k smallest keys: only keys below its running bound
// (the largest of its k smallest so far) are kept, in a buffer cut back to the k smallest when full.
struct TopK {
  std::vector<Pick> v;
  Pick bound{kNoKey, INT64_MAX};
  int64_t k = 1;
  size_t cap = 2;

  explicit TopK(int64_t k_ = 1) : k(k_), cap(static_cast<size_t>(std::max<int64_t>(2 * k_, k_ + 256))) {
    v.reserve(cap);
  }
  // order keys above this cannot be picked
  uint32_t bound_hi() const { return static_cast<uint32_t>(bound.key >> 32); }
  void add(const Pick& p) {
    if (!(p < bound)) return;
    v.push_back(p);
    if (v.size() >= cap) {
      std::nth_element(v.begin(), v.begin() + (k - 1), v.end());
      v.resize(static_cast<size_t>(k));
      bound = *std::max_element(v.begin(), v.end());
    }
  }
  // The tokens of a chunk flagged in hit[0..n), with their 32-bit order keys ord and flat index flat0 + i.
  void add_hits(const uint32_t* ord, const uint32_t* hit, int64_t n, int64_t flat0) {
    for (int64_t i = 0; i < n; ++i) {
      if (!hit[i]) continue;
      const int64_t idx = flat0 + i;
      add(Pick{(static_cast<uint64_t>(ord[i]) << 32) | (static_cast<uint64_t>(idx) & 0xffffffffull), idx});
    }
  }
};

// The k smallest keys over all threads' candidates (fewer when there are fewer), in no particular
// order. Keys are unique, so the set does not depend on the thread count.
inline std::vector<Pick> k_smallest(const std::vector<TopK>& tops, int64_t k) {
  std::vector<Pick> picks;
  for (const TopK& tk : tops) picks.insert(picks.end(), tk.v.begin(), tk.v.end());
  const int64_t kk = std::min<int64_t>(k, static_cast<int64_t>(picks.size()));
  if (kk == 0) return {};
  std::nth_element(picks.begin(), picks.begin() + (kk - 1), picks.end());
  picks.resize(static_cast<size_t>(kk));
  return picks;
}

// [sum_v A, sum_v lp, n_valid] of [B, T] fp32 rows (uint8 mask), fixed order (cov_select.cpp).
void cov_sums_rows(int64_t B, int64_t T, const float* lp, const float* adv, const uint8_t* mask, float* out);

}  // namespace fastalign
