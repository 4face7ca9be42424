// CPU kernels of the fused diffusion ops: forward noising (given or Philox noise), L_simple and its backward, and
// the reverse step (DDPM or DDIM coefficient rows). Each is one pass over memory; the noise is drawn in the same
// pass, 1024 elements at a time, by the vectorized generator of philox.cpp. Per-element math:
// csrc/include/ddpm_fast/diffusion_step.h (shared with CUDA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <vector>

#include "../common/tensor_checks.h"
#include "ddpm_fast/diffusion_step.h"
#include "philox_cpu.h"

namespace ddpm_fast {
namespace {

constexpr int64_t kChunk = 1024;  // elements per work item; a multiple of 4, so each chunk starts on a counter
constexpr int64_t kGrain = 16;    // work items per thread at least (~16k elements)
// The element loops carry _Pragma("omp simd") (a #pragma cannot sit inside AT_DISPATCH's macro argument): outputs are
// freshly allocated, so they never alias the inputs, and GCC need not prove it.

// ------------------------------------------------------------------------------------------------ checks
// Every t a row of the table (checked here: on the CPU that costs no sync; the GPU kernels write NaN instead).
void check_rows(const at::Tensor& coef, const at::Tensor& t, const char* op) {
  const at::Tensor tc = t.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.size(0); ++b)
    TORCH_CHECK(tp[b] >= 0 && tp[b] < coef.size(0), op, ": t[", b, "] = ", tp[b], " is outside [0, ", coef.size(0),
                ")");
}

// body(b, e0, count) over every chunk of every sample, in parallel.
template <typename F>
void for_each_chunk(int64_t batch, int64_t numel, const F& body) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * chunks, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, e0 = (i - b * chunks) * kChunk;
      body(b, e0, std::min(kChunk, numel - e0));
    }
  });
}

// Normals e0 .. e0 + count - 1 of sample b (count <= kChunk), into z.
void draw(float* z, uint64_t seed, int64_t e0, int64_t count, int64_t c1, int64_t c2, int64_t c3) {
  cpu::philox_normals(seed, static_cast<uint32_t>(e0 / 4), (count + 3) / 4, static_cast<uint32_t>(c1),
                      static_cast<uint32_t>(c2), static_cast<uint32_t>(c3), z);
}

// ------------------------------------------------------------------------------------------------ forward noising
// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in memory order (both share a layout; each sample is one span).
at::Tensor q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t, const at::Tensor& coef,
                        const at::Tensor& noise_in) {
  const char* op = "q_sample";
  check_q_sample(x0_in, t, coef, noise_in, at::kCPU, op);
  check_rows(coef, t, op);
  const int64_t batch = x0_in.size(0);
  const at::ScalarType acc = acc_dtype(x0_in.scalar_type());
  const at::Tensor x0 = runnable(x0_in), noise = like(noise_in, x0);
  at::Tensor x_t = at::empty_like(x0, x0.options().dtype(acc));
  if (x0.numel() == 0) return x_t;
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  const int64_t numel = x0.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "q_sample", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const scalar_t* np = noise.data_ptr<scalar_t>();
    const acc_t* cp = table.data_ptr<acc_t>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    acc_t* out = x_t.data_ptr<acc_t>();
    for_each_chunk(batch, numel, [&](int64_t b, int64_t e0, int64_t count) {
      const acc_t* row = cp + tp[b] * kQSampleCoefs;
      const int64_t base = b * numel + e0;
      _Pragma("omp simd")
      for (int64_t j = 0; j < count; ++j)
        out[base + j] = q_sample_element<acc_t>(row[kSqrtAbar], row[kSqrtOneMinusAbar], static_cast<acc_t>(xp[base + j]),
                                                static_cast<acc_t>(np[base + j]));
    });
  });
  return x_t;
}

