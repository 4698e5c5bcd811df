// Reverse scans over time for token-level advantages (docs/math.md#advantages), CUDA: one block
// per sequence, parallel across time (a blocked scan). Every recurrence of adv::scan_segment
// (common/advantage_math.h) is affine in its carried state (m the mask, in double):
//   return: run' = (gamma m) run + x m m        to_go: run' = gamma run + x m
//   gae:    (A, Vn)' = [[m gamma lam + 1 - m, m gamma], [0, 1 - m]] (A, Vn) + (m (x - V), m V)
// and a masked token (m = 0) is that map at m = 0 without reading x or V, as the CPU scan skips it.
// Each thread takes a contiguous segment of the row and (1) composes its tokens' maps,
// (2) the block turns the segments' maps into each segment's incoming state (one thread,
// kThreads steps, fixed order), (3) each thread walks its segment again from that state
// with adv::scan_segment and writes the outputs. A masked token of the reset return is a constant map
// (run = 0 whatever is carried in, as the CPU scan sets it): flagged `reset`, so (1) and (2) drop the
// carried state there instead of multiplying it by 0, which gave NaN before a reset for an infinite or
// NaN later reward. Elsewhere a zero coefficient (1 - m at a valid token, gamma m at a masked one) times
// an infinite carried V_next gives NaN only where the formula is NaN already (an infinite V makes every
// earlier A NaN); an infinite A is carried by al = gamma lam at a valid token, never by a 0 blend weight
// (that was scan_segment's 0 * inf, fixed there).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/advantage_math.h"
#include "cuda/entry_points.h"
#include "cuda/launch_check.h"

namespace fastalign {
namespace {

constexpr int kThreads = 256;

struct Map {  // (A, Vn) -> ([[al, be], [0, de]] (A, Vn) + (e, f)); returns use al (gamma...) and e
  double al, be, de, e, f;
  bool reset;  // a constant map: (A, Vn) -> (e, f), the carried state dropped (never multiplied by 0)
};

// The map applied to a carried state (a, nv).
__device__ __forceinline__ void apply(const Map& f, double& a, double& nv) {
  if (f.reset) {
    a = f.e;
    nv = f.f;
    return;
  }
  const double a2 = f.al * a + f.be * nv + f.e;
  nv = f.de * nv + f.f;
  a = a2;
}

// Map of one token (applied to the state carried in from the later tokens).
template <typename S>
__device__ __forceinline__ Map token_map(const S* x, const S* v, const S* m, int64_t t, double gamma, double lam,
                                         int mode) {
  const double mt = double(m[t]);
  if (mt == 0.0) {
    if (mode == adv::kReturnReset) return Map{0.0, 0.0, 0.0, 0.0, 0.0, true};  // run = 0
    return Map{mode == adv::kGae ? 1.0 : gamma, 0.0, 1.0, 0.0, 0.0, false};
  }
  const double xt = double(x[t]);
  if (mode == adv::kGae) {
    const double vt = double(v[t]);
    return Map{mt * gamma * lam + 1.0 - mt, mt * gamma, 1.0 - mt, mt * (xt - vt), mt * vt, false};
  }
  if (mode == adv::kReturnReset) return Map{gamma * mt, 0.0, 1.0, xt * mt * mt, 0.0, false};
  return Map{gamma, 0.0, 1.0, xt * mt, 0.0, false};
}

// p q for coefficients >= 0; positive factors give at least 2^-1074: a long segment's gamma^k only underflowed,
// and the token-by-token scan carries an infinite state through it as inf, never as 0 * inf = NaN
__device__ __forceinline__ double mul(double p, double q) {
  const double r = p * q;
  return r == 0.0 && p > 0.0 && q > 0.0 ? __longlong_as_double(1LL) : r;
}

// b after a (a constant a makes the composition constant: b applied to (a.e, a.f))
__device__ __forceinline__ Map then(const Map& a, const Map& b) {
  if (b.reset) return b;
  return Map{mul(b.al, a.al), mul(b.al, a.be) + mul(b.be, a.de), b.de * a.de, b.al * a.e + b.be * a.f + b.e,
             b.de * a.f + b.f, a.reset};
}

template <typename S>
__global__ void __launch_bounds__(kThreads) reverse_scan(const S* __restrict__ x, const S* __restrict__ v,
                                                         const S* __restrict__ m, S* __restrict__ out,
                                                         S* __restrict__ out2, int64_t T, double gamma, double lam,
                                                         int mode) {
  __shared__ Map seg_map[kThreads];
  __shared__ double state_a[kThreads], state_v[kThreads];
  const int64_t o = int64_t(blockIdx.x) * T;
  x += o;
  m += o;
  out += o;
  if (v) v += o;
  if (out2) out2 += o;
  const int64_t per = (T + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * per, hi = lo + per < T ? lo + per : T;

  Map acc{1.0, 0.0, 1.0, 0.0, 0.0, false};  // identity
  for (int64_t t = hi - 1; t >= lo; --t) acc = then(acc, token_map(x, v, m, t, gamma, lam, mode));
  seg_map[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {  // incoming state of each segment, from the last segment back
    double a = 0.0, nv = 0.0;
    for (int i = kThreads - 1; i >= 0; --i) {
      state_a[i] = a;
      state_v[i] = nv;
      apply(seg_map[i], a, nv);
    }
  }
  __syncthreads();

  double run = state_a[threadIdx.x], next_v = state_v[threadIdx.x];
  adv::scan_segment(x, v, m, out, out2, lo, hi, gamma, lam, mode, run, next_v);
}

template <typename S>
const char* launch(uintptr_t x, uintptr_t v, uintptr_t mask, int64_t B, int64_t T, double gamma, double lam,
                   int mode, uintptr_t out, uintptr_t out2, cudaStream_t st) {
  if (B == 0 || T == 0) return nullptr;
  reverse_scan<S><<<unsigned(B), kThreads, 0, st>>>(
      reinterpret_cast<const S*>(x), reinterpret_cast<const S*>(v), reinterpret_cast<const S*>(mask),
      reinterpret_cast<S*>(out), reinterpret_cast<S*>(out2), T, gamma, lam, mode);
  return launch_error();
}

}  // namespace

// Reverse scan over contiguous [B, T] rows (gae: values and out2 set, checked by the binding).
extern "C" const char* fastalign_reverse_scan_cuda(uintptr_t x, uintptr_t v, uintptr_t mask, bool f64, int64_t B,
                                                   int64_t T, double gamma, double lam, int mode, uintptr_t out,
                                                   uintptr_t out2, uintptr_t stream) {
  const char* error = nullptr;
  adv::with_score_type(f64, [&](auto tag) {
    error = launch<decltype(tag)>(x, v, mask, B, T, gamma, lam, mode, out, out2, reinterpret_cast<cudaStream_t>(stream));
  });
  return error;
}

}  // namespace fastalign
