// CPU kernels of the U-Net's attention block on folded weights (ddpm_fast/ops/attention.py folds and explains them):
//   h = GN(x); g = M h + m; P = softmax over keys of g^T h; o = h P^T; y = x + N o + b
// per sample (C x L matrices, L = H W tokens), which is the paper's x + proj_out(softmax(q^T k / sqrt(C)) v) with
// M = Wk^T Wq / sqrt(C), m = Wk^T bq / sqrt(C), N = Wp Wv, b = Wp bv + bp: two C x C x L products instead of four.
// The GroupNorm is the fused op (ddpm_fast::group_norm_silu), the products are ATen's (MKL) GEMMs; the scores exist
// only for one tile at a time (a block of queries of a few samples, kScoreBudget scores per thread, OpenMP over the
// tiles); the projection's GEMM adds into x + b, so the residual is its epilogue. The backward recomputes each
// tile's scores from the saved log-sum-exp (no stored scores, as flash attention).
// bf16 x runs its GEMMs in bf16 (oneDNN's AVX512-BF16 / AMX kernels: ~3x float32's at the U-Net's shapes here), with
// bf16 operands and products as autocast gives the eager block; the softmax and its log-sum-exp stay float32 and the
// tile's probabilities are rounded to bf16 once, for the P h^T product. h, g and o^T are then bf16; the backward
// widens them and runs in float32. Other dtypes run in their accumulation dtype (float16: float32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/tensor_checks.h"
#include "cpu_isa.h"
#include "softmax_cpu.h"

namespace ddpm_fast {
namespace {

// Scores per tile (256 KiB of float32, in a core's L2 with the tile's operands). A tile is `queries` queries of
// `samples` samples: all L queries of 4 samples at 8x8 tokens, of 1 sample at 16x16, 64 queries at 32x32 (L = 1024).
// Small tokens counts get several samples per tile so that each GEMM is large enough to run near the core's peak.
constexpr int64_t kScoreBudget = 65536;

struct Tiling {
  int64_t queries, samples, query_blocks, sample_chunks;
};

// At least one tile per thread where the work allows (at 8x8 tokens the budget alone put a batch of 16 in one tile,
// on one core): samples per tile at most n / threads, and queries split where there are fewer samples than threads.
Tiling tiling(int64_t n, int64_t tokens) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t split = std::max<int64_t>((threads + std::max<int64_t>(n, 1) - 1) / std::max<int64_t>(n, 1), 1);
  const int64_t queries = std::clamp<int64_t>(std::min(kScoreBudget / std::max<int64_t>(tokens, 1),
                                                       (tokens + split - 1) / split),
                                              1, std::max<int64_t>(tokens, 1));
  const int64_t samples = std::clamp<int64_t>(std::min(kScoreBudget / std::max<int64_t>(queries * tokens, 1),
                                                       (n + threads - 1) / threads),
                                              1, std::max<int64_t>(n, 1));
  return {queries, samples, (tokens + queries - 1) / queries, (n + samples - 1) / samples};
}

using GroupNormFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double, bool,
    double, const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using GroupNormBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, int64_t, bool, double, const at::Tensor&, const at::Tensor&, int64_t,
    int64_t);

// The fused GroupNorm, through the dispatcher (its CPU kernel is in group_norm.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm(const at::Tensor& x, const at::Tensor& w,
                                                          const at::Tensor& b, int64_t groups, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu", "")
                             .typed<GroupNormFn>();
  const at::Tensor index = at::zeros({x.size(0)}, x.options().dtype(at::kLong));
  return op.call(x, w, b, c10::nullopt, groups, eps, false, 0.0, index, index, 0, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& w, const at::Tensor& b,
                                                                   const at::Tensor& shift, const at::Tensor& rstd,
                                                                   int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu_backward", "")
                             .typed<GroupNormBackwardFn>();
  const at::Tensor index = at::zeros({x.size(0)}, x.options().dtype(at::kLong));
  const auto [dx, dw, db, dadd] = op.call(dy, x, w, b, c10::nullopt, shift, rstd, groups, false, 0.0, index, index,
                                          0, 0);
  return {dx, dw, db};
}

// The dtype of the forward's GEMMs and of h, g and o^T (file comment).
at::ScalarType compute_dtype(at::ScalarType x) { return x == at::kBFloat16 ? at::kBFloat16 : acc_dtype(x); }