// The same with eps drawn in the pass from the Philox stream (counter (e // 4, sample_index, counter2, c3)) and
// written out for the loss. Logical element order, so channels_last gathers.
std::tuple<at::Tensor, at::Tensor> q_sample_philox_cpu(const at::Tensor& x0_in, const at::Tensor& t,
                                                       const at::Tensor& coef, const at::Tensor& sample_index,
                                                       const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const char* op = "q_sample_philox";
  check_q_sample(x0_in, t, coef, at::Tensor(), at::kCPU, op);
  check_batch_vector(sample_index, x0_in, op, "sample_index");
  check_batch_vector(counter2, x0_in, op, "counter2");
  check_rows(coef, t, op);
  const int64_t batch = x0_in.size(0);
  const at::ScalarType acc = acc_dtype(x0_in.scalar_type());
  const at::Tensor x0 = runnable(x0_in);
  at::Tensor x_t = at::empty_like(x0, x0.options().dtype(acc));
  at::Tensor eps = at::empty_like(x0, x0.options().dtype(acc));
  if (x0.numel() == 0) return {x_t, eps};
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  const at::Tensor c1 = sample_index.contiguous(), c2 = counter2.contiguous();
  const SampleLayout layout = layout_of(x0);
  const bool contiguous = x0.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "q_sample_philox", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const acc_t* cp = table.data_ptr<acc_t>();
    const int64_t *tp = tc.data_ptr<int64_t>(), *c1p = c1.data_ptr<int64_t>(), *c2p = c2.data_ptr<int64_t>();
    acc_t* out = x_t.data_ptr<acc_t>();
    acc_t* ep = eps.data_ptr<acc_t>();
    for_each_chunk(batch, layout.numel, [&](int64_t b, int64_t e0, int64_t count) {
      float z[kChunk];
      draw(z, static_cast<uint64_t>(seed), e0, count, c1p[b], c2p[b], c3);
      const acc_t* row = cp + tp[b] * kQSampleCoefs;
      const acc_t sa = row[kSqrtAbar], sb = row[kSqrtOneMinusAbar];
      if (contiguous) {
        const int64_t base = b * layout.numel + e0;
        _Pragma("omp simd")
        for (int64_t j = 0; j < count; ++j) {
          out[base + j] = q_sample_element<acc_t>(sa, sb, static_cast<acc_t>(xp[base + j]), static_cast<acc_t>(z[j]));
          ep[base + j] = static_cast<acc_t>(z[j]);
        }
      } else {
        for (int64_t j = 0; j < count; ++j) {
          const int64_t off = element_offset(layout, b, e0 + j);
          out[off] = q_sample_element<acc_t>(sa, sb, static_cast<acc_t>(xp[off]), static_cast<acc_t>(z[j]));
          ep[off] = static_cast<acc_t>(z[j]);
        }
      }
    });
  });
  return {x_t, eps};
}

// ------------------------------------------------------------------------------------------------ L_simple
// loss[b] = mean over the sample of (eps_pred - eps)^2: per-chunk partial sums in double, added in a fixed order
// (deterministic, no atomics).
at::Tensor simple_loss_cpu(const at::Tensor& eps_pred_in, const at::Tensor& eps_in) {
  check_simple_loss(eps_pred_in, eps_in, at::Tensor(), at::kCPU, "simple_loss");
  const int64_t batch = eps_pred_in.size(0);
  const at::ScalarType acc = acc_dtype(eps_pred_in.scalar_type());
  const at::Tensor eps_pred = runnable(eps_pred_in), eps = like(eps_in, eps_pred);
  const int64_t numel = batch ? eps_pred.numel() / batch : 0;
  at::Tensor loss = at::empty({batch}, eps_pred.options().dtype(acc));
  if (batch == 0) return loss;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(batch * chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps_pred.scalar_type(), "simple_loss", [&] {
    using pred_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps.scalar_type(), "simple_loss", [&] {
      using acc_t = at::opmath_type<pred_t>;
      const pred_t* pp = eps_pred.data_ptr<pred_t>();
      const scalar_t* ep = eps.data_ptr<scalar_t>();
      for_each_chunk(batch, numel, [&](int64_t b, int64_t e0, int64_t count) {
        // the SIMD reduction's order is fixed by the compiled code: the same bits on every run
        acc_t sum = 0;
        const pred_t* pc = pp + b * numel + e0;
        const scalar_t* ec = ep + b * numel + e0;
        _Pragma("omp simd reduction(+ : sum)")
        for (int64_t j = 0; j < count; ++j) {
          const acc_t d = static_cast<acc_t>(pc[j]) - static_cast<acc_t>(ec[j]);
          sum += d * d;
        }
        partial[b * chunks + e0 / kChunk] = static_cast<double>(sum);
      });
      acc_t* out = loss.data_ptr<acc_t>();
      for (int64_t b = 0; b < batch; ++b) {
        double sum = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial[b * chunks + c];
        out[b] = static_cast<acc_t>(sum / static_cast<double>(numel));
      }
    });
  });
  return loss;
}

// grad_eps_pred = grad[b] * 2 / numel * (eps_pred - eps), in eps_pred's dtype and layout.
at::Tensor simple_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& eps_pred_in, const at::Tensor& eps_in) {
  check_simple_loss(eps_pred_in, eps_in, grad, at::kCPU, "simple_loss_backward");
  const int64_t batch = eps_pred_in.size(0);
  const at::Tensor eps_pred = runnable(eps_pred_in), eps = like(eps_in, eps_pred);
  at::Tensor grad_pred = at::empty_like(eps_pred);
  if (eps_pred.numel() == 0) return grad_pred;
  const int64_t numel = eps_pred.numel() / batch;
  const at::Tensor gc = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps_pred.scalar_type(), "simple_loss_backward", [&] {
    using pred_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps.scalar_type(), "simple_loss_backward", [&] {
      using acc_t = at::opmath_type<pred_t>;
      const pred_t* pp = eps_pred.data_ptr<pred_t>();
      const scalar_t* ep = eps.data_ptr<scalar_t>();
      const acc_t* gp = gc.data_ptr<acc_t>();
      pred_t* out = grad_pred.data_ptr<pred_t>();
      for_each_chunk(batch, numel, [&](int64_t b, int64_t e0, int64_t count) {
        const acc_t scaled = gp[b] * (acc_t(2) / static_cast<acc_t>(numel));
        const int64_t base = b * numel + e0;
        _Pragma("omp simd")
        for (int64_t j = 0; j < count; ++j)
          out[base + j] = static_cast<pred_t>(
              simple_loss_grad<acc_t>(scaled, static_cast<acc_t>(pp[base + j]), static_cast<acc_t>(ep[base + j])));
      });
    });
  });
  return grad_pred;
}

