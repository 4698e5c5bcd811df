// Per-token statistics of logits rows on the GPU (docs/math.md#token-statistics); the CUDA twin of
// csrc/cpu/token_stats.cpp. One thread block per row.
//
// Forward: each thread streams its share of the row in 16-byte vectors (8 bf16/fp16
// or 4 fp32; two vectors in flight per step, both loaded before either is used),
// keeping x = z / T's running state relative to its running max m:
//   s = sum e^{x-m}, t = sum e^{x-m} (x-m), q = sum e^{2(x-m)}
// rescaled by a = e^{m_old - m_new} (t' = a (t + (m_old - m_new) s)) once per vector
// when its max is larger. The block merges the per-thread states with warp shuffles
// and one shared-memory round, in a fixed order (deterministic), and thread 0 writes
// lse, logprob, entropy and sum_p2 (common/softmax_stats.h).
// m starts at -inf; max differences are clamped at -1e30 and x - m is taken against
// max(m, -FLT_MAX), so -inf logits give e = 0 without inf - inf; a NaN logit gives
// e = NaN, which no step clamps away: its row's outputs are NaN (as on the CPU).
// Rows whose label is ignore_index are not read unless their argmax is asked for.
//
// Backward: dx_j of common/softmax_stats.h, dz = dx / T; ignored rows get zeros without a read. The
// saved fp32 lse is off by up to ulp(lse) / 2 (<= 2^-20 below |lse| = 32, 5e-4 at 1e4): a row
// with |lse| >= 32 first forms log c = log sum_j e^{x_j - lse} (that rounding; the sum is ~1),
// reading the whole row before the block barrier of its sum, as the CPU backward does. Each
// thread loads all of its step's vectors before it stores any, so d(logits) may
// overwrite the logits in place (each element is read, then written, by one thread).
// Rows not 16-byte aligned (odd V) take the scalar loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/softmax_stats.h"
#include "cuda/entry_points.h"
#include "cuda/launch_check.h"

namespace fastalign {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // 16-byte vectors in flight per thread and step

using softmax::RowLayout;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

// x = z / T as a rounded product that is never fused into an FMA with a later subtraction: the row
// max m is one of these x, so x - m is exactly 0 at the max at any temperature (fused, it would keep
// the rounding of m: a log-prob off by 1e-2 at T = 1e-6), and log c sums the same x as the backward.
template <typename T> __device__ __forceinline__ float scaled(T z, float inv_t) { return __fmul_rn(to_f32(z), inv_t); }

template <typename T>
struct Pack {  // one 16-byte vector of T
  static constexpr int N = 16 / sizeof(T);
  uint4 raw;
  __device__ __forceinline__ float logit(int k) const { return to_f32(reinterpret_cast<const T*>(&raw)[k]); }
  __device__ __forceinline__ float get(int k, float inv_t) const { return scaled(logit(k), inv_t); }
  __device__ __forceinline__ void set(int k, float v) { reinterpret_cast<T*>(&raw)[k] = from_f32<T>(v); }
};

struct State {
  float m, s, t, q;  // over x = z / T
  float zm;          // the largest logit z (before the temperature: two logits may round to one z / T)
  int64_t arg;       // first index of zm
};

__device__ __forceinline__ void rescale(State& st, float M) {
  const float dm = fmaxf(st.m - M, -1e30f);  // empty states (m = -inf, also under M = -inf): a = 0, no inf * 0
  const float a = __expf(dm);
  st.t = a * (st.t + dm * st.s);
  st.s *= a;
  st.q *= a * a;
  st.m = M;
}

// Fold K logits z (indices j0 .. j0+K-1) into a thread's state with one branch-free rescale (so
// the compiler keeps every load of a step ahead of the math). FULL: also t, q and the argmax (on z);
// without it only m and s are kept (log-probs alone).
template <bool FULL, int K>
__device__ __forceinline__ void add(State& st, const float (&z)[K], float inv_t, int64_t j0) {
  float x[K];
  float vmax = st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    x[k] = scaled(z[k], inv_t);
    vmax = fmaxf(vmax, x[k]);        // a NaN is passed over here; its e below is NaN
  }
  if (FULL) {
    float vz = st.zm;
    int64_t varg = st.arg;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (z[k] > vz) {  // NaN never compares greater
        vz = z[k];
        varg = j0 + k;
      }
    st.zm = vz;
    st.arg = varg;
  }
  rescale(st, vmax);  // a = 1 when the max did not grow
  const float m_safe = fmaxf(st.m, -FLT_MAX);  // a -inf logit gives e = 0 even before any finite one
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = x[k] - m_safe;
    const float e = __expf(d);
    st.s += e;
    if (FULL) {
      st.t += e * fmaxf(d, -1e30f);  // -inf logits: e = 0 and no 0 * inf
      st.q += e * e;
    }
  }
}

