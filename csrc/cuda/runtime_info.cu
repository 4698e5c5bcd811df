// Whether the CUDA kernels built into _C can start here: the static CUDA runtime
// reports a driver that is too old, or no device, without throwing.
#include <cuda_runtime.h>

#include "cuda/entry_points.h"

extern "C" const char* fastalign_cuda_runtime_status(int* driver, int* runtime, int* devices) {
  *driver = 0;
  *runtime = 0;
  *devices = 0;
  cudaDriverGetVersion(driver);
  cudaRuntimeGetVersion(runtime);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so later launches report their own
    return cudaGetErrorString(e);
  }
  *devices = count;
  return nullptr;
}
