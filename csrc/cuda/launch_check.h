// Kernel launches are asynchronous: after queueing its kernels an entry point asks for the
// launch error (a bad configuration, no device image for this GPU) and raises it, named.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastalign {

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastalign ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace fastalign
