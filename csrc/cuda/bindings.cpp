// Registers the CUDA kernels of csrc/cuda/*.cu as the CUDA implementations of the ddpm_fast ops.
// Only this file sees torch; the kernels take pointers, sizes and a stream. A t outside the table gives NaN there
// (checking it here would sync the host); the Python layer checks t where it is public.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/tensor_checks.h"
#include "launchers.h"

namespace ddpm_fast {
namespace {

void check_cuda_long(const at::Tensor& v, const char* op, const char* name) {
  TORCH_CHECK(v.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", v.scalar_type());
}

at::Tensor philox_cuda(const at::Tensor& counter, int64_t seed) {
  check_cuda_long(counter, "philox", "counter");
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "philox: counter must have shape (N, 4), got ",
              counter.sizes());
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  C10_CUDA_CHECK(cuda::philox(c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), c.size(0), static_cast<uint64_t>(seed),
                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor philox_normal_cuda(const at::Tensor& sample_index, const at::Tensor& counter2, int64_t seed, int64_t c3,
                              int64_t numel) {
  TORCH_CHECK(numel > 0, "philox_normal: numel must be positive, got ", numel);
  check_cuda_long(sample_index, "philox_normal", "sample_index");
  check_cuda_long(counter2, "philox_normal", "counter2");
  TORCH_CHECK(sample_index.dim() == 1, "philox_normal: sample_index must have shape (B,), got ", sample_index.sizes());
  const int64_t batch = sample_index.size(0);
  TORCH_CHECK(counter2.dim() == 1 && counter2.size(0) == batch, "philox_normal: counter2 must have shape (", batch,
              ",), got ", counter2.sizes());
  TORCH_CHECK(counter2.device() == sample_index.device(), "philox_normal: sample_index and counter2 on different devices");
  const c10::cuda::CUDAGuard guard(sample_index.device());
  const at::Tensor c1 = sample_index.contiguous();
  const at::Tensor c2 = counter2.contiguous();
  at::Tensor out = at::empty({batch, numel}, c1.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::philox_normal(c1.data_ptr<int64_t>(), c2.data_ptr<int64_t>(), out.data_ptr<float>(), batch, numel,
                                     static_cast<uint64_t>(seed), static_cast<uint32_t>(c3),
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}


cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "ddpm_fast: no CUDA kernel for dtype ", x.scalar_type());
  }
}

at::Tensor q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& t, const at::Tensor& coef,
                         const at::Tensor& noise_in) {
  check_q_sample(x0_in, t, coef, noise_in, at::kCUDA, "q_sample");
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = runnable(x0_in), noise = like(noise_in, x0);
  at::Tensor x_t = at::empty_like(x0, x0.options().dtype(at::kFloat));
  if (x0.numel() == 0) return x_t;
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  C10_CUDA_CHECK(cuda::q_sample(dtype_of(x0), x0.data_ptr(), noise.data_ptr(), tc.data_ptr<int64_t>(),
                                table.data_ptr<float>(), table.size(0), x_t.data_ptr<float>(), x0.size(0),
                                x0.numel() / x0.size(0), c10::cuda::getCurrentCUDAStream()));
  return x_t;
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_cuda(const at::Tensor& x0_in, const at::Tensor& t,
                                                        const at::Tensor& coef, const at::Tensor& sample_index,
                                                        const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const char* op = "q_sample_philox";
  check_q_sample(x0_in, t, coef, at::Tensor(), at::kCUDA, op);
  check_batch_vector(sample_index, x0_in, op, "sample_index");
  check_batch_vector(counter2, x0_in, op, "counter2");
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = runnable(x0_in);
  at::Tensor x_t = at::empty_like(x0, x0.options().dtype(at::kFloat));
  at::Tensor eps = at::empty_like(x_t);
  if (x0.numel() == 0) return {x_t, eps};
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  const at::Tensor c1 = sample_index.contiguous(), c2 = counter2.contiguous();
  C10_CUDA_CHECK(cuda::q_sample_philox(dtype_of(x0), x0.data_ptr(), tc.data_ptr<int64_t>(), table.data_ptr<float>(),
                                       table.size(0), c1.data_ptr<int64_t>(), c2.data_ptr<int64_t>(),
                                       x_t.data_ptr<float>(), eps.data_ptr<float>(), x0.size(0), layout_of(x0),
                                       static_cast<uint64_t>(seed), static_cast<uint32_t>(c3),
                                       c10::cuda::getCurrentCUDAStream()));
  return {x_t, eps};
}

at::Tensor simple_loss_cuda(const at::Tensor& eps_pred_in, const at::Tensor& eps_in) {
  check_simple_loss(eps_pred_in, eps_in, at::Tensor(), at::kCUDA, "simple_loss");
  const int64_t batch = eps_pred_in.size(0);
  const int64_t numel = batch ? eps_pred_in.numel() / batch : 0;
  const c10::cuda::CUDAGuard guard(eps_pred_in.device());
  if (batch == 0) return at::empty({0}, eps_pred_in.options().dtype(at::kFloat));
  const at::Tensor eps_pred = runnable(eps_pred_in), eps = like(eps_in, eps_pred);
  at::Tensor partial = at::empty({batch, cuda::simple_loss_chunks(numel)}, eps_pred.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::simple_loss_partial(dtype_of(eps_pred), eps_pred.data_ptr(), dtype_of(eps), eps.data_ptr(),
                                           partial.data_ptr<float>(), batch, numel,
                                           c10::cuda::getCurrentCUDAStream()));
  return partial.sum(1).div_(static_cast<double>(numel));  // a fixed-order reduction: deterministic
}

at::Tensor simple_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& eps_pred_in, const at::Tensor& eps_in) {
  check_simple_loss(eps_pred_in, eps_in, grad, at::kCUDA, "simple_loss_backward");
  const c10::cuda::CUDAGuard guard(eps_pred_in.device());
  const at::Tensor eps_pred = runnable(eps_pred_in), eps = like(eps_in, eps_pred);
  at::Tensor grad_pred = at::empty_like(eps_pred);
  if (eps_pred.numel() == 0) return grad_pred;
  const at::Tensor gc = grad.contiguous();
  C10_CUDA_CHECK(cuda::simple_loss_backward(dtype_of(eps_pred), eps_pred.data_ptr(), dtype_of(eps), eps.data_ptr(),
                                            gc.data_ptr<float>(), grad_pred.data_ptr(), eps_pred.size(0),
                                            eps_pred.numel() / eps_pred.size(0), c10::cuda::getCurrentCUDAStream()));
  return grad_pred;
}

std::tuple<at::Tensor, at::Tensor> reverse_step_cuda(const at::Tensor& x_t_in, const at::Tensor& eps_in,
                                                     const at::Tensor& t, const at::Tensor& coef,
                                                     const at::Tensor& sample_index, const at::Tensor& counter2,
                                                     int64_t seed, int64_t c3, bool clip, bool write_x0,
                                                     const std::optional<at::Tensor>& nonfinite_t) {
  check_reverse_step(x_t_in, eps_in, t, coef, sample_index, counter2, at::kCUDA, "reverse_step");
  int64_t* flag = nonfinite_flag(nonfinite_t, x_t_in, "reverse_step");
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const at::Tensor x_t = runnable(x_t_in), eps = like(eps_in, x_t);
  at::Tensor x_prev = at::empty_like(x_t);
  at::Tensor x0_hat = write_x0 ? at::empty_like(x_t) : at::empty({0}, x_t.options());
  if (x_t.numel() == 0) return {x_prev, x0_hat};
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  const at::Tensor c1 = sample_index.contiguous(), c2 = counter2.contiguous();
  C10_CUDA_CHECK(cuda::reverse_step(dtype_of(eps), x_t.data_ptr<float>(), eps.data_ptr(), tc.data_ptr<int64_t>(),
                                    table.data_ptr<float>(), table.size(0), c1.data_ptr<int64_t>(),
                                    c2.data_ptr<int64_t>(), x_prev.data_ptr<float>(),
                                    write_x0 ? x0_hat.data_ptr<float>() : nullptr, flag, x_t.size(0), layout_of(x_t),
                                    static_cast<uint64_t>(seed), static_cast<uint32_t>(c3), clip,
                                    c10::cuda::getCurrentCUDAStream()));
  return {x_prev, x0_hat};
}

// The kernels' view of prepared group_norm_silu inputs (float32 small inputs: acc_dtype of a CUDA x).
cuda::GroupNormParams group_norm_params(const GroupNormInputs& p, int64_t num_groups, bool act, double dropout,
                                        int64_t seed, int64_t c3) {
  const at::Tensor& x = p.x;
  return {x.size(0), x.size(1), num_groups, x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)),
          is_channels_last(x), act, p.weight.data_ptr<float>(), p.bias.data_ptr<float>(),
          p.add.defined() ? p.add.data_ptr<float>() : nullptr, static_cast<float>(dropout),
          static_cast<float>(1.0 / (1.0 - dropout)), dropout > 0 ? p.sample_index.data_ptr<int64_t>() : nullptr,
          dropout > 0 ? p.counter2.data_ptr<int64_t>() : nullptr, static_cast<uint64_t>(seed),
          static_cast<uint32_t>(c3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const c10::optional<at::Tensor>& add,
    int64_t num_groups, double eps, bool act, double dropout, const at::Tensor& sample_index,
    const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const GroupNormInputs p = prepare_group_norm(x_in, weight, bias, add, num_groups, dropout, sample_index, counter2,
                                               at::kCUDA, "group_norm_silu");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GroupNormOutputs out = group_norm_outputs(p, num_groups);
  const at::Tensor &y = out.y, &shift = out.shift, &rstd = out.rstd;  // (float32 statistics: no float64 on CUDA)
  if (p.x.numel() == 0) return {y, shift, rstd};
  C10_CUDA_CHECK(cuda::group_norm_silu(dtype_of(p.x), group_norm_params(p, num_groups, act, dropout, seed, c3),
                                       p.x.data_ptr(), y.data_ptr(), static_cast<float>(eps), shift.data_ptr<float>(),
                                       rstd.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {y, shift, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& add, const at::Tensor& shift, const at::Tensor& rstd, int64_t num_groups,
    bool act, double dropout, const at::Tensor& sample_index, const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const char* op = "group_norm_silu_backward";
  const GroupNormInputs p =
      prepare_group_norm(x_in, weight, bias, add, num_groups, dropout, sample_index, counter2, at::kCUDA, op);
  check_same_shape(x_in, grad_y, op, "x", "grad_y");
  check_group_norm_stats(shift, rstd, x_in, num_groups, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GroupNormGradBuffers buf = group_norm_grad_buffers(p, grad_y);
  const at::Tensor &dy = buf.dy, &dx = buf.dx, &dw_nc = buf.dw_nc, &db_nc = buf.db_nc, &dadd = buf.dadd;
  if (p.x.numel() > 0) {
    const at::Tensor sc = shift.contiguous(), rc = rstd.contiguous();
    C10_CUDA_CHECK(cuda::group_norm_silu_backward(
        dtype_of(p.x), group_norm_params(p, num_groups, act, dropout, seed, c3), dy.data_ptr(), p.x.data_ptr(),
        sc.data_ptr<float>(), rc.data_ptr<float>(), dx.data_ptr(), dw_nc.data_ptr<float>(), db_nc.data_ptr<float>(),
        dadd.defined() ? dadd.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream()));
  }
  const auto [dweight, dbias, dadd_out] = group_norm_parameter_grads(dw_nc, db_nc, dadd, weight, bias, add, x_in);
  return {dx, dweight, dbias, dadd_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("philox", &philox_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
  m.impl("q_sample", &q_sample_cuda);
  m.impl("q_sample_philox", &q_sample_philox_cuda);
  m.impl("simple_loss", &simple_loss_cuda);
  m.impl("simple_loss_backward", &simple_loss_backward_cuda);
  m.impl("reverse_step", &reverse_step_cuda);
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace ddpm_fast
