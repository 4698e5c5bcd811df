// Per-token statistics of logits rows on the GPU (docs/math.md#token-statistics); the CUDA twin of
// csrc/cpu/token_stats.cpp. One thread block per row.
//
// Forward: each thread streams its strided share of the row keeping
//   m (running max of x = z / T), s = sum e^{x-m}, t = sum e^{x-m} (x-m), q = sum e^{2(x-m)}
// rescaled by e^{m_old - m_new} whenever its max grows; then the block merges
// the per-thread states in a fixed tree order (deterministic), and thread 0
// writes lse = m + log s, logprob = x_y - lse, entropy = log s - t/s, sum_p2 = q/s^2.
//
// Backward: dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2),
// dz = dx / T, rows with ignore_index get zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "registry.h"

namespace fastalign {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

struct State {
  float m, s, t, q;
  int64_t arg;
};

// Merge b into a (both relative to their own max); ties keep the lower index.
__device__ __forceinline__ State merge(State a, State b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float da = a.m - m, db = b.m - m;  // <= 0, finite unless that side is empty
  const float ea = a.s > 0.f ? __expf(da) : 0.f, eb = b.s > 0.f ? __expf(db) : 0.f;
  State r;
  r.m = m;
  r.s = a.s * ea + b.s * eb;
  r.t = (a.s > 0.f ? ea * (a.t + da * a.s) : 0.f) + (b.s > 0.f ? eb * (b.t + db * b.s) : 0.f);
  r.q = a.q * ea * ea + b.q * eb * eb;
  r.arg = (b.m > a.m || (b.m == a.m && b.arg < a.arg)) ? b.arg : a.arg;
  return r;
}

__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t inner, int64_t s_outer, int64_t s_inner) {
  return (r / inner) * s_outer + (r % inner) * s_inner;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_stats_fwd_kernel(
    const T* __restrict__ logits, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
    const int64_t* __restrict__ labels, float inv_t, int64_t ignore_index, float* __restrict__ lp,
    float* __restrict__ ent, float* __restrict__ sp2, int64_t* __restrict__ amax, float* __restrict__ lse_out) {
  const int64_t r = blockIdx.x;
  const T* z = logits + row_offset(r, inner, s_outer, s_inner);
  State st{-INFINITY, 0.f, 0.f, 0.f, V};
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float x = to_f32(z[j]) * inv_t;
    if (x == -INFINITY) continue;  // masked vocabulary: contributes nothing
    if (x > st.m) {  // rescale to the new max
      const float d = st.m - x;
      const float a = st.s > 0.f ? __expf(d) : 0.f;
      st.t = st.s > 0.f ? a * (st.t + d * st.s) : 0.f;
      st.s *= a;
      st.q *= a * a;
      st.m = x;
      st.arg = j;
    }
    const float d = x - st.m;
    const float e = __expf(d);
    st.s += e;
    st.t += e > 0.f ? e * d : 0.f;
    st.q += e * e;
  }
  __shared__ State shared[kThreads];
  shared[threadIdx.x] = st;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  st = shared[0];
  const int64_t y = labels[r];
  if (amax) amax[r] = st.arg < V ? st.arg : 0;
  if (y == ignore_index) {
    lp[r] = 0.f;
    lse_out[r] = 0.f;
    if (ent) ent[r] = 0.f;
    if (sp2) sp2[r] = 0.f;
    return;
  }
  const float log_s = logf(st.s);
  const float lse = st.m + log_s;
  lse_out[r] = lse;
  lp[r] = (y >= 0 && y < V) ? to_f32(z[y]) * inv_t - lse : NAN;
  if (ent) ent[r] = log_s - st.t / st.s;
  if (sp2) sp2[r] = st.q / (st.s * st.s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_stats_bwd_kernel(
    const T* logits, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
    const int64_t* __restrict__ labels, float inv_t, int64_t ignore_index, const float* __restrict__ lse,
    const float* __restrict__ ent, const float* __restrict__ sp2, const float* __restrict__ g_lp,
    const float* __restrict__ g_h, const float* __restrict__ g_q, T* grad, int64_t g_outer, int64_t g_inner) {
  const int64_t r = blockIdx.x;
  const T* z = logits + row_offset(r, inner, s_outer, s_inner);
  T* dz = grad + row_offset(r, inner, g_outer, g_inner);  // may alias z (in-place)
  const int64_t y = labels[r];
  const bool keep = y != ignore_index;
  const float glp = (keep && g_lp) ? g_lp[r] : 0.f;
  const float gh = (keep && g_h && ent) ? g_h[r] : 0.f;
  const float gq = (keep && g_q && sp2) ? g_q[r] : 0.f;
  const float h = ent ? ent[r] : 0.f, p2 = sp2 ? sp2[r] : 0.f, l = lse[r];
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float logp = fmaxf(to_f32(z[j]) * inv_t - l, -1e30f);
    const float p = __expf(logp);
    float g = -glp * p - gh * p * (logp + h) + 2.f * gq * p * (p - p2);
    if (j == y) g += glp;
    dz[j] = from_f32<T>(keep ? g * inv_t : 0.f);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastalign ") + what + ": " + cudaGetErrorString(err));
}


template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__nv_bfloat16{}); break;
    case 2: f(__half{}); break;
    default: throw std::invalid_argument("fastalign: unsupported dtype code");
  }
}

}  // namespace

FASTALIGN_BINDINGS(token_stats_cuda) {
  namespace py = pybind11;
  m.def(
      "token_stats_fwd_cuda",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lp, uintptr_t ent, uintptr_t sp2,
         uintptr_t amax, uintptr_t lse, uintptr_t stream) {
        if (N == 0) return;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          token_stats_fwd_kernel<T><<<N, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              ptr<const T>(logits), V, inner, s_outer, s_inner, ptr<const int64_t>(labels), float(inv_t),
              ignore_index, ptr<float>(lp), ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), ptr<float>(lse));
        });
        check(cudaGetLastError(), "token_stats_fwd_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "token_stats_bwd_cuda",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lse, uintptr_t ent, uintptr_t sp2,
         uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q, uintptr_t grad, int64_t g_outer, int64_t g_inner,
         uintptr_t stream) {
        if (N == 0) return;
        dispatch(dtype, [&](auto tag) {
          using T = decltype(tag);
          token_stats_bwd_kernel<T><<<N, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              ptr<const T>(logits), V, inner, s_outer, s_inner, ptr<const int64_t>(labels), float(inv_t),
              ignore_index, ptr<const float>(lse), ptr<const float>(ent), ptr<const float>(sp2),
              ptr<const float>(g_lp), ptr<const float>(g_h), ptr<const float>(g_q), ptr<T>(grad), g_outer, g_inner);
        });
        check(cudaGetLastError(), "token_stats_bwd_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace fastalign
