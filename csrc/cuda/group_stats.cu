// Segmented group statistics and group-normalised advantages (SPEC §5), CUDA.
//
// The ops layer sorts the group keys stably on the device (torch.sort) and
// numbers the segments with a cumulative sum of "key changed" flags, so no
// value ever comes back to the host: every buffer is sized by B (groups <= B)
// and the number of groups stays in device memory (`ngroups`).
//   segment_starts: start[seg] = first sorted slot of each segment, ngroups.
//   segment_stats:  one warp per segment (warps past ngroups write empty
//                   groups); lanes stride over the members in sorted (= batch,
//                   the sort is stable) order, then an xor-butterfly reduction.
//                   The summation order depends only on the group's size, so
//                   results are bitwise reproducible (no atomics).
//   normalize:      one thread per score, adv::group_advantage.
// With a fixed group_size no sort is needed: segment s is [s*gs, (s+1)*gs).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/advantage_math.h"
#include "registry.h"

namespace fastalign {
namespace {

using namespace adv;

constexpr int kThreads = 256;

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

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

template <typename S>
__global__ void segment_stats(const S* r, const double* len, const int64_t* perm, const int64_t* start,
                              int64_t* ngroups, int64_t group_size, int64_t B, int64_t* gid, double* stats) {
  const int64_t s = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (s >= B) return;  // whole warp
  const int64_t G = perm ? *ngroups : (B + group_size - 1) / group_size;
  if (!perm && s == 0 && lane == 0) *ngroups = G;
  if (s >= G) {
    if (lane == 0) write_empty_stats(stats, B, s);
    return;
  }
  const int64_t begin = perm ? start[s] : s * group_size;
  const int64_t end = perm ? (s + 1 < G ? start[s + 1] : B) : (begin + group_size < B ? begin + group_size : B);
  GroupAcc a;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const int64_t i = perm ? perm[j] : j;
    gid[i] = s;
    const double x = double(r[i]);
    if (!is_nan(x)) a.push(x, len ? len[i] : 1.0);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a.n += __shfl_xor_sync(0xffffffffu, a.n, o);
    a.sum += __shfl_xor_sync(0xffffffffu, a.sum, o);
    a.lsum += __shfl_xor_sync(0xffffffffu, a.lsum, o);
    a.lxsum += __shfl_xor_sync(0xffffffffu, a.lxsum, o);
    const double b1 = __shfl_xor_sync(0xffffffffu, a.m1, o);
    const double b2 = __shfl_xor_sync(0xffffffffu, a.m2, o);
    const double bmn = __shfl_xor_sync(0xffffffffu, a.mn, o);
    top2_merge(b1, b2, a.m1, a.m2);
    a.mn = bmn < a.mn ? bmn : a.mn;
  }
  const double mean = a.mean();
  double m2 = 0.0;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const double x = double(r[perm ? perm[j] : j]);
    if (!is_nan(x)) m2 += (x - mean) * (x - mean);
  }
  m2 = warp_sum(m2);
  if (lane == 0) write_stats(stats, B, s, a, mean, m2);
}

template <typename S>
__global__ void normalize(const S* r, int64_t B, const int64_t* gid, const double* stats, int mode, bool div_std,
                          double eps, bool singleton_zero, const double* scale, S* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const int64_t g = gid[i];
  out[i] = S(group_advantage(double(r[i]), stats[kCount * B + g], stats[kMean * B + g], stats[kStd * B + g],
                             stats[kMax * B + g], stats[kSecond * B + g], stats[kWMean * B + g], mode, div_std, eps,
                             singleton_zero, scale ? scale[0] : 1.0));
}

template <typename S>
void launch_stats(uintptr_t scores, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size, uintptr_t lengths,
                  uintptr_t gid, uintptr_t stats, uintptr_t ngroups, uintptr_t start, cudaStream_t st) {
  if (B == 0) return;
  auto* ng = reinterpret_cast<int64_t*>(ngroups);
  if (perm) {
    segment_starts<<<blocks_for(B), kThreads, 0, st>>>(reinterpret_cast<const int64_t*>(seg), B,
                                                       reinterpret_cast<int64_t*>(start), ng);
    check_launch("segment_starts");
  }
  segment_stats<S><<<blocks_for(B * 32), kThreads, 0, st>>>(
      reinterpret_cast<const S*>(scores), reinterpret_cast<const double*>(lengths),
      reinterpret_cast<const int64_t*>(perm), reinterpret_cast<const int64_t*>(start), ng, group_size, B,
      reinterpret_cast<int64_t*>(gid), reinterpret_cast<double*>(stats));
  check_launch("segment_stats");
}

template <typename S>
void launch_normalize(uintptr_t scores, int64_t B, uintptr_t gid, uintptr_t stats, int mode, bool div_std, double eps,
                      bool singleton_zero, uintptr_t scale, uintptr_t out, cudaStream_t st) {
  if (B == 0) return;
  normalize<S><<<blocks_for(B), kThreads, 0, st>>>(
      reinterpret_cast<const S*>(scores), B, reinterpret_cast<const int64_t*>(gid),
      reinterpret_cast<const double*>(stats), mode, div_std, eps, singleton_zero,
      reinterpret_cast<const double*>(scale), reinterpret_cast<S*>(out));
  check_launch("group_normalize");
}

}  // namespace

FASTALIGN_BINDINGS(group_stats_cuda) {
  namespace py = pybind11;
  m.def(
      "group_stats_cuda",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size, uintptr_t lengths,
         uintptr_t gid, uintptr_t stats, uintptr_t ngroups, uintptr_t start, uintptr_t stream) {
        if (!perm && group_size <= 0) throw std::invalid_argument("group_stats: group_size must be > 0");
        auto st = reinterpret_cast<cudaStream_t>(stream);
        if (f64)
          launch_stats<double>(scores, B, perm, seg, group_size, lengths, gid, stats, ngroups, start, st);
        else
          launch_stats<float>(scores, B, perm, seg, group_size, lengths, gid, stats, ngroups, start, st);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Group statistics on the device from stably sorted keys (perm, seg) or a fixed group_size (perm = 0).");
  m.def(
      "group_normalize_cuda",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t gid, uintptr_t stats, int mode, bool div_std, double eps,
         bool singleton_zero, uintptr_t scale, uintptr_t out, uintptr_t stream) {
        auto st = reinterpret_cast<cudaStream_t>(stream);
        if (f64)
          launch_normalize<double>(scores, B, gid, stats, mode, div_std, eps, singleton_zero, scale, out, st);
        else
          launch_normalize<float>(scores, B, gid, stats, mode, div_std, eps, singleton_zero, scale, out, st);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Per-score advantage from its group statistics, one thread per score.");
}

}  // namespace fastalign
