// The op schemas of ddpm_fast (one TORCH_LIBRARY for all ops) and the Python module object of ddpm_fast._C.
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/bindings.cpp (CUDA).
#include <Python.h>
#include <torch/library.h>

#define DDPM_FAST_STR_(x) #x
#define DDPM_FAST_STR(x) DDPM_FAST_STR_(x)

TORCH_LIBRARY(ddpm_fast, m) {
  // Raw Philox4x32-10 words: counter (N, 4) int64 holding uint32 values -> (N, 4) int64 holding uint32 words.
  m.def("philox(Tensor counter, int seed) -> Tensor");
  // Standard normals in the layout of DESIGN.md: out[b, e] uses counter (e // 4, sample_index[b], counter2[b], c3).
  // sample_index, counter2: (B,) int64 in [0, 2^32); c3: stream | layer << 8; returns (B, numel) float32.
  m.def("philox_normal(Tensor sample_index, Tensor counter2, int seed, int c3, int numel) -> Tensor");
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ddpm_fast's C++/CUDA ops (torch.ops.ddpm_fast)",
                                          -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // The torch this was compiled against: ddpm_fast refuses to use the ops under another one (ABI).
  if (PyModule_AddStringConstant(m, "torch_version", DDPM_FAST_STR(DDPM_FAST_TORCH_VERSION)) < 0 ||
#ifdef DDPM_FAST_WITH_CUDA
      PyModule_AddIntConstant(m, "with_cuda", 1) < 0
#else
      PyModule_AddIntConstant(m, "with_cuda", 0) < 0
#endif
  ) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
