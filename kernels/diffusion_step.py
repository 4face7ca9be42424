"""The fused diffusion ops in Triton: forward noising (given or Philox noise), L_simple and its backward, and the
reverse step. Plain functions of tensors; ddpm_fast/ops/diffusion_step.py registers them and holds the references.

Conventions (as csrc/include/ddpm_fast/diffusion_step.h): t (B,) int64 picks a row of a coefficient table
coef (T, cols) in the accumulation dtype (float32, or float64 for float64 inputs); noise comes from Philox counter
(e // 4, sample_index[b], counter2[b], c3) with e the element's index in the sample's logical (C, H, W) order, so a
channels_last tensor gets the noise of its contiguous twin. Offsets are int64.

Memory traffic per element (float32): q_sample reads x0 and noise and writes x_t (12 B); q_sample_philox reads x0 and
writes x_t and eps (12 B); simple_loss reads two tensors (8 B); its backward reads two and writes one (12 B);
reverse_step reads x_t and eps and writes x_{t-1} (12 B, 16 B with x0_hat).
"""

import torch
import triton
import triton.language as tl

from ddpm_fast.kernels import INTERPRETED, launch
from ddpm_fast.kernels.layout import acc_dtype as _acc, like, runnable, sample_layout as _layout

# Elements per program: the interpreter pays ~1 ms per program, a GPU wants a few thousand programs.
_BLOCK = 65536 if INTERPRETED else 1024
_NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------------- helpers
@triton.jit
def element_offset(b, e, spatial, stride_b, stride_c, stride_s, CONTIGUOUS: tl.constexpr):
    """Memory offset (int64) of logical element e of sample b: (C, S) order, channel e // S, position e % S."""
    if CONTIGUOUS:
        return b * stride_b + e
    c = e // spatial
    return b * stride_b + c * stride_c + (e - c * spatial) * stride_s


