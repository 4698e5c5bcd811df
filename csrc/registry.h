// Each source file adds its functions to fastalign._C through one static
// registrar, so adding an op never touches module.cpp.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace fastalign {

using Binder = void (*)(pybind11::module_&);

inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}

// Raw pointer from the integer address Python passes (tensor.data_ptr()); 0 stays null.
template <typename P>
inline P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

struct RegisterBindings {
  explicit RegisterBindings(Binder b) { binders().push_back(b); }
};

}  // namespace fastalign

// FASTALIGN_BINDINGS(token_stats) { m.def(...); }
#define FASTALIGN_BINDINGS(name)                                                \
  static void fastalign_bind_##name(pybind11::module_& m);                      \
  static ::fastalign::RegisterBindings fastalign_reg_##name(fastalign_bind_##name); \
  static void fastalign_bind_##name(pybind11::module_& m)
