// Reverse scans over time for token-level advantages (docs/math.md#advantages), CUDA: one
// thread per sequence walks its row from the last token to the first (the
// recurrences are sequential in t; rows are independent). Same adv::scan_row
// as the CPU kernel, so both give the same numbers.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/advantage_math.h"
#include "registry.h"

namespace fastalign {
namespace {

template <typename S>
__global__ void reverse_scan(const S* x, const S* v, const S* m, S* out, S* out2, int64_t B, int64_t T, double gamma,
                             double lam, int mode) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  adv::scan_row<S>(x + o, v ? v + o : nullptr, m + o, out + o, out2 ? out2 + o : nullptr, T, gamma, lam, mode);
}

template <typename S>
void launch(uintptr_t x, uintptr_t v, uintptr_t mask, int64_t B, int64_t T, double gamma, double lam, int mode,
            uintptr_t out, uintptr_t out2, cudaStream_t st) {
  if (B == 0 || T == 0) return;
  constexpr int kThreads = 128;
  reverse_scan<S><<<unsigned((B + kThreads - 1) / kThreads), kThreads, 0, st>>>(
      reinterpret_cast<const S*>(x), reinterpret_cast<const S*>(v), reinterpret_cast<const S*>(mask),
      reinterpret_cast<S*>(out), reinterpret_cast<S*>(out2), B, T, gamma, lam, mode);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("reverse_scan: ") + cudaGetErrorString(e));
}

}  // namespace

FASTALIGN_BINDINGS(returns_cuda) {
  namespace py = pybind11;
  m.def(
      "reverse_scan_cuda",
      [](uintptr_t x, uintptr_t v, uintptr_t mask, bool f64, int64_t B, int64_t T, double gamma, double lam, int mode,
         uintptr_t out, uintptr_t out2, uintptr_t stream) {
        if (mode == adv::kGae && (!v || !out2)) throw std::invalid_argument("reverse_scan: gae needs values and out2");
        auto st = reinterpret_cast<cudaStream_t>(stream);
        if (f64)
          launch<double>(x, v, mask, B, T, gamma, lam, mode, out, out2, st);
        else
          launch<float>(x, v, mask, B, T, gamma, lam, mode, out, out2, st);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Reverse scan over contiguous [B, T] rows, one thread per row.");
}

}  // namespace fastalign
