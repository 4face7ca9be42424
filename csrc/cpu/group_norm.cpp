// CPU kernels of the fused GroupNorm (+ per-(n, c) add, SiLU, dropout): forward and backward, one task per
// (sample, group), two passes over the group each way (statistics, then the output), deterministic. Per-element
// math: csrc/include/ddpm_fast/group_norm.h (shared with CUDA). The dropout mask is regenerated from Philox stream 4
// in the backward, never stored. These portable kernels serve every dtype and layout; float32 and bf16 contiguous x (and
// the forward of channels_last x without dropout) go to group_norm_avx512.cpp where the CPU has AVX-512.
// FMA contraction here (setup.py turns it off for the noise kernels, whose bits must not depend on the instruction
// set): SiLU's exp polynomial is half the instructions with it. GroupNorm's results already depend on the vector
// width through the order of its sums.
#pragma GCC optimize("fp-contract=fast")
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common/tensor_checks.h"
#include "ddpm_fast/group_norm.h"
#include "cpu_isa.h"
#include "group_norm_cpu.h"

namespace ddpm_fast {
namespace {

using cpu::add_of;
using cpu::draw_uniforms;
using cpu::GroupNormArgs;
using cpu::offset;

// The AVX-512 kernels (group_norm_avx512.cpp) take float32 and bf16 contiguous x where the CPU has AVX-512, unless
// $DDPM_FAST_CPU_ISA asks for another instruction set (channels_last x without dropout: the forward's per-sample
// kernel, group_norm_forward_kernel). Bits is what they see of scalar_t (bf16: uint16_t), void for the others.
template <typename scalar_t>
using Bits = std::conditional_t<std::is_same_v<scalar_t, float>, float,
                                std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, void>>;

template <typename scalar_t>
const Bits<scalar_t>* bits(const scalar_t* p) {
  return reinterpret_cast<const Bits<scalar_t>*>(p);
}
template <typename scalar_t>
Bits<scalar_t>* bits(scalar_t* p) {
  return reinterpret_cast<Bits<scalar_t>*>(p);
}

template <typename scalar_t, bool kChannelsLast>
bool use_avx512() {
  return !std::is_void_v<Bits<scalar_t>> && !kChannelsLast && cpu::cpu_isa() == cpu::Isa::avx512;
}

// The kernels are instantiated per (SiLU, dropout, channels_last) so that their inner loops carry no branch and
// vectorize (a runtime flag inside the loop stopped GCC: the fused op was slower than eager before).
template <typename F>
void with_flags(bool act, bool dropout, bool channels_last, const F& f) {
  const auto last = [&](auto a, auto d) {
    channels_last ? f(a, d, std::true_type{}) : f(a, d, std::false_type{});
  };
  const auto middle = [&](auto a) { dropout ? last(a, std::true_type{}) : last(a, std::false_type{}); };
  act ? middle(std::true_type{}) : middle(std::false_type{});
}

// One (sample, group): statistics, then the output. Compiled for AVX-512, AVX2 with FMA and the baseline, picked at
// load time.
template <typename scalar_t, typename acc_t, bool kAct, bool kDropout, bool kChannelsLast>
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void forward_group(const GroupNormArgs<acc_t>& a, const scalar_t* x, scalar_t* y, acc_t* shift_out, acc_t* rstd_out,
                   int64_t i, acc_t eps, std::vector<float>& u) {
  const int64_t cg = a.channels / a.groups, m = cg * a.spatial;
  const int64_t stride = kChannelsLast ? a.channels : 1;
  const int64_t spatial = a.spatial;
  const int64_t n = i / a.groups, c0 = (i - n * a.groups) * cg;
  const acc_t px = static_cast<acc_t>(x[offset(a, n, c0, 0)]);
  const acc_t pa = add_of(a, n, c0);
  acc_t sum = 0, sum_sq = 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {
    const acc_t da = add_of(a, n, c) - pa;
    const scalar_t* row = x + offset(a, n, c, 0);
#pragma omp simd reduction(+ : sum, sum_sq)
    for (int64_t s = 0; s < spatial; ++s) {
      const acc_t d = (static_cast<acc_t>(row[s * stride]) - px) + da;
      sum += d;
      sum_sq += d * d;
    }
  }
  acc_t shift, rstd;
  shifted_stats(sum, sum_sq, m, eps, shift, rstd);
  shift_out[i] = shift;
  rstd_out[i] = rstd;
  const int64_t u0 = kDropout ? draw_uniforms(a, n, c0, cg, u) : 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {
    // z = ((x - px) + (da - shift)) rstd w + b: x - px first, exact near the pivot (folding px into the bias
    // would cancel two large products and lose the mean-1e3 precision)
    const acc_t k = add_of(a, n, c) - pa - shift;
    const acc_t w = a.weight[c] * rstd, b = a.bias[c];
    const scalar_t* row = x + offset(a, n, c, 0);
    scalar_t* out = y + offset(a, n, c, 0);
    const float* uc = kDropout ? u.data() + u0 + (c - c0) * spatial : nullptr;
    const acc_t scale = a.scale;
    const float p = a.dropout;
#pragma omp simd
    for (int64_t s = 0; s < spatial; ++s) {
      acc_t v = ((static_cast<acc_t>(row[s * stride]) - px) + k) * w + b;
      if constexpr (kAct) v = silu(v);
      if constexpr (kDropout) v *= dropout_factor(uc[s], p, scale);
      out[s * stride] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kAct, bool kDropout, bool kChannelsLast>
void group_norm_forward_kernel(const GroupNormArgs<acc_t>& a, const scalar_t* x, scalar_t* y, acc_t* shift_out,
                               acc_t* rstd_out, int64_t batch, acc_t eps) {
  if constexpr (!std::is_void_v<Bits<scalar_t>> && kChannelsLast && !kDropout) {
    if (cpu::cpu_isa() == cpu::Isa::avx512) {  // one task per sample: the layout interleaves its groups
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (int64_t n = begin; n < end; ++n)
          cpu::forward_sample_nhwc_avx512<Bits<scalar_t>, kAct>(a, bits(x), bits(y), shift_out, rstd_out, n, eps,
                                                                n + 1 < end, buf);
      });
      return;
    }
  }
  const bool avx512 = use_avx512<scalar_t, kChannelsLast>();
  at::parallel_for(0, batch * a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u;
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (!std::is_void_v<Bits<scalar_t>>) {
        if (avx512) {
          cpu::forward_group_avx512<Bits<scalar_t>, kAct, kDropout>(a, bits(x), bits(y), shift_out, rstd_out, i,
                                                                    batch * a.groups, eps, u);
          continue;
        }
      }
      forward_group<scalar_t, acc_t, kAct, kDropout, kChannelsLast>(a, x, y, shift_out, rstd_out, i, eps, u);
    }
  });
}

// dz = dy * dropout * act'(z); with xhat = (d - shift) rstd and g = dz w:
// dx = rstd (g - mean(g) - xhat mean(g xhat)) over the group; dw = sum dz xhat, db = sum dz over (n, spatial);
// dadd[n, c] = sum over spatial of dx. Per-(n, c) partials of dw, db, summed over n in order afterwards.
// Pass 1 keeps dz (in the group's logical order) for pass 2: one exp per element and one read of dy.
template <typename scalar_t, typename acc_t, bool kAct, bool kDropout, bool kChannelsLast>
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void backward_group(const GroupNormArgs<acc_t>& a, const scalar_t* dy, const scalar_t* x, const acc_t* shift_in,
                    const acc_t* rstd_in, scalar_t* dx, acc_t* dw_nc, acc_t* db_nc, acc_t* dadd, int64_t i,
                    std::vector<float>& u, std::vector<acc_t>& dz) {
  const int64_t cg = a.channels / a.groups, m = cg * a.spatial;
  const int64_t stride = kChannelsLast ? a.channels : 1;
  const int64_t spatial = a.spatial;
  const int64_t n = i / a.groups, c0 = (i - n * a.groups) * cg;
  const acc_t px = static_cast<acc_t>(x[offset(a, n, c0, 0)]);
  const acc_t pa = add_of(a, n, c0);
  const acc_t shift = shift_in[i], rstd = rstd_in[i];
  const int64_t u0 = kDropout ? draw_uniforms(a, n, c0, cg, u) : 0;
  const acc_t scale = a.scale;
  const float p = a.dropout;
  dz.resize(m);
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {  // pass 1: dz, and per-channel sums of dz and dz * xhat
    const acc_t k = add_of(a, n, c) - pa - shift;  // xhat = ((x - px) + k) rstd, x - px first (exact near the pivot)
    const acc_t w = a.weight[c], b = a.bias[c];
    const scalar_t* xr = x + offset(a, n, c, 0);
    const scalar_t* dyr = dy + offset(a, n, c, 0);
    const float* uc = kDropout ? u.data() + u0 + (c - c0) * spatial : nullptr;
    acc_t* dzr = dz.data() + (c - c0) * spatial;
    acc_t dw = 0, db = 0;
#pragma omp simd reduction(+ : dw, db)
    for (int64_t s = 0; s < spatial; ++s) {
      const acc_t xhat = ((static_cast<acc_t>(xr[s * stride]) - px) + k) * rstd;
      acc_t g = static_cast<acc_t>(dyr[s * stride]);
      if constexpr (kDropout) g *= dropout_factor(uc[s], p, scale);
      if constexpr (kAct) g *= silu_grad(xhat * w + b);
      dzr[s] = g;
      dw += g * xhat;
      db += g;
    }
    dw_nc[n * a.channels + c] = dw;
    db_nc[n * a.channels + c] = db;
    sum_g += db * w;
    sum_gx += dw * w;
  }
  const acc_t mean_g = sum_g / static_cast<acc_t>(m), mean_gx = sum_gx / static_cast<acc_t>(m);
  for (int64_t c = c0; c < c0 + cg; ++c) {  // pass 2: dx and its per-channel sum
    const acc_t k = add_of(a, n, c) - pa - shift;
    const acc_t w = a.weight[c];
    const scalar_t* xr = x + offset(a, n, c, 0);
    const acc_t* dzr = dz.data() + (c - c0) * spatial;
    scalar_t* dxr = dx + offset(a, n, c, 0);
    acc_t dadd_c = 0;
#pragma omp simd reduction(+ : dadd_c)
    for (int64_t s = 0; s < spatial; ++s) {
      const acc_t xhat = ((static_cast<acc_t>(xr[s * stride]) - px) + k) * rstd;
      const acc_t d = rstd * (dzr[s] * w - mean_g - xhat * mean_gx);
      dxr[s * stride] = static_cast<scalar_t>(d);
      dadd_c += d;
    }
    if (dadd != nullptr) dadd[n * a.channels + c] = dadd_c;
  }
}

template <typename scalar_t, typename acc_t, bool kAct, bool kDropout, bool kChannelsLast>
void group_norm_backward_kernel(const GroupNormArgs<acc_t>& a, const scalar_t* dy, const scalar_t* x,
                                const acc_t* shift_in, const acc_t* rstd_in, scalar_t* dx, acc_t* dw_nc, acc_t* db_nc,
                                acc_t* dadd, int64_t batch) {
  const bool avx512 = use_avx512<scalar_t, kChannelsLast>();
  at::parallel_for(0, batch * a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u;
    std::vector<acc_t> dz;
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (!std::is_void_v<Bits<scalar_t>>) {
        if (avx512) {
          cpu::backward_group_avx512<Bits<scalar_t>, kAct, kDropout>(a, bits(dy), bits(x), shift_in, rstd_in, bits(dx),
                                                                     dw_nc, db_nc, dadd, i, u, dz);
          continue;
        }
      }
      backward_group<scalar_t, acc_t, kAct, kDropout, kChannelsLast>(a, dy, x, shift_in, rstd_in, dx, dw_nc, db_nc,
                                                                      dadd, i, u, dz);
    }
  });
}

