// The portable build's check that the CUDA part needs nothing newer than the target glibc.
// _C is a shared library, where an unresolved symbol is left for the loader to find; this
// program is linked by the same compiler, against the same glibc, from the same CUDA objects
// and static CUDA runtime, and a program may leave nothing unresolved: a symbol that the target
// glibc lacks (one the newer system headers of the nvcc host compile asked for, or one of the
// CUDA runtime) stops the build here, with its name. It is linked, never installed or run.
#include "cuda/entry_points.h"

int main(int argc, char**) {
  const void* entry_points[] = {
      reinterpret_cast<const void*>(&fastalign_token_stats_fwd_cuda),
      reinterpret_cast<const void*>(&fastalign_token_stats_bwd_cuda),
      reinterpret_cast<const void*>(&fastalign_reverse_scan_cuda),
      reinterpret_cast<const void*>(&fastalign_group_stats_cuda),
      reinterpret_cast<const void*>(&fastalign_group_advantage_cuda),
      reinterpret_cast<const void*>(&fastalign_cov_sums_cuda),
      reinterpret_cast<const void*>(&fastalign_cov_select_cuda),
      reinterpret_cast<const void*>(&fastalign_cuda_runtime_status),
  };
  return entry_points[argc % 8] == nullptr;
}
