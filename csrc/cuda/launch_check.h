// Host helpers of the CUDA entry points (csrc/cuda/entry_points.h). Kernel launches are
// asynchronous: after queueing its kernels an entry point asks for the launch error (a bad
// configuration, no device image for this GPU) and returns its message; the binding raises it,
// named (csrc/cuda/bindings.cpp).
#pragma once
#include <cuda_runtime.h>

#include <stdint.h>

namespace fastalign {

// Raw pointer from the integer address Python passes (tensor.data_ptr()); 0 stays null.
template <typename P>
inline P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

inline const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace fastalign
