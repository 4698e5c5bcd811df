// Thread policy of the CPU kernels: how many OpenMP threads a loop gets.
//
// A team of threads pays a wake-up and a barrier, and the barrier waits for the
// slowest member: on a machine whose cores are shared (data loaders, the
// trainer, other ranks), one member that the OS has descheduled stalls the whole
// call for a scheduler time slice. So a loop gets one thread per
// kWorkPerThread elements of work, at most the thread count in force
// (torch.set_num_threads / OMP_NUM_THREADS, via omp_get_max_threads); below
// that it runs on the calling thread alone and never waits on a peer.
#pragma once
#include <omp.h>

#include <cstdint>

namespace fastalign {

// ~0.1-0.3 ms of single-thread work for the element-wise and row kernels.
constexpr int64_t kWorkPerThread = int64_t(1) << 19;

inline int threads_for(int64_t work) {
  const int64_t cap = omp_get_max_threads();
  const int64_t want = work / kWorkPerThread;
  return int(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace fastalign
