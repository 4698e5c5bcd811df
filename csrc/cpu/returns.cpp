// Reverse scans over time for token-level advantages (docs/math.md#advantages), on the CPU:
// discounted returns (reinforce_pp, PRIME implicit rewards), reward-to-go
// (remax) and GAE. One row (sequence) per loop iteration (cpu/parallel.h), walked from the
// last token to the first in double; see adv::scan_row for the recurrences.
#include <cstdint>
#include <stdexcept>

#include "common/advantage_math.h"
#include "cpu/parallel.h"
#include "registry.h"

namespace fastalign {
namespace {

template <typename S>
void reverse_scan(const S* x, const S* v, const S* m, S* out, S* out2, int64_t B, int64_t T, double gamma,
                  double lam, int mode) {
  parallel_for(B, threads_for(B * T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      adv::scan_row<S>(x + o, v ? v + o : nullptr, m + o, out + o, out2 ? out2 + o : nullptr, T, gamma, lam, mode);
    }
  });
}

}  // namespace

FASTALIGN_BINDINGS(returns) {
  namespace py = pybind11;
  m.def(
      "reverse_scan_cpu",
      [](uintptr_t x, uintptr_t v, uintptr_t mask, bool f64, int64_t B, int64_t T, double gamma, double lam, int mode,
         uintptr_t out, uintptr_t out2) {
        adv::check_scan_args(mode, v, out2);
        adv::with_score_type(f64, [&](auto tag) {
          using S = decltype(tag);
          reverse_scan<S>(ptr<const S>(x), ptr<const S>(v), ptr<const S>(mask), ptr<S>(out), ptr<S>(out2), B, T, gamma,
                          lam, mode);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "Reverse scan over contiguous [B, T] rows (mode: 0 discounted return with reset, 1 reward-to-go, 2 gae).");
}

}  // namespace fastalign
