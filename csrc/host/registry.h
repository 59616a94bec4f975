// A tiny registry so each csrc/host/*.cpp file adds its own bindings without editing
// module.cpp: define `static qwenlong::Registrar r([](pybind11::module_& m) { ... });`.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace qwenlong {

using RegisterFn = std::function<void(pybind11::module_&)>;

inline std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}

struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(std::move(fn)); }
};

}  // namespace qwenlong