// Merge two states; symmetric (ties keep the lower index), so shuffle partners agree.
__device__ __forceinline__ State merge(State a, State b) {
  const float M = fmaxf(a.m, b.m);
  const bool b_arg = b.zm > a.zm || (b.zm == a.zm && b.arg < a.arg);
  const float zm = b_arg ? b.zm : a.zm;
  const int64_t arg = b_arg ? b.arg : a.arg;
  rescale(a, M);
  rescale(b, M);
  return State{M, a.s + b.s, a.t + b.t, a.q + b.q, zm, arg};
}

__device__ __forceinline__ State shfl_xor(const State& st, int lane_mask) {
  return State{__shfl_xor_sync(0xffffffffu, st.m, lane_mask), __shfl_xor_sync(0xffffffffu, st.s, lane_mask),
               __shfl_xor_sync(0xffffffffu, st.t, lane_mask), __shfl_xor_sync(0xffffffffu, st.q, lane_mask),
               __shfl_xor_sync(0xffffffffu, st.zm, lane_mask),
               static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(st.arg), lane_mask))};
}

__device__ __forceinline__ State block_merge(State st) {
  __shared__ State warp_state[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_state[lane] : State{-INFINITY, 0.f, 0.f, 0.f, -INFINITY, INT64_MAX};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  }
  return st;
}

// Sum of one value per thread, in a fixed order (deterministic); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sum[kThreads / 32];
  __shared__ float total;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sum[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sum[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, bool FULL>
__global__ void __launch_bounds__(kThreads) token_stats_fwd_kernel(
    const T* __restrict__ logits, int64_t V, RowLayout L, const int64_t* __restrict__ labels, float inv_t,
    int64_t ignore_index, float* __restrict__ lp,
    float* __restrict__ ent, float* __restrict__ sp2, int64_t* __restrict__ amax, float* __restrict__ lse_out) {
  using P = Pack<T>;
  const int64_t r = blockIdx.x;
  const T* __restrict__ z = logits + L.offset(r);
  const int64_t y = labels[r];
  const bool ignored = y == ignore_index;
  State st{-INFINITY, 0.f, 0.f, 0.f, -INFINITY, 0};
  if (!ignored || amax) {
    const int64_t nvec = aligned16(z) ? V / P::N : 0;
    const uint4* __restrict__ zv = reinterpret_cast<const uint4*>(z);
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
      P pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u].raw = __ldg(zv + i + u * kThreads);  // all loads first
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float zk[P::N];
#pragma unroll
        for (int k = 0; k < P::N; ++k) zk[k] = pk[u].logit(k);
        add<FULL>(st, zk, inv_t, (i + u * kThreads) * P::N);
      }
    }
    for (; i < nvec; i += kThreads) {
      P pk;
      pk.raw = __ldg(zv + i);
      float zk[P::N];
#pragma unroll
      for (int k = 0; k < P::N; ++k) zk[k] = pk.logit(k);
      add<FULL>(st, zk, inv_t, i * P::N);
    }
    for (int64_t j = nvec * P::N + threadIdx.x; j < V; j += kThreads) {
      const float zj[1] = {to_f32(z[j])};
      add<FULL>(st, zj, inv_t, j);
    }
  }
  st = block_merge(st);
  if (threadIdx.x != 0) return;
  if (amax) amax[r] = st.arg < V ? st.arg : 0;
  if (ignored) {
    lp[r] = 0.f;
    lse_out[r] = 0.f;
    if (ent) ent[r] = 0.f;
    if (sp2) sp2[r] = 0.f;
    return;
  }
  const float log_s = logf(st.s);
  lse_out[r] = softmax::log_sum_exp(st.m, log_s);
  lp[r] = (y >= 0 && y < V) ? softmax::logprob(scaled(z[y], inv_t), st.m, log_s) : NAN;
  if (ent) ent[r] = softmax::entropy(log_s, st.t, st.s);
  if (sp2) sp2[r] = softmax::sum_p2(st.q, st.s);
}

// FULL: entropy / sum p^2 gradients too; without it only the log-prob term.
template <bool FULL>
struct RowGrad {
  float glp, gh, gq, h, p2, lse, log_c, inv_t;
  int y;  // the label's column (-1 when outside the row)
  __device__ __forceinline__ float operator()(float x, int j) const {
    const float logp = softmax::log_p(x, lse, log_c);
    const float p = __expf(logp);
    float g = FULL ? softmax::logit_grad(p, logp, glp, gh, h, gq, p2) : -glp * p;
    if (j == y) g += glp;
    return g * inv_t;
  }
};

