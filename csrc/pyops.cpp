// The pyops operator library.
//
// This translation unit owns the one `TORCH_LIBRARY(pyops, m)` block. Every op defines its
// schema with `TORCH_LIBRARY_FRAGMENT(pyops, m)` in its own folder (csrc/<op>/<op>.cpp) and
// registers its kernels per device there (`TORCH_LIBRARY_IMPL(pyops, CPU|CUDA, m)`). Fake
// kernels and autograd live in Python (pyops/<op>.py); `set_python_module` tells torch to
// import `pyops` (which registers them) whenever an op is used from C++ alone.
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "common/cpu_isa.h"
#include "common/exp_rate.h"
#include "knn_patch/screens.h"

TORCH_LIBRARY(pyops, m) {
  m.set_python_module("pyops");
}

// `import pyops._C` runs the static registrations above. The module holds only the switch of
// the CPU kernels' instruction-set path (csrc/common/cpu_isa.h), used by pyops/_backend.py:
//   _cpu_isa() -> (current, best supported), names "avx512" | "avx2" | "baseline";
//   _set_cpu_isa(name) -> None; ValueError for an unknown name or one the CPU cannot run.
// and the benchmarks' exp ceiling (csrc/common/exp_rate.h):
//   _exp_rate(reps) -> float, exp evaluations per second on all threads of the current path.
// and the screens of the global k-NN patch search (csrc/knn_patch/screens.h):
//   _knn_screens() -> tuple of names ("amx", "avx512bf16", "fp32"), best first, on the current path.
namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  using namespace pyops::cpu;
  return Py_BuildValue("(ss)", isa_name(isa()), isa_name(detected_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  using namespace pyops::cpu;
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "_set_cpu_isa: name must be a str");
    return nullptr;
  }
  for (Isa level : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::strcmp(name, isa_name(level)) != 0) continue;
    if (!set_isa(level)) {
      PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels (it supports up to %s)", name,
                   isa_name(detected_isa()));
      return nullptr;
    }
    Py_RETURN_NONE;
  }
  PyErr_Format(PyExc_ValueError, "unknown CPU instruction-set path %R (avx512, avx2 or baseline)", arg);
  return nullptr;
}

PyObject* exp_rate(PyObject*, PyObject* arg) {
  const long long reps = PyLong_AsLongLong(arg);
  if (reps == -1 && PyErr_Occurred()) return nullptr;
  PyThreadState* released = PyEval_SaveThread();  // (the GIL is not needed while it runs)
  const double rate = pyops::simd::exp_rate(reps);
  PyEval_RestoreThread(released);
  return PyFloat_FromDouble(rate);
}

PyObject* knn_screens(PyObject*, PyObject*) {
  const std::vector<std::string> names = pyops::knn_patch::available_screens();
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), name);
  }
  return out;
}

PyMethodDef methods[] = {
    {"_cpu_isa", cpu_isa, METH_NOARGS, "(current, best supported) CPU instruction-set path of the kernels"},
    {"_set_cpu_isa", set_cpu_isa, METH_O, "force the CPU instruction-set path of the kernels"},
    {"_exp_rate", exp_rate, METH_O, "exp evaluations per second of the CPU kernels' path on all threads"},
    {"_knn_screens", knn_screens, METH_NOARGS, "screens of the global float32 k-NN patch search here, best first"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
