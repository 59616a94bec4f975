// Entry point of qwenlong._C._host: the C++ (pybind11) part of the extension.
// Each topic registers its functions from its own source file through a register_* hook.
#include <pybind11/pybind11.h>

#include "registry.h"

PYBIND11_MODULE(_host, m) {
  m.doc() = "qwenlong host-side (C++) ops";
  m.attr("abi_version") = 1;
  for (const auto& register_fn : qwenlong::registry()) register_fn(m);
}
