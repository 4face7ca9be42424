// CPU kernels of the Philox ops. The per-element math is csrc/include/ddpm_fast/philox.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

void check_counter_vector(const at::Tensor& v, const char* name, int64_t batch) {
  TORCH_CHECK(v.device().is_cpu(), "philox_normal: ", name, " must be a CPU tensor here, got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kLong, "philox_normal: ", name, " must be int64, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == batch, "philox_normal: ", name, " must have shape (", batch, ",), got ",
              v.sizes());
}

at::Tensor philox_cpu(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.device().is_cpu(), "philox: counter must be a CPU tensor here, got ", counter.device());
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox: counter must be int64, got ", counter.scalar_type());
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "philox: counter must have shape (N, 4), got ",
              counter.sizes());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, c.size(0), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t w[4];
      for (int j = 0; j < 4; ++j) w[j] = static_cast<uint32_t>(src[4 * i + j]);
      philox4x32_10(w, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      for (int j = 0; j < 4; ++j) dst[4 * i + j] = static_cast<int64_t>(w[j]);
    }
  });
  return out;
}

at::Tensor philox_normal_cpu(const at::Tensor& sample_index, const at::Tensor& counter2, int64_t seed, int64_t c3,
                             int64_t numel) {
  TORCH_CHECK(numel > 0, "philox_normal: numel must be positive, got ", numel);
  TORCH_CHECK(sample_index.dim() == 1, "philox_normal: sample_index must have shape (B,), got ", sample_index.sizes());
  const int64_t batch = sample_index.size(0);
  check_counter_vector(sample_index, "sample_index", batch);
  check_counter_vector(counter2, "counter2", batch);
  const at::Tensor c1 = sample_index.contiguous();
  const at::Tensor c2 = counter2.contiguous();
  at::Tensor out = at::empty({batch, numel}, c1.options().dtype(at::kFloat));
  const int64_t* c1p = c1.data_ptr<int64_t>();
  const int64_t* c2p = c2.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t quads = (numel + 3) / 4;  // counters per sample; the 1-3 normals past numel are dropped
  at::parallel_for(0, batch * quads, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / quads;
      const int64_t q = i - b * quads;
      float n[4];
      philox_normal4(static_cast<uint64_t>(seed), static_cast<uint32_t>(q), static_cast<uint32_t>(c1p[b]),
                     static_cast<uint32_t>(c2p[b]), static_cast<uint32_t>(c3), n);
      float* row = o + b * numel + 4 * q;
      const int64_t left = numel - 4 * q;
      for (int j = 0; j < 4 && j < left; ++j) row[j] = n[j];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("philox", &philox_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace ddpm_fast