template <typename acc_t>
GroupNormArgs<acc_t> args_of(const GroupNormInputs& p, int64_t num_groups, bool act, double dropout, int64_t seed,
                             int64_t c3) {
  const at::Tensor& x = p.x;
  return {x.size(1), num_groups, x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)), is_channels_last(x), act,
          p.weight.data_ptr<acc_t>(), p.bias.data_ptr<acc_t>(), p.add.defined() ? p.add.data_ptr<acc_t>() : nullptr,
          static_cast<float>(dropout), static_cast<acc_t>(1.0 / (1.0 - dropout)),
          dropout > 0 ? p.sample_index.data_ptr<int64_t>() : nullptr,
          dropout > 0 ? p.counter2.data_ptr<int64_t>() : nullptr, static_cast<uint64_t>(seed),
          static_cast<uint32_t>(c3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const c10::optional<at::Tensor>& add,
    int64_t num_groups, double eps, bool act, double dropout, const at::Tensor& sample_index,
    const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const GroupNormInputs p = prepare_group_norm(x_in, weight, bias, add, num_groups, dropout, sample_index, counter2,
                                               at::kCPU, "group_norm_silu");
  const GroupNormOutputs out = group_norm_outputs(p, num_groups);
  const at::Tensor &y = out.y, &shift = out.shift, &rstd = out.rstd;
  if (p.x.numel() == 0) return {y, shift, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "group_norm_silu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = args_of<acc_t>(p, num_groups, act, dropout, seed, c3);
    with_flags(act, dropout > 0, args.channels_last, [&](auto kAct, auto kDropout, auto kChannelsLast) {
      group_norm_forward_kernel<scalar_t, acc_t, decltype(kAct)::value, decltype(kDropout)::value,
                                decltype(kChannelsLast)::value>(args, p.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                                shift.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                                                                p.x.size(0), static_cast<acc_t>(eps));
    });
  });
  return {y, shift, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& add, const at::Tensor& shift, const at::Tensor& rstd, int64_t num_groups,
    bool act, double dropout, const at::Tensor& sample_index, const at::Tensor& counter2, int64_t seed, int64_t c3) {
  const char* op = "group_norm_silu_backward";
  const GroupNormInputs p =
      prepare_group_norm(x_in, weight, bias, add, num_groups, dropout, sample_index, counter2, at::kCPU, op);
  check_same_shape(x_in, grad_y, op, "x", "grad_y");
  check_group_norm_stats(shift, rstd, x_in, num_groups, op);
  const int64_t batch = x_in.size(0);
  const GroupNormGradBuffers buf = group_norm_grad_buffers(p, grad_y);
  const at::Tensor &dy = buf.dy, &dx = buf.dx, &dw_nc = buf.dw_nc, &db_nc = buf.db_nc, &dadd = buf.dadd;
  if (p.x.numel() > 0) {
    const at::Tensor sc = shift.contiguous(), rc = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "group_norm_silu_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto args = args_of<acc_t>(p, num_groups, act, dropout, seed, c3);
      with_flags(act, dropout > 0, args.channels_last, [&](auto kAct, auto kDropout, auto kChannelsLast) {
        group_norm_backward_kernel<scalar_t, acc_t, decltype(kAct)::value, decltype(kDropout)::value,
                                   decltype(kChannelsLast)::value>(
            args, dy.data_ptr<scalar_t>(), p.x.data_ptr<scalar_t>(), sc.data_ptr<acc_t>(), rc.data_ptr<acc_t>(),
            dx.data_ptr<scalar_t>(), dw_nc.data_ptr<acc_t>(), db_nc.data_ptr<acc_t>(),
            dadd.defined() ? dadd.data_ptr<acc_t>() : nullptr, batch);
      });
    });
  }
  const auto [dweight, dbias, dadd_out] = group_norm_parameter_grads(dw_nc, db_nc, dadd, weight, bias, add, x_in);
  return {dx, dweight, dbias, dadd_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_fast
