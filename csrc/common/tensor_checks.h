// Input checks and memory layouts of the fused elementwise ops, shared by the CPU kernels and the CUDA binding
// (ATen, so never included by a .cu file). Layout rules as kernels/layout.py: a tensor runs in its own layout if it
// is contiguous or channels_last, else as a contiguous copy; the other inputs follow the first.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

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

// ---- the inputs of each op, checked alike on every device (`device`: where the kernels run)

// q_sample / q_sample_philox: x0, t (B,), the (T, 2) table in the accumulation dtype; noise (if defined) like x0.
inline void check_q_sample(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& coef, const at::Tensor& noise,
                           at::DeviceType device, const char* op) {
  check_floating(x0, device, op, "x0");
  if (noise.defined()) {
    check_floating(noise, device, op, "noise");
    check_same_shape(x0, noise, op, "x0", "noise");
    TORCH_CHECK(noise.scalar_type() == x0.scalar_type(), op, ": noise must have x0's dtype ", x0.scalar_type(),
                ", got ", noise.scalar_type());
  }
  check_table(coef, x0, kQSampleCoefs, acc_dtype(x0.scalar_type()), op);
  check_batch_vector(t, x0, op, "t");
}

// simple_loss and its backward: eps_pred and eps of one shape (dtypes may differ); grad (if defined) (B,) in the
// accumulation dtype.
inline void check_simple_loss(const at::Tensor& eps_pred, const at::Tensor& eps, const at::Tensor& grad,
                              at::DeviceType device, const char* op) {
  check_floating(eps_pred, device, op, "eps_pred");
  check_floating(eps, device, op, "eps");
  check_same_shape(eps_pred, eps, op, "eps_pred", "eps");
  const int64_t batch = eps_pred.size(0);
  TORCH_CHECK(batch == 0 || eps_pred.numel() > 0, op, ": samples must have at least one element, got shape ",
              eps_pred.sizes());
  if (grad.defined()) {
    const at::ScalarType acc = acc_dtype(eps_pred.scalar_type());
    TORCH_CHECK(grad.device() == eps_pred.device() && grad.scalar_type() == acc && grad.dim() == 1 &&
                    grad.size(0) == batch,
                op, ": grad must be a ", acc, " tensor of shape (", batch, ",) on ", eps_pred.device(), ", got ",
                grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  }
}

// reverse_step: the state x_t (float32; float64 on the CPU), eps like it in any float dtype, the (T, 5) table in
// x_t's dtype, and the per-sample t and counter words.
inline void check_reverse_step(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& t,
                               const at::Tensor& coef, const at::Tensor& sample_index, const at::Tensor& counter2,
                               at::DeviceType device, const char* op) {
  check_floating(x_t, device, op, "x_t");
  const auto dtype = x_t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || (device == at::kCPU && dtype == at::kDouble), op,
              ": x_t (the sampler's state) must be float32", device == at::kCPU ? " or float64" : "", ", got ",
              dtype);
  check_floating(eps, device, op, "eps");
  check_same_shape(x_t, eps, op, "x_t", "eps");
  check_table(coef, x_t, kStepCoefs, dtype, op);
  check_batch_vector(t, x_t, op, "t");
  check_batch_vector(sample_index, x_t, op, "sample_index");
  check_batch_vector(counter2, x_t, op, "counter2");
}

// The reverse step's optional flag: a 0-d int64 tensor on x's device (its data pointer), or none (nullptr).
inline int64_t* nonfinite_flag(const std::optional<at::Tensor>& flag, const at::Tensor& x, const char* op) {
  if (!flag.has_value()) return nullptr;
  TORCH_CHECK(flag->dim() == 0 && flag->scalar_type() == at::kLong && flag->device() == x.device(), op,
              ": nonfinite_t must be a 0-d int64 tensor on ", x.device(), ", got ", flag->scalar_type(), " of shape ",
              flag->sizes(), " on ", flag->device());
  return flag->data_ptr<int64_t>();
}

// ---- layouts

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

// ---- group_norm_silu and its backward

// The inputs: x (N, C, ...) with C split into num_groups, weight and bias (C,), add (N, C) or absent, all on x's
// device; the counter words (N,) int64 where dropout > 0 (unused otherwise). Returns x in a runnable layout and the
// small inputs contiguous in the accumulation dtype.
struct GroupNormInputs {
  at::Tensor x, weight, bias, add, sample_index, counter2;  // add undefined where absent
};

