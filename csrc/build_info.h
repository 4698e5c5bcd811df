// What fastalign._C carries, for `python -m fastalign.info`: compile-time facts
// and the CPU features the kernels' runtime dispatch looks at.
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa_dispatch.h"

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
#elif defined(__aarch64__)
  isa.append("aarch64 (NEON)");
#endif
  // The dispatched variants come from the build-time probes of csrc/cpu/isa_probe.cpp: listed
  // only because their instruction sets were really compiled in.
  isa::CompiledVariant variants[4];
  const int n = isa::compiled_variants(variants, 4);
  py::list variant_list;
  for (int i = 0; i < n; ++i) {
    isa.append(std::string(variants[i].name) + " kernels (" + variants[i].features + "), chosen at run time");
    py::dict v;
    v["name"] = variants[i].name;
    v["features"] = variants[i].features;
    v["runs_here"] = variants[i].runs_here;
    variant_list.append(v);
  }
  d["cpu_isa"] = isa;
  d["cpu_variants"] = variant_list;
  static const char* const kLevelNames[] = {"baseline", "avx2", "avx512"};
  d["cpu_variant_used"] = kLevelNames[isa::cpu_level()];
#if defined(__x86_64__)
  py::dict cpu;
  __builtin_cpu_init();
  cpu["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  cpu["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  cpu["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  cpu["avx512vl"] = static_cast<bool>(__builtin_cpu_supports("avx512vl"));
  cpu["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  cpu["avx512dq"] = static_cast<bool>(__builtin_cpu_supports("avx512dq"));
  d["cpu_supports"] = cpu;
#endif
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
