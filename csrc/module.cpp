// fastalign._C: one pybind11 module, no libtorch. Python passes data pointers
// (as integers), sizes, strides and, for CUDA, the raw stream handle.
#include <omp.h>

#include "build_info.h"
#include "registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastalign compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef FASTALIGN_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("num_threads", []() { return omp_get_max_threads(); },
        "OpenMP threads the CPU kernels use (set OMP_NUM_THREADS to change)");
  m.def("build_info", []() { return fastalign::build_info(); },
        "How this binary was built: compiler, CPU instruction sets, CUDA architectures, OpenMP runtime");
  for (auto bind : fastalign::binders()) bind(m);
}
