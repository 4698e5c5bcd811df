// Segmented group statistics and group-normalised advantages (docs/math.md#advantages), CUDA.
//
// The ops layer sorts the group keys stably on the device (torch.sort) and
// numbers the segments with a cumulative sum of "key changed" flags, so no
// value ever comes back to the host: every buffer is sized by B (groups <= B)
// and the number of groups stays in device memory (`ngroups`).
//   segment_starts: start[seg] = first sorted slot of each segment, ngroups.
//   segment_kernel: one warp per segment; warps past ngroups exit (or write
//                   empty statistics rows up to `rows`). Lanes stride over the
//                   members in sorted (= batch: the sort is stable) order, then
//                   an xor-butterfly reduction leaves the same sums on every
//                   lane. The summation order depends only on the group's size:
//                   bitwise reproducible, no atomics. Then either the group's
//                   statistics row is written (group_stats) or every lane
//                   writes the advantages of its members (group_advantage).
// With a fixed group_size no sort is needed: segment s is [s*gs, (s+1)*gs).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/advantage_math.h"
#include "cuda/entry_points.h"
#include "cuda/launch_check.h"

namespace fastalign {
namespace {

using namespace adv;

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

__global__ void segment_starts(const int64_t* seg, int64_t B, int64_t* start, int64_t* ngroups) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  if (i == 0 || seg[i] != seg[i - 1]) start[seg[i]] = i;
  if (i == B - 1) *ngroups = seg[i] + 1;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Outputs {
  int64_t* gid;      // group_stats: dense id per score (else null)
  double* stats;     // group_stats: [rows, kStats] (else null)
  int64_t rows;
  int64_t* ngroups;  // group_stats with a fixed group_size: written here
  void* out;         // group_advantage: advantages (else null)
  AdvParams p;
  const double* scale;  // device scalar multiplying p.scale, or null
};

// One group's statistics, every score times sigma (1, or 2^-e when the sums overflow: see
// adv::unscale_stats), reduced over the warp: every lane returns the same.
template <typename S>
__device__ GroupStats warp_stats(const S* r, const double* len, const int64_t* perm, int64_t begin, int64_t end,
                                 int lane, double sigma) {
  GroupAcc a;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const int64_t i = perm ? perm[j] : j;
    const double x = double(r[i]) * sigma;
    if (!is_nan(x)) a.push(x, len ? len[i] : 1.0);
  }
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) {
    a.n += __shfl_xor_sync(0xffffffffu, a.n, k);
    a.sum += __shfl_xor_sync(0xffffffffu, a.sum, k);
    a.lsum += __shfl_xor_sync(0xffffffffu, a.lsum, k);
    a.lxsum += __shfl_xor_sync(0xffffffffu, a.lxsum, k);
    const double b1 = __shfl_xor_sync(0xffffffffu, a.m1, k);
    const double b2 = __shfl_xor_sync(0xffffffffu, a.m2, k);
    const double bmn = __shfl_xor_sync(0xffffffffu, a.mn, k);
    top2_merge(b1, b2, a.m1, a.m2);
    a.mn = bmn < a.mn ? bmn : a.mn;
  }
  const double mean = a.mean();
  double m2 = 0.0;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const double x = double(r[perm ? perm[j] : j]) * sigma;
    if (!is_nan(x)) m2 += (x - mean) * (x - mean);
  }
  return finish(a, mean, warp_sum(m2));
}

template <typename S>
__global__ void segment_kernel(const S* r, const double* len, const int64_t* perm, const int64_t* start,
                               const int64_t* ngroups_in, int64_t group_size, int64_t B, Outputs o) {
  const int64_t s = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t G = perm ? *ngroups_in : (B + group_size - 1) / group_size;
  if (!perm && o.ngroups && s == 0 && lane == 0) *o.ngroups = G;
  if (s >= G) {  // whole warp
    if (o.stats && lane == 0 && s < o.rows) write_empty_stats(o.stats + s * kStats);
    return;
  }
  const int64_t begin = perm ? start[s] : s * group_size;
  const int64_t end = perm ? (s + 1 < G ? start[s + 1] : B) : (begin + group_size < B ? begin + group_size : B);
  if (o.gid)
    for (int64_t j = begin + lane; j < end; j += 32) o.gid[perm ? perm[j] : j] = s;
  const GroupStats raw = warp_stats(r, len, perm, begin, end, lane, 1.0);
  GroupStats st = raw;
  if (stats_overflowed(raw)) {  // the same on every lane
    double max_abs = 0.0;
    for (int64_t j = begin + lane; j < end; j += 32) {
      const double x = double(r[perm ? perm[j] : j]);
      if (!is_nan(x)) max_abs = fmax(max_abs, fabs(x));
    }
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) max_abs = fmax(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, k));
    if (is_finite(max_abs)) {
      const int e = scale_exponent(max_abs);
      st = unscale_stats(warp_stats(r, len, perm, begin, end, lane, ldexp(1.0, -e)), raw, e);
    }
  }
  if (o.stats) {
    if (lane == 0) write_stats(o.stats + s * kStats, st);
    return;
  }
  AdvParams p = o.p;
  if (o.scale) p.scale *= *o.scale;
  const Coef cf = make_coef(st, p);
  S* out = static_cast<S*>(o.out);
  for (int64_t j = begin + lane; j < end; j += 32) {
    const int64_t i = perm ? perm[j] : j;
    out[i] = S(apply_coef(double(r[i]), cf));
  }
}

