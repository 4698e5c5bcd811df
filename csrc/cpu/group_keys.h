// Keys -> groups for the CPU group kernels: the hash both paths use and their two open-addressing
// tables, side by side.
//
// Both tables take int64 keys (any values: hashed prompt ids, 0..n, negative numbers), probe
// linearly from a Fibonacci hash (one multiply; spreads hashed ids and 0..n alike) over a
// power-of-two capacity, start small and double when their load passes a bound.
//
// Why two tables rather than one:
// - KeyTable (group_stats.cpp, the CSR path) holds each key's dense id 0..G-1 (order of first
//   appearance), which the counting sort into CSR segments and group_stats's output rows need.
//   A slot is {key, id}, id -1 = empty, so every int64 is an ordinary key. Its slots live in the
//   caller's scratch (sized for the batch) and it is kept at most 1/8 full.
// - SlotTable (group_affine.cpp, the affine fast path) names a group by its slot, and the group's
//   running sums live at that slot of a parallel array: the one-pass loop needs no id and no
//   second lookup per score. Its keys are a keys-only array (8 bytes a slot, so the hot probe
//   loop reads one compact array) whose empty marker is a key value (kEmpty), so that key
//   gets an extra slot; growth moves slots, so the slots already handed out are remapped. Its
//   storage is per thread, sized to the capacity in use, and it is kept at most 1/4 full.
// Putting the affine path on KeyTable would add a slot-to-sums indirection per score to its hot
// loop, and putting the CSR path on SlotTable would add the sentinel-key case and a second array
// to its id lookup, so each keeps the layout its loop was tuned for; they share the hash.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#ifndef FASTALIGN_ALWAYS_INLINE
#define FASTALIGN_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace fastalign {
namespace group {

// Fibonacci hashing: the top log2(cap) bits of k * (2^64 / phi) mod 2^64; shift = 64 - log2(cap).
FASTALIGN_ALWAYS_INLINE uint64_t key_hash(int64_t k, int shift) {
  return (uint64_t(k) * 0x9e3779b97f4a7c15ULL) >> shift;
}

// shift for a power-of-two capacity c
inline int hash_shift(int64_t c) {
  int shift = 64;
  for (int64_t x = c; x > 1; x >>= 1) --shift;
  return shift;
}

// ---------------------------------------------------------------- dense ids (CSR path)
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
    shift = hash_shift(c);
    for (int64_t s = 0; s < c; ++s) slots[2 * s + 1] = -1;
  }
  // slot of key k: its own, or the empty one where it belongs
  int64_t* find(int64_t k) const {
    const uint64_t mask = uint64_t(cap) - 1;
    uint64_t h = key_hash(k, shift);
    while (slots[2 * h + 1] >= 0 && slots[2 * h] != k) h = (h + 1) & mask;
    return slots + 2 * h;
  }
};

constexpr int64_t kLoad = 8;  // table kept at most 1/8 full: few collisions, so few mispredicted probes

// ---------------------------------------------------------------- slots (affine fast path)
// Keys -> slots for the fast path: linear probing over a keys-only array (8
// bytes a slot, kEmpty = free: the probe loop reads one compact array),
// Fibonacci hashing, power-of-two capacity; a group is known by its slot and
// its value (Acc: the affine path's sums) lives at acc[slot]. The key kEmpty itself, if present,
// gets the extra slot `cap`. The table starts small and doubles when 1/kFastLoad full;
// the slots already handed out (pos) follow.
constexpr int64_t kEmpty = INT64_MIN;

constexpr int64_t kFastLoad = 4;              // the fast path's key table stays at most 1/4 full

template <typename Acc>
struct SlotTable {
  int64_t* keys = nullptr;  // [cap]
  Acc* acc = nullptr;       // [cap + 1]
  int32_t* used = nullptr;  // occupied slots in order of first appearance (the extra slot last)
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
  static std::vector<Acc>& acc_store() {
    static thread_local std::vector<Acc> v;
    return v;
  }
  // an empty table of capacity c (the contents are dropped: grow saves them first)
  void reset(int64_t c) {
    cap = c;
    mask = uint64_t(c) - 1;
    shift = hash_shift(c);
    if (int64_t(key_store().size()) < c) key_store().resize(size_t(c));
    if (int64_t(acc_store().size()) < c + 1) acc_store().resize(size_t(c + 1));
    keys = key_store().data();
    acc = acc_store().data();
    std::fill(keys, keys + c, kEmpty);
  }
  FASTALIGN_ALWAYS_INLINE uint64_t find(int64_t k) const {
    uint64_t h = key_hash(k, shift);
    int64_t kk;
    while ((kk = keys[h]) != k && kk != kEmpty) h = (h + 1) & mask;
    return h;
  }
};

// Doubles t's capacity; the slots of scores [0, upto) in pos follow (growth
// happens while few groups exist, early in the batch).
template <typename Acc>
void grow(SlotTable<Acc>& t, int32_t* pos, int64_t upto) {
  const int64_t old = t.cap;
  std::vector<int64_t> k(t.n_used);
  std::vector<Acc> a(t.n_used);
  std::vector<int32_t> remap(old + 1);
  for (int64_t u = 0; u < t.n_used; ++u) {
    k[u] = t.keys[t.used[u]];
    a[u] = t.acc[t.used[u]];
    remap[t.used[u]] = int32_t(u);
  }
  const Acc extra = t.acc[old];
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

}  // namespace group
}  // namespace fastalign
