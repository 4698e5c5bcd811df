// Clip-Cov / KL-Cov token selection (docs/math.md#clip-cov-and-kl-cov) on the GPU, no host synchronisation.
//
// Keys as in common/cov_select_keys.h: every token gets a unique 64-bit key (kNoKey when it
// is not a candidate) and the selection is the k_eff = min(max(floor(ratio n), 1), #cand)
// smallest keys. The k-th smallest key is found by radix selection, 8 bits per pass from the
// top byte down: a histogram of the digit among keys that share the prefix found so far
// (integer atomics: exact, so deterministic), then one block walks the 256 bins to the
// digit holding the k-th key. Counts, means and the seed are read from device memory, so the
// whole sequence is a fixed list of launches (CUDA-graph capturable).
//
// Launches: cov_sums_rows -> cov_sums_total (means), keys (+ candidate count), setup,
// 8 x (histogram, pick_digit), mark.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cov_select_keys.h"
#include "cuda/entry_points.h"
#include "cuda/launch_check.h"

namespace fastalign {
namespace {

constexpr int kThreads = 256;

// Fixed-shape tree reduction in shared memory (deterministic).
__device__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

// One row's [sum_v A, sum_v lp, n] in fp64, as the CPU kernel and the torch path sum them (so that rounding never
// moves the means, and with them a tie of covariances, apart between backends).
__global__ void cov_sums_rows(int64_t T, const float* lp, const float* adv, const uint8_t* mask, double* part) {
  __shared__ double sh[kThreads];
  const int64_t i = blockIdx.x;
  double sa = 0.0, sl = 0.0, n = 0.0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t o = i * T + t;
    if (mask[o]) { sa += adv[o]; sl += lp[o]; n += 1.0; }
  }
  sa = block_sum(sa, sh);
  sl = block_sum(sl, sh);
  n = block_sum(n, sh);
  if (threadIdx.x == 0) { part[i * 3] = sa; part[i * 3 + 1] = sl; part[i * 3 + 2] = n; }
}

__global__ void cov_sums_total(int64_t B, const double* part, float* out) {
  __shared__ double sh[kThreads];
  for (int k = 0; k < 3; ++k) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) s += part[i * 3 + k];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[k] = static_cast<float>(s);
  }
}

struct SelArgs {
  const float *lp, *old, *adv, *sums, *nloc;
  const uint8_t* mask;
  const int64_t* seed;
  double ratio, lb, ub, el, eh;
  int mode;
};

__device__ __forceinline__ CovParams params_of(const SelArgs& a) {
  return cov_params(a.sums, *a.nloc, a.ratio, a.lb, a.ub, a.el, a.eh, a.mode, static_cast<uint64_t>(*a.seed));
}

// state[0] = prefix (the k-th key when done), state[1] = k remaining, state[2] = k_eff, state[3] = #candidates
__global__ void keys_kernel(int64_t N, SelArgs a, unsigned long long* keys, unsigned long long* state) {
  const CovParams p = params_of(a);
  __shared__ unsigned int cnt;
  if (threadIdx.x == 0) cnt = 0;
  __syncthreads();
  unsigned int mine = 0;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < N; t += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t k = cov_key(p, static_cast<uint64_t>(t), a.mask[t] != 0, a.lp[t], a.old[t], a.adv[t]);
    keys[t] = k;
    mine += k != kNoKey;
  }
  if (mine) atomicAdd(&cnt, mine);
  __syncthreads();
  if (threadIdx.x == 0 && cnt) atomicAdd(&state[3], static_cast<unsigned long long>(cnt));
}

__global__ void setup_kernel(SelArgs a, unsigned long long* state) {
  const CovParams p = params_of(a);
  const unsigned long long cand = state[3];
  const unsigned long long k = static_cast<unsigned long long>(p.k) < cand ? static_cast<unsigned long long>(p.k) : cand;
  state[0] = 0;
  state[1] = k;
  state[2] = k;
}