// ------------------------------------------------------------------------------------------------ reverse step
// x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z with x0_hat = a x_t - b eps (clipped if asked) from the row t[b];
// z from the Philox stream, drawn only where the step has noise (t != 0, sigma != 0). x0_hat written if asked;
// nonfinite_t raised to t[b] where a chunk of sample b is not all finite (rare: under a lock).
std::tuple<at::Tensor, at::Tensor> reverse_step_cpu(const at::Tensor& x_t_in, const at::Tensor& eps_in,
                                                    const at::Tensor& t, const at::Tensor& coef,
                                                    const at::Tensor& sample_index, const at::Tensor& counter2,
                                                    int64_t seed, int64_t c3, bool clip, bool write_x0,
                                                    const std::optional<at::Tensor>& nonfinite_t) {
  const char* op = "reverse_step";
  check_reverse_step(x_t_in, eps_in, t, coef, sample_index, counter2, at::kCPU, op);
  check_rows(coef, t, op);
  int64_t* flag = nonfinite_flag(nonfinite_t, x_t_in, op);
  std::mutex flag_lock;
  const int64_t batch = x_t_in.size(0);
  const at::Tensor x_t = runnable(x_t_in), eps = like(eps_in, x_t);
  at::Tensor x_prev = at::empty_like(x_t);
  at::Tensor x0_hat = write_x0 ? at::empty_like(x_t) : at::empty({0}, x_t.options());
  if (x_t.numel() == 0) return {x_prev, x0_hat};
  const at::Tensor table = coef.contiguous(), tc = t.contiguous();
  const at::Tensor c1 = sample_index.contiguous(), c2 = counter2.contiguous();
  const SampleLayout layout = layout_of(x_t);
  const bool contiguous = x_t.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "reverse_step", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps.scalar_type(), "reverse_step", [&] {
      const acc_t* xp = x_t.data_ptr<acc_t>();
      const scalar_t* ep = eps.data_ptr<scalar_t>();
      const acc_t* cp = table.data_ptr<acc_t>();
      const int64_t *tp = tc.data_ptr<int64_t>(), *c1p = c1.data_ptr<int64_t>(), *c2p = c2.data_ptr<int64_t>();
      acc_t* out = x_prev.data_ptr<acc_t>();
      acc_t* x0p = write_x0 ? x0_hat.data_ptr<acc_t>() : nullptr;
      for_each_chunk(batch, layout.numel, [&](int64_t b, int64_t e0, int64_t count) {
        const acc_t* row = cp + tp[b] * kStepCoefs;
        float z[kChunk];
        acc_t sigma = row[kSigma];
        if (tp[b] != 0 && sigma != acc_t(0)) {
          draw(z, static_cast<uint64_t>(seed), e0, count, c1p[b], c2p[b], c3);
        } else {
          sigma = acc_t(0);
          std::fill(z, z + count, 0.0f);
        }
        const auto element = [&](int64_t off, float zj) {
          const acc_t x = xp[off];
          const acc_t x0 = predict_x0<acc_t>(row[kSqrtRecipAbar], row[kSqrtRecipm1Abar], x, static_cast<acc_t>(ep[off]),
                                             clip);
          out[off] = step_mean<acc_t>(row[kCoefX0], row[kCoefXt], x0, x) + sigma * static_cast<acc_t>(zj);
          if (x0p != nullptr) x0p[off] = x0;
        };
        // probe = sum of x_{t-1} * 0 over the chunk just written (in L1): 0 while every value is finite, NaN from
        // the first NaN or inf on. A pass of its own: folded into the loop above, it kept that loop from
        // vectorizing (3-5x slower)
        acc_t probe = 0;
        if (contiguous) {
          const int64_t base = b * layout.numel + e0;
          _Pragma("omp simd")
          for (int64_t j = 0; j < count; ++j) element(base + j, z[j]);
          if (flag != nullptr) {
            _Pragma("omp simd reduction(+ : probe)")
            for (int64_t j = 0; j < count; ++j) probe += out[base + j] * acc_t(0);
          }
        } else {  // (a scalar loop: the probe folds in at no cost)
          for (int64_t j = 0; j < count; ++j) {
            const int64_t off = element_offset(layout, b, e0 + j);
            element(off, z[j]);
            if (flag != nullptr) probe += out[off] * acc_t(0);
          }
        }
        if (flag != nullptr && !finite_value(probe)) {
          const std::lock_guard<std::mutex> hold(flag_lock);
          *flag = std::max(*flag, tp[b]);
        }
      });
    });
  });
  return {x_prev, x0_hat};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_philox", &q_sample_philox_cpu);
  m.impl("simple_loss", &simple_loss_cpu);
  m.impl("simple_loss_backward", &simple_loss_backward_cpu);
  m.impl("reverse_step", &reverse_step_cpu);
}

}  // namespace ddpm_fast