inline GroupNormInputs prepare_group_norm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                                          const c10::optional<at::Tensor>& add, int64_t num_groups, double dropout,
                                          const at::Tensor& sample_index, const at::Tensor& counter2,
                                          at::DeviceType device, const char* op) {
  check_floating(x_in, device, op, "x");
  TORCH_CHECK(x_in.dim() >= 2, op, ": x must have shape (N, C, ...), got ", x_in.sizes());
  const int64_t channels = x_in.size(1);
  TORCH_CHECK(num_groups >= 1 && channels % num_groups == 0, op, ": ", channels, " channels cannot be split into ",
              num_groups, " groups");
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ", dropout);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  for (const auto& [name, value] : {std::pair<const char*, const at::Tensor*>{"weight", &weight}, {"bias", &bias}}) {
    check_floating(*value, device, op, name);
    TORCH_CHECK(value->device() == x_in.device(), op, ": ", name, " must be on ", x_in.device(), ", got ",
                value->device());
    TORCH_CHECK(value->dim() == 1 && value->size(0) == channels, op, ": ", name, " must have shape (", channels,
                ",), got ", value->sizes());
  }
  GroupNormInputs p{runnable(x_in), weight.to(acc).contiguous(), bias.to(acc).contiguous(), at::Tensor(),
                    sample_index.contiguous(), counter2.contiguous()};
  if (add.has_value() && add->defined()) {
    check_floating(*add, device, op, "add");
    TORCH_CHECK(add->device() == x_in.device(), op, ": add must be on ", x_in.device(), ", got ", add->device());
    TORCH_CHECK(add->dim() == 2 && add->size(0) == x_in.size(0) && add->size(1) == channels, op,
                ": add must have shape (", x_in.size(0), ", ", channels, "), got ", add->sizes());
    p.add = add->to(acc).contiguous();
  }
  if (dropout > 0) {
    check_batch_vector(sample_index, x_in, op, "sample_index");
    check_batch_vector(counter2, x_in, op, "counter2");
  }
  return p;
}

// The statistics the forward saved: (N, num_groups) in the accumulation dtype, on x's device.
inline void check_group_norm_stats(const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& x,
                                   int64_t num_groups, const char* op) {
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  for (const auto* stat : {&shift, &rstd})
    TORCH_CHECK(stat->device() == x.device() && stat->scalar_type() == acc &&
                    stat->sizes() == at::IntArrayRef({x.size(0), num_groups}),
                op, ": the saved statistics must be ", acc, " of shape (", x.size(0), ", ", num_groups, ") on ",
                x.device(), ", got ", stat->scalar_type(), " ", stat->sizes(), " on ", stat->device());
}

// The forward's outputs: y like the prepared x, and the statistics (N, num_groups) in the accumulation dtype, zeros
// when x is empty (there are no statistics then; zeros, not uninitialised memory).
struct GroupNormOutputs {
  at::Tensor y, shift, rstd;
};

inline GroupNormOutputs group_norm_outputs(const GroupNormInputs& p, int64_t num_groups) {
  at::Tensor shift = at::empty({p.x.size(0), num_groups}, p.x.options().dtype(acc_dtype(p.x.scalar_type())));
  at::Tensor rstd = at::empty_like(shift);
  if (p.x.numel() == 0) {
    shift.zero_();
    rstd.zero_();
  }
  return {at::empty_like(p.x), shift, rstd};
}

// The backward's buffers: grad_y in x's layout and dtype, dx, and the per-(sample, channel) partial sums of dweight,
// dbias and dadd (dadd undefined without add), zeroed, in the accumulation dtype.
struct GroupNormGradBuffers {
  at::Tensor dy, dx, dw_nc, db_nc, dadd;
};

inline GroupNormGradBuffers group_norm_grad_buffers(const GroupNormInputs& p, const at::Tensor& grad_y) {
  const at::Tensor dw_nc =
      at::zeros({p.x.size(0), p.x.size(1)}, p.x.options().dtype(acc_dtype(p.x.scalar_type())));
  return {like(grad_y, p.x).to(p.x.scalar_type()), at::empty_like(p.x), dw_nc, at::zeros_like(dw_nc),
          p.add.defined() ? at::zeros_like(dw_nc) : at::Tensor()};
}

// The backward's outputs from its per-(sample, channel) partials: dweight and dbias summed over the samples (a fixed-
// order (N, C) -> (C,) reduction) in the parameters' dtypes, and dadd in add's dtype (empty without add).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_parameter_grads(
    const at::Tensor& dw_nc, const at::Tensor& db_nc, const at::Tensor& dadd, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& add, const at::Tensor& x) {
  return {dw_nc.sum(0).to(weight.scalar_type()), db_nc.sum(0).to(bias.scalar_type()),
          dadd.defined() ? dadd.to(add->scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace ddpm_fast
