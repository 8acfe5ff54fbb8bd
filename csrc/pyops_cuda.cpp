// `import pyops._C_cuda` runs the static CUDA kernel registrations of every op
// (`TORCH_LIBRARY_IMPL(pyops, CUDA, m)` in csrc/<op>/<op>_cuda.cu). The module itself is empty.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
