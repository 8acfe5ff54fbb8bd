// The pyops operator library.
//
// This translation unit owns the one `TORCH_LIBRARY(pyops, m)` block. Every op defines its
// schema with `TORCH_LIBRARY_FRAGMENT(pyops, m)` in its own folder (csrc/<op>/<op>.cpp) and
// registers its kernels per device there (`TORCH_LIBRARY_IMPL(pyops, CPU|CUDA, m)`). Fake
// kernels and autograd live in Python (pyops/<op>.py); `set_python_module` tells torch to
// import `pyops` (which registers them) whenever an op is used from C++ alone.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyops, m) {
  m.set_python_module("pyops");
}

// `import pyops._C` runs the static registrations above; the module itself is empty.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
