// The op schemas of ddpm_fast (one TORCH_LIBRARY for all ops) and the Python module object of ddpm_fast._C.
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/bindings.cpp (CUDA).
#include <Python.h>
#include <torch/library.h>

#define DDPM_FAST_STR_(x) #x
#define DDPM_FAST_STR(x) DDPM_FAST_STR_(x)

TORCH_LIBRARY(ddpm_fast, m) {
  // Raw Philox4x32-10 words: counter (N, 4) int64 holding uint32 values -> (N, 4) int64 holding uint32 words.
  m.def("philox(Tensor counter, int seed) -> Tensor");
  // Standard normals in the layout of docs/design.md: out[b, e] uses counter
  // (e // 4, sample_index[b], step[b], stream_word).
  // sample_index, step: (B,) int64 in [0, 2^32); stream_word: stream | layer << 8; returns (B, numel) float32.
  m.def("philox_normal(Tensor sample_index, Tensor step, int seed, int stream_word, int numel) -> Tensor");

  // The fused diffusion ops (ddpm_fast/ops/diffusion_step.py has the references). t (B,) int64 picks the row of a
  // coefficient table coef (T, cols) in the accumulation dtype (float64 for float64 inputs, else float32); noise
  // comes from Philox counter (e // 4, sample_index[b], step[b], stream_word) in the sample's logical element order.
  // Forward noising: x_t = coef[t, 0] x0 + coef[t, 1] noise (float32 out; float64 for float64).
  m.def("q_sample(Tensor x0, Tensor t, Tensor coef, Tensor noise) -> Tensor");
  // The same with the noise drawn in the pass; returns (x_t, eps).
  m.def("q_sample_philox(Tensor x0, Tensor t, Tensor coef, Tensor sample_index, Tensor step, int seed, "
        "int stream_word) -> (Tensor, Tensor)");
  // L_simple per sample: mean of (eps_pred - eps)^2 over each sample, (B,); and its gradient for eps_pred.
  m.def("simple_loss(Tensor eps_pred, Tensor eps) -> Tensor");
  m.def("simple_loss_backward(Tensor grad, Tensor eps_pred, Tensor eps) -> Tensor");
  // One reverse step from the row coef[t] = (a, b, c_x0, c_xt, sigma): x0_hat = a x_t - b eps (clipped if clip),
  // x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z, no noise where t == 0. Returns (x_{t-1}, x0_hat if write_x0 else
  // an empty tensor). nonfinite_t (0-d int64), if given, becomes max(nonfinite_t, t[b]) over the samples b whose
  // x_{t-1} is not all finite (the sampler's flag, set by the step itself: no pass of its own, no host sync).
  m.def("reverse_step(Tensor x_t, Tensor eps, Tensor t, Tensor coef, Tensor sample_index, Tensor step, int seed, "
        "int stream_word, bool clip, bool write_x0, Tensor(a!)? nonfinite_t=None) -> (Tensor, Tensor)");

  // y = dropout(act(GroupNorm(x + add[n, c]))) (ddpm_fast/ops/group_norm.py has the reference); the dropout mask
  // from Philox counter (e // 4, sample_index[n], step[n], stream_word), kept where the uniform >= dropout. Returns y
  // (x's dtype and layout) and, per (n, group), shift = mean - pivot and rstd for the backward (accumulation dtype).
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? add, int num_groups, float eps, bool act, "
        "float dropout, Tensor sample_index, Tensor step, int seed, int stream_word) -> (Tensor, Tensor, Tensor)");
  // Gradients for x, weight, bias and add (empty when add is None), the mask regenerated.
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor shift, "
        "Tensor rstd, int num_groups, bool act, float dropout, Tensor sample_index, Tensor step, int seed, "
        "int stream_word) -> (Tensor, Tensor, Tensor, Tensor)");

  // The U-Net's attention block on folded weights (ddpm_fast/ops/attention.py): h = GN(x), g = score_weight h +
  // score_bias, P = softmax over keys of g^T h, y = x + out_weight (h P^T) + out_bias, per sample over the H*W
  // tokens. Returns y (x's dtype) and what the backward needs, in the accumulation dtype: h (N, C, L), g (N, C, L),
  // o^T = P h^T (N, L, C), the scores' log-sum-exp (N, L), and the GroupNorm's shift and rstd.
  m.def("attention_block(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor score_weight, Tensor score_bias, "
        "Tensor out_weight, Tensor out_bias, int num_groups, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  // Gradients for x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias.
  m.def("attention_block_backward(Tensor grad_y, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor score_weight, "
        "Tensor score_bias, Tensor out_weight, Tensor out_bias, Tensor h, Tensor g, Tensor o_t, Tensor lse, "
        "Tensor shift, Tensor rstd, int num_groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
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
