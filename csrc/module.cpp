// The Python module of the extension: an empty one, whose import loads this library, and loading it
// runs the kernels' registrations (the TORCH_LIBRARY_IMPL block at the end of each csrc/<op>.cpp).
// TORCH_EXTENSION_NAME is set by the build (_C_avx512, _C_avx2 or _C_default).

#include <Python.h>

#define FASTGPT_CONCAT(a, b) a##b
#define FASTGPT_MODULE_INIT(name) FASTGPT_CONCAT(PyInit_, name)
#define FASTGPT_STRING(name) #name
#define FASTGPT_MODULE_NAME(name) FASTGPT_STRING(name)

extern "C" PyObject* FASTGPT_MODULE_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTGPT_MODULE_NAME(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