// perm/seg: stably sorted keys' original positions and segment numbers (0 for fixed blocks).
template <typename S>
const char* launch(uintptr_t scores, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size,
                   uintptr_t lengths, uintptr_t ngroups, uintptr_t start, const Outputs& o, cudaStream_t st) {
  if (B == 0) return nullptr;
  if (perm) {
    segment_starts<<<blocks_for(B), kThreads, 0, st>>>(reinterpret_cast<const int64_t*>(seg), B,
                                                       reinterpret_cast<int64_t*>(start),
                                                       reinterpret_cast<int64_t*>(ngroups));
    if (const char* error = launch_error()) return error;
  }
  const int64_t warps = perm ? B : (B + group_size - 1) / group_size;  // upper bound on the groups
  segment_kernel<S><<<blocks_for(warps * 32), kThreads, 0, st>>>(
      reinterpret_cast<const S*>(scores), reinterpret_cast<const double*>(lengths),
      reinterpret_cast<const int64_t*>(perm), reinterpret_cast<const int64_t*>(start),
      reinterpret_cast<const int64_t*>(ngroups), group_size, B, o);
  return launch_error();
}

// fp64 or fp32 scores; a fixed group size (perm = 0) is positive (checked by the binding).
const char* launch_scores(bool f64, uintptr_t scores, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size,
                          uintptr_t lengths, uintptr_t ngroups, uintptr_t start, const Outputs& o, uintptr_t stream) {
  if (!perm && group_size <= 0) return "group_size must be > 0";
  const char* error = nullptr;
  with_score_type(f64, [&](auto tag) {
    error = launch<decltype(tag)>(scores, B, perm, seg, group_size, lengths, ngroups, start, o,
                                  reinterpret_cast<cudaStream_t>(stream));
  });
  return error;
}

}  // namespace

// Group ids [B] and statistics [rows, kStats]; rows past the number of groups are written as empty groups.
extern "C" const char* fastalign_group_stats_cuda(uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg,
                                                  int64_t group_size, uintptr_t lengths, uintptr_t gid,
                                                  uintptr_t stats, int64_t rows, uintptr_t ngroups, uintptr_t start,
                                                  uintptr_t stream) {
  const Outputs o{reinterpret_cast<int64_t*>(gid), reinterpret_cast<double*>(stats), rows,
                  reinterpret_cast<int64_t*>(ngroups), nullptr, adv::AdvParams{0, false, 0.0, false, 1.0}, nullptr};
  return launch_scores(f64, scores, B, perm, seg, group_size, lengths, ngroups, start, o, stream);
}

// Group-normalised advantage per score (ngroups, start: device scratch for keyed groups).
extern "C" const char* fastalign_group_advantage_cuda(uintptr_t scores, bool f64, int64_t B, uintptr_t perm,
                                                      uintptr_t seg, int64_t group_size, uintptr_t lengths,
                                                      uintptr_t ngroups, uintptr_t start, int mode, bool div_std,
                                                      double eps, bool singleton_zero, uintptr_t scale,
                                                      uintptr_t out, uintptr_t stream) {
  const Outputs o{nullptr, nullptr, 0, nullptr, reinterpret_cast<void*>(out),
                  adv::AdvParams{mode, div_std, eps, singleton_zero, 1.0}, reinterpret_cast<const double*>(scale)};
  return launch_scores(f64, scores, B, perm, seg, group_size, lengths, ngroups, start, o, stream);
}

}  // namespace fastalign
