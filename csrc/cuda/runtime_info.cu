// Whether the CUDA kernels built into _C can start here: the static CUDA runtime
// reports a driver that is too old, or no device, without throwing.
#include <cuda_runtime.h>

#include <string>

#include "registry.h"

FASTALIGN_BINDINGS(runtime_info_cuda) {
  m.def("cuda_runtime_status", []() {
    int driver = 0, runtime = 0, devices = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    const cudaError_t e = cudaGetDeviceCount(&devices);
    const std::string error = e == cudaSuccess ? "" : cudaGetErrorString(e);
    if (e != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
    return pybind11::make_tuple(driver, runtime, e == cudaSuccess ? devices : 0, error);
  }, "(driver version, runtime version, devices, error) as the built-in CUDA runtime sees them");
}