// The folded weights in the accumulation dtype; shapes checked.
struct Folded {
  at::Tensor norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias;
};

Folded check_folded(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                    const at::Tensor& score_weight, const at::Tensor& score_bias, const at::Tensor& out_weight,
                    const at::Tensor& out_bias, const char* op) {
  check_floating(x, at::kCPU, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (N, C, H, W), got ", x.sizes());
  const int64_t c = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  Folded f;
  const std::tuple<const char*, const at::Tensor*, std::vector<int64_t>, at::Tensor*> params[] = {
      {"norm_weight", &norm_weight, {c}, &f.norm_weight},   {"norm_bias", &norm_bias, {c}, &f.norm_bias},
      {"score_weight", &score_weight, {c, c}, &f.score_weight}, {"score_bias", &score_bias, {c}, &f.score_bias},
      {"out_weight", &out_weight, {c, c}, &f.out_weight},   {"out_bias", &out_bias, {c}, &f.out_bias}};
  for (const auto& [name, value, shape, out] : params) {
    check_floating(*value, at::kCPU, op, name);
    TORCH_CHECK(value->sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
                ", got ", value->sizes());
    *out = value->to(acc).contiguous();
  }
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_block_cpu(
    const at::Tensor& x_in, const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& score_weight,
    const at::Tensor& score_bias, const at::Tensor& out_weight, const at::Tensor& out_bias, int64_t num_groups,
    double eps) {
  const char* op = "attention_block";
  const Folded f = check_folded(x_in, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, op);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type()), compute = compute_dtype(x_in.scalar_type());
  const bool low = compute != acc;  // bf16 GEMMs, float32 softmax
  const int64_t n = x_in.size(0), c = x_in.size(1), tokens = x_in.size(2) * x_in.size(3);
  // channels_last x runs as it is: its (n, c, L) views are the transposes of contiguous (n, L, c) matrices, which
  // the GEMMs take as they come (h^T and g^T rows are then the contiguous ones)
  const bool channels_last = is_channels_last(x_in);
  const at::Tensor x = x_in.to(compute).contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                                                 : at::MemoryFormat::Contiguous);
  auto [h4, shift, rstd] = group_norm(x, f.norm_weight, f.norm_bias, num_groups, eps);
  const at::Tensor h = h4.view({n, c, tokens});  // channels_last: strides (L c, 1, c)
  // g = M h + m for every sample (matmul of the shared M: 1.5x faster at 8x8 than baddbmm with the bias as C input);
  // channels_last: g^T = h^T M^T, so that g has h's strides
  const at::Tensor m_weight = f.score_weight.to(compute);
  at::Tensor g = channels_last ? at::matmul(h.transpose(1, 2), m_weight.t()).transpose(1, 2)
                               : at::matmul(m_weight, h);
  g.add_(f.score_bias.to(compute).view({1, c, 1}));
  at::Tensor o_t = at::empty({n, tokens, c}, x.options());  // o^T: a block of queries is a block of rows
  at::Tensor lse = at::empty({n, tokens}, x.options().dtype(acc));
  const Tiling t = tiling(n, tokens);
  const bool fast_softmax = acc == at::kFloat && cpu::cpu_isa() == cpu::Isa::avx512;
  if (n * tokens > 0) {
    const at::ThreadLocalState state;  // the caller's inference / grad mode and dispatch keys, for the workers
    at::parallel_for(0, t.sample_chunks * t.query_blocks, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor scores = at::empty({t.samples * t.queries * tokens}, x.options());
      at::Tensor scores_acc = low ? at::empty({t.samples * t.queries * tokens}, lse.options()) : scores;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s0 = (i / t.query_blocks) * t.samples, q0 = (i % t.query_blocks) * t.queries;
        const int64_t count = std::min(t.samples, n - s0), rows = std::min(t.queries, tokens - q0);
        const at::Tensor h_c = h.narrow(0, s0, count);
        at::Tensor p_mm = scores.narrow(0, 0, count * rows * tokens).view({count, rows, tokens});  // contiguous
        at::Tensor p = scores_acc.narrow(0, 0, count * rows * tokens).view({count, rows, tokens});
        // the scores of these queries against every key, then their softmax rows and log-sum-exp
        at::bmm_out(p_mm, g.narrow(0, s0, count).narrow(2, q0, rows).transpose(1, 2), h_c);
        if (low) p.copy_(p_mm);
        if (fast_softmax) {
          for (int64_t k = 0; k < count; ++k)
            cpu::softmax_rows_avx512(p.data_ptr<float>() + k * rows * tokens, rows, tokens,
                                     lse.data_ptr<float>() + (s0 + k) * tokens + q0);
        } else {
          const at::Tensor lse_c = at::logsumexp(p, {2}, true);
          lse.narrow(0, s0, count).narrow(1, q0, rows).copy_(lse_c.squeeze(2));
          p.sub_(lse_c).exp_();
        }
        if (low) p_mm.copy_(p);
        at::Tensor o_c = o_t.narrow(0, s0, count).narrow(1, q0, rows);
        if (o_c.is_contiguous()) {  // (one sample, or all queries of several)
          at::bmm_out(o_c, p_mm, h_c.transpose(1, 2));  // o^T = P h^T, straight into o_t
        } else {
          o_c.copy_(at::bmm(p_mm, h_c.transpose(1, 2)));
        }
      }
    });
  }
  // y = (x + b) + N o, the residual and the bias as the GEMM's C input, in place (no second (n, c, L) buffer);
  // channels_last: y^T = (x^T + b) + o^T N^T, which is y in that layout
  at::Tensor y;
  const at::Tensor n_weight = f.out_weight.to(compute), b = f.out_bias.to(compute);
  if (channels_last) {
    at::Tensor y_t = x.permute({0, 2, 3, 1}).reshape({n, tokens, c}) + b.view({1, 1, c});
    y_t.baddbmm_(o_t, n_weight.t().expand({n, c, c}));
    y = y_t.view({n, x_in.size(2), x_in.size(3), c}).permute({0, 3, 1, 2});
  } else {
    y = x.view({n, c, tokens}) + b.view({1, c, 1});
    y.baddbmm_(n_weight.expand({n, c, c}), o_t.transpose(1, 2));
    y = y.view(x_in.sizes());
  }
  return {y.to(x_in.scalar_type()), h, g, o_t, lse, shift, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_block_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& norm_weight,
                             const at::Tensor& norm_bias, const at::Tensor& score_weight,
                             const at::Tensor& score_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
                             const at::Tensor& h_in, const at::Tensor& g_in, const at::Tensor& o_t_in,
                             const at::Tensor& lse, const at::Tensor& shift, const at::Tensor& rstd,
                             int64_t num_groups) {
  const char* op = "attention_block_backward";
  const Folded f = check_folded(x_in, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, op);
  check_same_shape(x_in, grad_y, op, "x", "grad_y");
  const at::ScalarType acc = acc_dtype(x_in.scalar_type()), compute = compute_dtype(x_in.scalar_type());
  const int64_t n = x_in.size(0), c = x_in.size(1), tokens = x_in.size(2) * x_in.size(3);
  for (const auto& [name, value, shape, dtype] :
       {std::tuple<const char*, const at::Tensor*, std::vector<int64_t>, at::ScalarType>{
            "h", &h_in, {n, c, tokens}, compute},
        {"g", &g_in, {n, c, tokens}, compute},
        {"o_t", &o_t_in, {n, tokens, c}, compute},
        {"lse", &lse, {n, tokens}, acc}}) {
    TORCH_CHECK(value->sizes() == at::IntArrayRef(shape) && value->scalar_type() == dtype, op, ": ", name,
                " must be the forward's (", dtype, ", shape ", at::IntArrayRef(shape), "), got ",
                value->scalar_type(), " ", value->sizes());
  }
  const at::Tensor h = h_in.to(acc), g = g_in.to(acc), o_t = o_t_in.to(acc);  // (bf16: widened, file comment)
  const at::Tensor x = x_in.to(acc).contiguous();
  const at::Tensor dy = grad_y.to(acc).contiguous().view({n, c, tokens});
  // through y = (x + b) + N o (sums over IntArrayRef: torch 2.11's headers also overload sum on DimnameList)
  const at::Tensor d_out_bias = dy.sum(at::IntArrayRef{0, 2});
  at::Tensor d_out_weight = at::zeros({c, c}, x.options());
  for (int64_t s = 0; s < n; ++s) d_out_weight.addmm_(dy[s], o_t[s]);  // dN = sum over samples of dy o^T
  const at::Tensor do_t = at::matmul(dy.transpose(1, 2), f.out_weight);  // (n, tokens, c): (N^T dy)^T
  const at::Tensor delta = (do_t * o_t).sum(2);  // D_i = sum_j P_ij dP_ij = do_i . o_i
  // through the attention, per chunk of samples (dh and dg^T accumulate over their query blocks)
  at::Tensor dh = at::empty({n, c, tokens}, x.options());
  at::Tensor dg_t = at::empty({n, tokens, c}, x.options());
  const Tiling t = tiling(n, tokens);
  if (n * tokens > 0) {
    const at::ThreadLocalState state;
    at::parallel_for(0, t.sample_chunks, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      at::Tensor p_buf = at::empty({t.samples * t.queries * tokens}, x.options());
      at::Tensor dp_buf = at::empty_like(p_buf);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t s0 = chunk * t.samples, count = std::min(t.samples, n - s0);
        const at::Tensor h_c = h.narrow(0, s0, count), g_c = g.narrow(0, s0, count);
        at::Tensor dh_c = dh.narrow(0, s0, count);
        for (int64_t blk = 0; blk < t.query_blocks; ++blk) {
          const int64_t q0 = blk * t.queries, rows = std::min(t.queries, tokens - q0);
          at::Tensor p = p_buf.narrow(0, 0, count * rows * tokens).view({count, rows, tokens});
          at::Tensor dp = dp_buf.narrow(0, 0, count * rows * tokens).view({count, rows, tokens});
          const at::Tensor g_b = g_c.narrow(2, q0, rows), do_b = do_t.narrow(0, s0, count).narrow(1, q0, rows);
          at::bmm_out(p, g_b.transpose(1, 2), h_c);
          p.sub_(lse.narrow(0, s0, count).narrow(1, q0, rows).unsqueeze(2)).exp_();  // P, from the saved lse
          if (blk == 0) {
            at::bmm_out(dh_c, do_b.transpose(1, 2), p);  // o = h P^T: dh = do P (+ later blocks)
          } else {
            dh_c.baddbmm_(do_b.transpose(1, 2), p);
          }
          at::bmm_out(dp, do_b, h_c);                                                  // dP = do^T h
          dp.sub_(delta.narrow(0, s0, count).narrow(1, q0, rows).unsqueeze(2)).mul_(p);  // dS = P (dP - D)
          at::Tensor dg_b = dg_t.narrow(0, s0, count).narrow(1, q0, rows);
          if (dg_b.is_contiguous()) {
            at::bmm_out(dg_b, dp, h_c.transpose(1, 2));  // S = g^T h: dg^T = dS h^T
          } else {
            dg_b.copy_(at::bmm(dp, h_c.transpose(1, 2)));
          }
          dh_c.baddbmm_(g_b, dp);  // dh += g dS
        }
      }
    });
  }
  // through g = M h + m
  dh.baddbmm_(f.score_weight.t().expand({n, c, c}), dg_t.transpose(1, 2));
  at::Tensor d_score_weight = at::zeros({c, c}, x.options());
  for (int64_t s = 0; s < n; ++s) d_score_weight.addmm_(dg_t[s].t(), h[s].t());  // dM = sum of dg h^T
  const at::Tensor d_score_bias = dg_t.sum(at::IntArrayRef{0, 1});
  // through h = GN(x), and the residual
  auto [dx, d_norm_weight, d_norm_bias] =
      group_norm_backward(dh.view(x.sizes()), x, f.norm_weight, f.norm_bias, shift, rstd, num_groups);
  dx.add_(dy.view(x.sizes()));
  const auto back = [&](const at::Tensor& grad, const at::Tensor& like) { return grad.to(like.scalar_type()); };
  return {back(dx, x_in).view(x_in.sizes()), back(d_norm_weight, norm_weight), back(d_norm_bias, norm_bias),
          back(d_score_weight, score_weight), back(d_score_bias, score_bias), back(d_out_weight, out_weight),
          back(d_out_bias, out_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("attention_block", &attention_block_cpu);
  m.impl("attention_block_backward", &attention_block_backward_cpu);
}

}  // namespace ddpm_fast