__global__ void hist_kernel(int64_t N, int shift, const unsigned long long* keys, const unsigned long long* state,
                            unsigned int* hist) {
  if (state[2] == 0) return;
  __shared__ unsigned int h[256];
  for (int j = threadIdx.x; j < 256; j += blockDim.x) h[j] = 0;
  __syncthreads();
  const unsigned long long prefix = state[0];
  const unsigned long long high = shift == 56 ? 0ull : (~0ull << (shift + 8));
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < N; t += (int64_t)gridDim.x * blockDim.x) {
    const unsigned long long k = keys[t];
    if ((k & high) == (prefix & high)) atomicAdd(&h[(k >> shift) & 0xff], 1u);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < 256; j += blockDim.x)
    if (h[j]) atomicAdd(&hist[j], h[j]);
}

__global__ void pick_digit(int shift, unsigned long long* state, unsigned int* hist) {
  if (threadIdx.x == 0 && state[2] != 0) {
    unsigned long long rem = state[1], cum = 0;
    int d = 0;
    for (; d < 256; ++d) {
      if (cum + hist[d] >= rem) break;
      cum += hist[d];
    }
    state[1] = rem - cum;
    state[0] |= static_cast<unsigned long long>(d) << shift;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < 256; j += blockDim.x) hist[j] = 0;
}

__global__ void mark_kernel(int64_t N, const unsigned long long* keys, const unsigned long long* state, uint8_t* sel) {
  const bool any = state[2] != 0;
  const unsigned long long thr = state[0];
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < N; t += (int64_t)gridDim.x * blockDim.x) {
    const unsigned long long k = keys[t];
    sel[t] = (any && k != kNoKey && k <= thr) ? 1 : 0;
  }
}


int grid_for(int64_t N) {
  int64_t g = (N + kThreads - 1) / kThreads;
  return static_cast<int>(g < 1 ? 1 : (g > 4096 ? 4096 : g));
}

}  // namespace

// [sum_v A, sum_v lp, n_valid] of [B, T] rows; part is [B, 3] fp64 scratch.
extern "C" const char* fastalign_cov_sums_cuda(int64_t B, int64_t T, uintptr_t lp, uintptr_t adv, uintptr_t mask,
                                               uintptr_t part, uintptr_t out, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (B > 0)
    cov_sums_rows<<<static_cast<unsigned>(B), kThreads, 0, s>>>(T, ptr<const float>(lp), ptr<const float>(adv),
                                                                ptr<const uint8_t>(mask), ptr<double>(part));
  cov_sums_total<<<1, kThreads, 0, s>>>(B, ptr<const double>(part), ptr<float>(out));
  return launch_error();
}

// Clip-Cov (mode 0) / KL-Cov (mode 1) selection by radix select; keys [N] u64, hist [256] u32 and
// state [4] u64 are zeroed scratch (the caller allocates them with zeros).
extern "C" const char* fastalign_cov_select_cuda(int64_t N, uintptr_t lp, uintptr_t old, uintptr_t adv,
                                                 uintptr_t mask, uintptr_t sums, uintptr_t nloc, uintptr_t seed,
                                                 int mode, double ratio, double lb, double ub, double el, double eh,
                                                 uintptr_t keys, uintptr_t hist, uintptr_t state, uintptr_t sel,
                                                 uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SelArgs a{ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(sums),
            ptr<const float>(nloc), ptr<const uint8_t>(mask), ptr<const int64_t>(seed), ratio, lb, ub, el, eh, mode};
  auto* K = ptr<unsigned long long>(keys);
  auto* S = ptr<unsigned long long>(state);
  auto* H = ptr<unsigned int>(hist);
  const int g = grid_for(N);
  if (N > 0) keys_kernel<<<g, kThreads, 0, s>>>(N, a, K, S);
  setup_kernel<<<1, 1, 0, s>>>(a, S);
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (N > 0) hist_kernel<<<g, kThreads, 0, s>>>(N, shift, K, S, H);
    pick_digit<<<1, kThreads, 0, s>>>(shift, S, H);
  }
  if (N > 0) mark_kernel<<<g, kThreads, 0, s>>>(N, K, S, ptr<uint8_t>(sel));
  return launch_error();
}

}  // namespace fastalign