@triton.jit
def _normals(seed, q0, c1, c2, c3, BLOCK: tl.constexpr):
    """BLOCK standard normals of counters (q0 + i // 4, c1, c2, c3): element i is normal i % 4 of its counter."""
    q = q0 + tl.arange(0, BLOCK // 4)
    zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, q.to(tl.uint32), zero + c1, zero + c2, zero + c3)
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0),
                                              tl.random.uint_to_uniform_float(r1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2),
                                              tl.random.uint_to_uniform_float(r3))
    # n0[k], n1[k], n2[k], n3[k] for k = 0, 1, ...: interleave twice
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _row(coef_ptr, t_ptr, timesteps, COLUMNS: tl.constexpr):
    """(pointer to row t of coef, whether t is a row): an out-of-range t reads row 0 and its outputs become NaN."""
    t = tl.load(t_ptr)
    valid = (t >= 0) & (t < timesteps)
    return coef_ptr + tl.where(valid, t, 0) * COLUMNS, valid


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _q_sample_kernel(
    x0_ptr,  # (B, ...) input dtype: data, memory order shared with noise
    noise_ptr,  # (B, ...) input dtype: eps
    t_ptr,  # (B,) int64: rows of coef
    coef_ptr,  # (T, 2) acc dtype: sqrt(abar), sqrt(1 - abar)
    x_t_ptr,  # (B, ...) acc dtype: output
    timesteps,  # T: a t outside [0, T) writes NaN (the host does not sync to check it)
    numel,  # elements per sample (each sample is one span of memory)
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    row, valid = _row(coef_ptr, t_ptr + b, timesteps, 2)
    sqrt_abar, sqrt_one_minus_abar = tl.load(row), tl.load(row + 1)
    x0 = tl.load(x0_ptr + b * numel + e, mask=mask).to(sqrt_abar.dtype)
    noise = tl.load(noise_ptr + b * numel + e, mask=mask).to(sqrt_abar.dtype)
    x_t = sqrt_abar * x0 + sqrt_one_minus_abar * noise
    tl.store(x_t_ptr + b * numel + e, tl.where(valid, x_t, float("nan")), mask=mask)


@triton.jit
def _q_sample_philox_kernel(
    x0_ptr,  # (B, ...) input dtype
    t_ptr,  # (B,) int64
    coef_ptr,  # (T, 2) acc dtype
    sample_index_ptr,  # (B,) int64: counter word c1
    counter2_ptr,  # (B,) int64: counter word c2
    x_t_ptr,  # (B, ...) acc dtype, x0's layout: output
    eps_ptr,  # (B, ...) acc dtype, x0's layout: the drawn noise
    timesteps,  # T
    seed,  # int64 Philox key
    c3,  # int32 counter word c3 (stream | layer << 8)
    numel, spatial, stride_b, stride_c, stride_s,  # the sample layout (see element_offset)
    CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    z = _normals(seed, start // 4, tl.load(sample_index_ptr + b).to(tl.uint32),
                 tl.load(counter2_ptr + b).to(tl.uint32), tl.cast(c3, tl.uint32), BLOCK)
    row, valid = _row(coef_ptr, t_ptr + b, timesteps, 2)
    sqrt_abar, sqrt_one_minus_abar = tl.load(row), tl.load(row + 1)
    off = element_offset(b, e, spatial, stride_b, stride_c, stride_s, CONTIGUOUS)
    x0 = tl.load(x0_ptr + off, mask=mask).to(sqrt_abar.dtype)
    eps = z.to(sqrt_abar.dtype)
    x_t = sqrt_abar * x0 + sqrt_one_minus_abar * eps
    tl.store(x_t_ptr + off, tl.where(valid, x_t, float("nan")), mask=mask)
    tl.store(eps_ptr + off, eps, mask=mask)


@triton.jit
def _simple_loss_kernel(
    eps_pred_ptr,  # (B, ...) any float dtype, memory order shared with eps
    eps_ptr,  # (B, ...) any float dtype
    partial_ptr,  # (B, programs per sample) float32 / float64: sums of squares
    numel,
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    e = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    d = (tl.load(eps_pred_ptr + b * numel + e, mask=mask, other=0).to(ACC)
         - tl.load(eps_ptr + b * numel + e, mask=mask, other=0).to(ACC))
    tl.store(partial_ptr + b * tl.num_programs(1) + chunk, tl.sum(d * d, axis=0))


@triton.jit
def _simple_loss_backward_kernel(
    grad_ptr,  # (B,) acc dtype: d loss[b]
    eps_pred_ptr,  # (B, ...) input dtype
    eps_ptr,  # (B, ...)
    grad_pred_ptr,  # (B, ...) eps_pred's dtype: output
    numel,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    g = tl.load(grad_ptr + b)
    scaled = g * 2.0 / numel  # in g's dtype (numel may be specialised to a constexpr 1)
    pred = tl.load(eps_pred_ptr + b * numel + e, mask=mask)
    eps = tl.load(eps_ptr + b * numel + e, mask=mask).to(g.dtype)
    tl.store(grad_pred_ptr + b * numel + e, (scaled * (pred.to(g.dtype) - eps)).to(pred.dtype), mask=mask)


@triton.jit
def _reverse_step_kernel(
    x_t_ptr,  # (B, ...) float32/float64: the state
    eps_ptr,  # (B, ...) any float dtype, x_t's layout: the model's prediction
    t_ptr,  # (B,) int64: rows of coef
    coef_ptr,  # (T, 5) x_t's dtype: a, b, c_x0, c_xt, sigma
    sample_index_ptr,  # (B,) int64: counter word c1
    counter2_ptr,  # (B,) int64: counter word c2
    x_prev_ptr,  # (B, ...) x_t's dtype and layout: output x_{t-1}
    x0_hat_ptr,  # (B, ...) or a dummy when not WRITE_X0
    nonfinite_ptr,  # () int64: raised to t where x_{t-1} is not all finite, or a dummy when not FLAG
    timesteps,  # T
    seed, c3,
    numel, spatial, stride_b, stride_c, stride_s,
    CLIP: tl.constexpr,
    WRITE_X0: tl.constexpr,
    FLAG: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    t = tl.load(t_ptr + b)
    row, valid = _row(coef_ptr, t_ptr + b, timesteps, 5)
    a, bb = tl.load(row), tl.load(row + 1)
    coef_x0, coef_xt, sigma = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    off = element_offset(b, e, spatial, stride_b, stride_c, stride_s, CONTIGUOUS)
    x = tl.load(x_t_ptr + off, mask=mask)
    eps = tl.load(eps_ptr + off, mask=mask).to(x.dtype)
    x0 = a * x - bb * eps
    if CLIP:
        x0 = tl.where(x0 < -1.0, -1.0, x0)  # NaN stays NaN, as torch.clamp
        x0 = tl.where(x0 > 1.0, 1.0, x0)
    mean = coef_x0 * x0 + coef_xt * x
    if (t != 0) & (sigma != 0):  # the last step, and DDIM with eta = 0, draw no noise
        z = _normals(seed, start // 4, tl.load(sample_index_ptr + b).to(tl.uint32),
                     tl.load(counter2_ptr + b).to(tl.uint32), tl.cast(c3, tl.uint32), BLOCK)
        mean = mean + sigma * z.to(x.dtype)
    x_prev = tl.where(valid, mean, float("nan"))
    tl.store(x_prev_ptr + off, x_prev, mask=mask)
    if FLAG:  # |v| < inf is false for NaN and +-inf: an atomic only where a value is not finite (no reduction: a
        # block-wide sum and branch made Triton 3.6 spill)
        bad = mask & ~(tl.abs(x_prev) < float("inf"))
        tl.atomic_max(nonfinite_ptr + tl.zeros_like(e), t + tl.zeros_like(e), mask=bad)
    if WRITE_X0:
        tl.store(x0_hat_ptr + off, tl.where(valid, x0, float("nan")), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _grid(batch: int, numel: int, block: int) -> tuple[int, int]:
    return batch, triton.cdiv(numel, block)


def _block(numel: int) -> int:
    return max(16, min(_BLOCK, triton.next_power_of_2(numel)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = coef[t, 0] x0 + coef[t, 1] noise. Args: x0, noise (B, ...) one float dtype; t (B,) int64; coef (T, 2)
    in the accumulation dtype. Returns x_t in the accumulation dtype, x0's layout."""
    x0 = runnable(x0)
    noise = like(noise, x0)
    x_t = torch.empty_like(x0, dtype=_acc(x0.dtype))
    if x0.numel():
        numel = x0.numel() // x0.shape[0]
        block = _block(numel)
        launch(_q_sample_kernel, _grid(x0.shape[0], numel, block), x0)(
            x0, noise, t.contiguous(), coef.contiguous(), x_t, coef.shape[0], numel, BLOCK=block,
            num_warps=_NUM_WARPS)
    return x_t


def q_sample_philox(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, sample_index: torch.Tensor,
                    counter2: torch.Tensor, seed: int, c3: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_sample with the noise drawn in the pass. Returns (x_t, eps), both in the accumulation dtype."""
    x0 = runnable(x0)
    x_t = torch.empty_like(x0, dtype=_acc(x0.dtype))
    eps = torch.empty_like(x_t)
    if x0.numel():
        numel, spatial, stride_b, stride_c, stride_s = _layout(x0)
        block = _block(numel)
        launch(_q_sample_philox_kernel, _grid(x0.shape[0], numel, block), x0)(
            x0, t.contiguous(), coef.contiguous(), sample_index.contiguous(), counter2.contiguous(), x_t, eps,
            coef.shape[0], seed,
            c3, numel, spatial, stride_b, stride_c, stride_s, CONTIGUOUS=x0.is_contiguous(), BLOCK=block,
            num_warps=_NUM_WARPS)
    return x_t, eps


def simple_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean of (eps_pred - eps)^2 over each sample: (B,) float32 (float64 for float64 eps_pred). Per-program
    partial sums, then one sum per row: deterministic."""
    eps_pred = runnable(eps_pred)
    eps = like(eps, eps_pred)
    batch = eps_pred.shape[0]
    acc = _acc(eps_pred.dtype)
    if batch == 0:
        return torch.empty(0, dtype=acc, device=eps_pred.device)
    numel = eps_pred.numel() // batch
    block = _block(numel)
    grid = _grid(batch, numel, block)
    partial = torch.empty(grid, dtype=acc, device=eps_pred.device)
    launch(_simple_loss_kernel, grid, eps_pred)(
        eps_pred, eps, partial, numel, ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
        num_warps=_NUM_WARPS)
    return partial.sum(dim=1) / numel


def simple_loss_backward(grad: torch.Tensor, eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """grad[b] * 2 / numel * (eps_pred - eps) in eps_pred's dtype and layout."""
    eps_pred = runnable(eps_pred)
    eps = like(eps, eps_pred)
    grad_pred = torch.empty_like(eps_pred)
    if eps_pred.numel():
        numel = eps_pred.numel() // eps_pred.shape[0]
        block = _block(numel)
        launch(_simple_loss_backward_kernel, _grid(eps_pred.shape[0], numel, block), eps_pred)(
            grad.contiguous(), eps_pred, eps, grad_pred, numel, BLOCK=block, num_warps=_NUM_WARPS)
    return grad_pred


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, coef: torch.Tensor,
                 sample_index: torch.Tensor, counter2: torch.Tensor, seed: int, c3: int, clip: bool,
                 write_x0: bool, nonfinite_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z from the row coef[t] = (a, b, c_x0, c_xt, sigma), x0_hat = a x_t -
    b eps (clipped if clip), no noise where t == 0 or sigma == 0; nonfinite_t (0-d int64), if given, raised to t[b]
    where x_{t-1}[b] is not all finite. Returns (x_{t-1}, x0_hat or an empty tensor)."""
    x_t = runnable(x_t)
    eps = like(eps, x_t)
    x_prev = torch.empty_like(x_t)
    x0_hat = torch.empty_like(x_t) if write_x0 else x_t.new_empty(0)
    if x_t.numel():
        numel, spatial, stride_b, stride_c, stride_s = _layout(x_t)
        block = _block(numel)
        launch(_reverse_step_kernel, _grid(x_t.shape[0], numel, block), x_t)(
            x_t, eps, t.contiguous(), coef.contiguous(), sample_index.contiguous(), counter2.contiguous(), x_prev,
            x0_hat if write_x0 else x_prev, nonfinite_t if nonfinite_t is not None else t, coef.shape[0], seed,
            c3, numel, spatial, stride_b, stride_c, stride_s, CLIP=clip, WRITE_X0=write_x0,
            FLAG=nonfinite_t is not None, CONTIGUOUS=x_t.is_contiguous(), BLOCK=block, num_warps=_NUM_WARPS)
    return x_prev, x0_hat
