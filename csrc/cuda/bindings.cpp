// Registers the CUDA kernels of csrc/cuda/*.cu as the CUDA implementations of the ddpm_fast ops.
// Only this file sees torch; the kernels take pointers, sizes and a stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("philox", &philox_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace ddpm_fast