template <typename T, bool FULL>
__global__ void __launch_bounds__(kThreads) token_stats_bwd_kernel(
    const T* __restrict__ logits, int64_t V, RowLayout L, const int64_t* __restrict__ labels, float inv_t,
    int64_t ignore_index, const float* __restrict__ lse, const float* __restrict__ ent,
    const float* __restrict__ sp2, const float* __restrict__ g_lp, const float* __restrict__ g_h,
    const float* __restrict__ g_q, T* __restrict__ grad, RowLayout G) {
  using P = Pack<T>;
  const int64_t r = blockIdx.x;
  const T* __restrict__ z = logits + L.offset(r);
  T* __restrict__ dz = grad + G.offset(r);  // may be z itself (in-place)
  const int64_t y = labels[r];
  const bool keep = y != ignore_index;
  const float row_lse = lse[r];
  float log_c = 0.f;
  if (keep && fabsf(row_lse) >= softmax::kRenormaliseAbove) {  // the same for the whole block
    float c = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) c += __expf(scaled(z[j], inv_t) - row_lse);
    log_c = logf(block_sum(c));  // its barriers: every read of z here precedes any write of dz
  }
  const RowGrad<FULL> f{(keep && g_lp) ? g_lp[r] : 0.f, (keep && g_h && ent) ? g_h[r] : 0.f,
                        (keep && g_q && sp2) ? g_q[r] : 0.f, ent ? ent[r] : 0.f, sp2 ? sp2[r] : 0.f, row_lse, log_c,
                        inv_t, (y >= 0 && y < V) ? int(y) : -1};
  const int64_t nvec = (aligned16(z) && aligned16(dz)) ? V / P::N : 0;
  const uint4* __restrict__ zv = reinterpret_cast<const uint4*>(z);
  uint4* __restrict__ dv = reinterpret_cast<uint4*>(dz);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
    P pk[kUnroll];
    if (keep) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u].raw = zv[i + u * kThreads];  // all loads before any store
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j0 = int((i + u * kThreads) * P::N);  // V < 2^31
#pragma unroll
      for (int k = 0; k < P::N; ++k) pk[u].set(k, keep ? f(pk[u].get(k, inv_t), j0 + k) : 0.f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dv[i + u * kThreads] = pk[u].raw;
  }
  for (; i < nvec; i += kThreads) {
    P pk;
    if (keep) pk.raw = zv[i];
#pragma unroll
    for (int k = 0; k < P::N; ++k) pk.set(k, keep ? f(pk.get(k, inv_t), int(i * P::N) + k) : 0.f);
    dv[i] = pk.raw;
  }
  for (int64_t j = nvec * P::N + threadIdx.x; j < V; j += kThreads)
    dz[j] = from_f32<T>(keep ? f(scaled(z[j], inv_t), int(j)) : 0.f);
}


// f(T{}) for the dtype code (0 fp32, 1 bf16, 2 fp16); false for any other code.
template <typename F>
bool dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); return true;
    case 1: f(__nv_bfloat16{}); return true;
    case 2: f(__half{}); return true;
    default: return false;
  }
}

}  // namespace

extern "C" const char* fastalign_token_stats_fwd_cuda(uintptr_t logits, int dtype, int64_t N, int64_t V,
                                                      int64_t inner, int64_t s_outer, int64_t s_inner,
                                                      uintptr_t labels, double inv_t, int64_t ignore_index,
                                                      uintptr_t lp, uintptr_t ent, uintptr_t sp2, uintptr_t amax,
                                                      uintptr_t lse, uintptr_t stream) {
  if (N == 0) return nullptr;
  const bool known = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = (ent || sp2 || amax) ? token_stats_fwd_kernel<T, true> : token_stats_fwd_kernel<T, false>;
    kernel<<<N, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        ptr<const T>(logits), V, RowLayout{inner, s_outer, s_inner}, ptr<const int64_t>(labels),
        float(inv_t), ignore_index, ptr<float>(lp), ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), ptr<float>(lse));
  });
  return known ? launch_error() : "unsupported dtype code";
}

extern "C" const char* fastalign_token_stats_bwd_cuda(uintptr_t logits, int dtype, int64_t N, int64_t V,
                                                      int64_t inner, int64_t s_outer, int64_t s_inner,
                                                      uintptr_t labels, double inv_t, int64_t ignore_index,
                                                      uintptr_t lse, uintptr_t ent, uintptr_t sp2, uintptr_t g_lp,
                                                      uintptr_t g_h, uintptr_t g_q, uintptr_t grad, int64_t g_outer,
                                                      int64_t g_inner, uintptr_t stream) {
  if (N == 0) return nullptr;
  const bool known = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool full = (g_h && ent) || (g_q && sp2);
    auto kernel = full ? token_stats_bwd_kernel<T, true> : token_stats_bwd_kernel<T, false>;
    kernel<<<N, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        ptr<const T>(logits), V, RowLayout{inner, s_outer, s_inner}, ptr<const int64_t>(labels),
        float(inv_t), ignore_index, ptr<const float>(lse), ptr<const float>(ent), ptr<const float>(sp2),
        ptr<const float>(g_lp), ptr<const float>(g_h), ptr<const float>(g_q), ptr<T>(grad),
        RowLayout{inner, g_outer, g_inner});
  });
  return known ? launch_error() : "unsupported dtype code";
}

}  // namespace fastalign
