// Declares the loratools operators (schema only) and the Python module `loratools._C` whose
// import runs the registrations. Device implementations live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing loratools._C only has to load this library; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(loratools, m) {
  // weight += sum_i coeffs[i] * ups[i] @ downs[i], fp32 accumulation, one rounding per element.
  m.def("merge_(Tensor(a!) weight, Tensor[] ups, Tensor[] downs, float[] coeffs) -> ()");
  // No NaN or Inf in t (fp32/bf16/fp16); CPU only.
  m.def("all_finite(Tensor t) -> bool");
}
