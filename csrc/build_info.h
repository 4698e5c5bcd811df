// What fastalign._C carries, for `python -m fastalign.info`: compile-time facts
// and the CPU features the kernels' runtime dispatch looks at.
#pragma once
#include <pybind11/pybind11.h>

namespace fastalign {

inline pybind11::dict build_info() {
  namespace py = pybind11;
  py::dict d;
#if defined(__clang__)
  d["compiler"] = __VERSION__;
#else
  d["compiler"] = "GCC " __VERSION__;
#endif
  py::list isa;  // the baseline every function is compiled for, then the dispatched variants
#if defined(__x86_64__)
  isa.append(
#if defined(__AVX512F__)
      "x86-64-v4"
#elif defined(__AVX2__)
      "x86-64-v3"
#else
      "x86-64 (SSE2)"
#endif
  );
  isa.append("x86-64-v3 (AVX2, FMA) kernels, chosen at run time");
  isa.append("x86-64-v4 (AVX-512) kernels, chosen at run time");
  py::dict cpu;
  __builtin_cpu_init();
  cpu["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  cpu["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  cpu["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  cpu["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  d["cpu_supports"] = cpu;
#elif defined(__aarch64__)
  isa.append("aarch64 (NEON)");
#endif
  d["cpu_isa"] = isa;
#ifdef FASTALIGN_PORTABLE_GLIBC
  d["glibc_target"] = FASTALIGN_PORTABLE_GLIBC;
  d["openmp"] = "built-in (csrc/portable)";
#else
  d["glibc_target"] = py::none();
  d["openmp"] = "the compiler's runtime";
#endif
#ifdef FASTALIGN_CUDA_ARCHS
  d["cuda_archs"] = FASTALIGN_CUDA_ARCHS;
#else
  d["cuda_archs"] = "";
#endif
  return d;
}

}  // namespace fastalign
