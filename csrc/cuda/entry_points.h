// The CUDA entry points: plain C functions, defined in csrc/cuda/*.cu and called by the Python
// bindings in csrc/cuda/bindings.cpp. Their host side needs only libc and the CUDA runtime (no
// C++ standard library, no exceptions, no pybind11), so nvcc may compile them with one host
// compiler and the module may be linked by another (the portable build: GCC for the .cu files,
// zig's clang with libc++ for the rest).
//
// Pointers arrive as integer addresses (0 = null) and the stream as the raw cudaStream_t.
// Arguments are checked by the bindings before the call. Each function queues its kernels and
// returns NULL, or the CUDA runtime's message for a failed launch (a static string).
#pragma once
#include <stdint.h>

extern "C" {

// csrc/cuda/token_stats.cu. dtype: 0 fp32, 1 bf16, 2 fp16.
const char* fastalign_token_stats_fwd_cuda(uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner,
                                           int64_t s_outer, int64_t s_inner, uintptr_t labels, double inv_t,
                                           int64_t ignore_index, uintptr_t lp, uintptr_t ent, uintptr_t sp2,
                                           uintptr_t amax, uintptr_t lse, uintptr_t stream);
const char* fastalign_token_stats_bwd_cuda(uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner,
                                           int64_t s_outer, int64_t s_inner, uintptr_t labels, double inv_t,
                                           int64_t ignore_index, uintptr_t lse, uintptr_t ent, uintptr_t sp2,
                                           uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q, uintptr_t grad,
                                           int64_t g_outer, int64_t g_inner, uintptr_t stream);

// csrc/cuda/returns.cu. mode: adv::kReturnReset / kReturnCarry / kGae (common/advantage_math.h).
const char* fastalign_reverse_scan_cuda(uintptr_t x, uintptr_t v, uintptr_t mask, bool f64, int64_t B, int64_t T,
                                        double gamma, double lam, int mode, uintptr_t out, uintptr_t out2,
                                        uintptr_t stream);

// csrc/cuda/group_stats.cu. perm = 0: fixed groups of group_size (> 0), else stably sorted keys.
const char* fastalign_group_stats_cuda(uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg,
                                       int64_t group_size, uintptr_t lengths, uintptr_t gid, uintptr_t stats,
                                       int64_t rows, uintptr_t ngroups, uintptr_t start, uintptr_t stream);
const char* fastalign_group_advantage_cuda(uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg,
                                           int64_t group_size, uintptr_t lengths, uintptr_t ngroups,
                                           uintptr_t start, int mode, bool div_std, double eps,
                                           bool singleton_zero, uintptr_t scale, uintptr_t out, uintptr_t stream);

// csrc/cuda/cov_select.cu. mode: 0 Clip-Cov, 1 KL-Cov.
const char* fastalign_cov_sums_cuda(int64_t B, int64_t T, uintptr_t lp, uintptr_t adv, uintptr_t mask,
                                    uintptr_t part, uintptr_t out, uintptr_t stream);
const char* fastalign_cov_select_cuda(int64_t N, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                                      uintptr_t sums, uintptr_t nloc, uintptr_t seed, int mode, double ratio,
                                      double lb, double ub, double el, double eh, uintptr_t keys, uintptr_t hist,
                                      uintptr_t state, uintptr_t sel, uintptr_t stream);

// csrc/cuda/runtime_info.cu: driver and runtime versions and the device count as the built-in
// (static) CUDA runtime sees them; returns NULL, or the runtime's message when it cannot reach
// a device (a driver too old, none installed), with *devices = 0. Never fails otherwise.
const char* fastalign_cuda_runtime_status(int* driver, int* runtime, int* devices);

}  // extern "C"
