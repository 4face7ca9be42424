// Input checks and memory layouts of the fused elementwise ops, shared by the CPU kernels and the CUDA binding
// (ATen, so never included by a .cu file). Layout rules as kernels/layout.py: a tensor runs in its own layout if it
// is contiguous or channels_last, else as a contiguous copy; the other inputs follow the first.
#pragma once
#include <ATen/ATen.h>

#include "ddpm_fast/diffusion_step.h"

namespace ddpm_fast {

inline void check_device(const at::Tensor& x, at::DeviceType device, const char* op, const char* name) {
  TORCH_CHECK(x.device().type() == device, op, ": ", name, " must be a ", at::DeviceTypeName(device),
              " tensor here, got one on ", x.device());
}

// A data input of shape (B, ...): float32, bfloat16, float16, and float64 where the device's kernels take it.
inline void check_floating(const at::Tensor& x, at::DeviceType device, const char* op, const char* name) {
  check_device(x, device, op, name);
  const auto dtype = x.scalar_type();
  const bool wide_ok = device == at::kCPU;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || (wide_ok && dtype == at::kDouble),
              op, ": ", name, " must be float32, bfloat16 or float16", wide_ok ? " or float64" : " (float64 runs on CPU)",
              ", got ", dtype);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
}

inline void check_same_shape(const at::Tensor& x, const at::Tensor& y, const char* op, const char* xn,
                             const char* yn) {
  TORCH_CHECK(x.sizes() == y.sizes(), op, ": ", yn, " must have the shape of ", xn, " ", x.sizes(), ", got ",
              y.sizes());
  TORCH_CHECK(x.device() == y.device(), op, ": ", yn, " is on ", y.device(), " but ", xn, " is on ", x.device());
}

inline void check_batch_vector(const at::Tensor& v, const at::Tensor& x, const char* op, const char* name) {
  const int64_t batch = x.size(0);
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == batch, op, ": ", name, " must have shape (", batch, ",), got ", v.sizes());
}

inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The coefficient table: (T, cols), T >= 1, in the accumulation dtype, on x's device.
inline void check_table(const at::Tensor& coef, const at::Tensor& x, int64_t cols, at::ScalarType acc,
                        const char* op) {
  TORCH_CHECK(coef.device() == x.device(), op, ": coef must be on ", x.device(), ", got ", coef.device());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == cols && coef.size(0) > 0, op, ": coef must have shape (T, ", cols,
              "), got ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == acc, op, ": coef must be ", acc, " for these inputs, got ", coef.scalar_type());
}

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor runnable(const at::Tensor& x) {
  return x.is_contiguous() || is_channels_last(x) ? x : x.contiguous();
}

inline at::Tensor like(const at::Tensor& other, const at::Tensor& primary) {
  return is_channels_last(primary) ? other.contiguous(at::MemoryFormat::ChannelsLast) : other.contiguous();
}

// The sample layout of a runnable tensor with at least one element.
inline SampleLayout layout_of(const at::Tensor& x) {
  const int64_t numel = x.numel() / x.size(0);
  if (is_channels_last(x)) return {numel, x.size(2) * x.size(3), x.stride(0), 1, x.size(1)};
  return {numel, numel, numel, 0, 1};
}

}  // namespace ddpm_fast
