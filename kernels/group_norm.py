"""The fused GroupNorm (+ per-(n, c) add, SiLU, dropout) in Triton, forward and backward; plain functions of tensors
(ddpm_fast/ops/group_norm.py registers them and holds the reference).

One program per (sample, group), looping over the group's channels and, within each, over blocks of positions; two
passes each way (statistics, then the output), deterministic (no atomics: per-(n, c) partial sums of the weight and
bias gradients, summed over n afterwards). Conventions as csrc/include/ddpm_fast/group_norm.h: statistics relative
to the pivot (px = x[n, c0, 0], pa = add[n, c0]); dropout keeps element e (logical index c * S + s of sample n) where
the uniform of word e % 4 of Philox counter (e // 4, sample_index[n], counter2[n], c3) is >= p.

Memory traffic per element (float32): forward reads x twice (statistics, output) and writes y: 12 B, 8 B when the
group fits in cache; backward reads x and dy in both passes and writes dx: 20 B.
"""

import torch
import triton
import triton.language as tl

from ddpm_fast.kernels import INTERPRETED, launch
from ddpm_fast.kernels.layout import acc_dtype, is_channels_last, like, runnable

# Positions per block: the interpreter pays per block, a GPU wants a few hundred threads' worth.
_BLOCK = 4096 if INTERPRETED else 512
_NUM_WARPS = 4


@triton.jit
def _offsets(n, c, s, channels, spatial, CHANNELS_LAST: tl.constexpr):
    """Memory offsets (int64) of positions s of channel c of sample n."""
    base = n * channels * spatial
    if CHANNELS_LAST:
        return base + s * channels + c
    return base + c * spatial + s


@triton.jit
def _dropout_factor(n, c, s, spatial, sample_index_ptr, counter2_ptr, seed, c3, p, scale):
    """1 / (1 - p) where the element's uniform is >= p, else 0 (its Philox word chosen by e % 4)."""
    e = c * spatial + s
    q = (e // 4).to(tl.uint32)
    zero = tl.zeros_like(q)
    r0, r1, r2, r3 = tl.philox(seed, q, zero + tl.load(sample_index_ptr + n).to(tl.uint32),
                               zero + tl.load(counter2_ptr + n).to(tl.uint32), zero + tl.cast(c3, tl.uint32))
    lane = e % 4
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.where(tl.random.uint_to_uniform_float(word) >= p, scale, 0.0)


@triton.jit
def _group(x_ptr, add_ptr, channels, spatial, groups, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
           ACC: tl.constexpr):
    """This program's (sample n, group g, channels per group, first channel c0) and the pivot (px, pa)."""
    n = tl.program_id(0).to(tl.int64) // groups
    g = tl.program_id(0).to(tl.int64) % groups
    cg = channels // groups
    c0 = g * cg
    px = tl.load(x_ptr + _offsets(n, c0, 0, channels, spatial, CHANNELS_LAST)).to(ACC)
    pa = tl.load(add_ptr + n * channels + c0).to(ACC) if HAS_ADD else 0.0
    return n, g, cg, c0, px, pa


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(tl.minimum(-z, 88.0)))  # exp clamped: no inf (the value is the same)


@triton.jit
def _silu(z):
    return z * _sigmoid(z)


@triton.jit
def _group_norm_forward_kernel(
    x_ptr,  # (N, C, S) input dtype, contiguous or channels_last
    y_ptr,  # like x: output
    weight_ptr, bias_ptr,  # (C,) accumulation dtype
    add_ptr,  # (N, C) accumulation dtype, or any pointer when not HAS_ADD
    shift_ptr, rstd_ptr,  # (N, G) accumulation dtype: the saved statistics
    sample_index_ptr, counter2_ptr,  # (N,) int64: the dropout mask's counter words
    channels, spatial, groups,
    eps, seed, c3, p, scale,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    n, g, cg, c0, px, pa = _group(x_ptr, add_ptr, channels, spatial, groups, HAS_ADD, CHANNELS_LAST, ACC)
    positions = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC)
    total_sq = tl.zeros([BLOCK], dtype=ACC)
    for k in range(0, cg):
        c = c0 + k
        da = tl.load(add_ptr + n * channels + c).to(ACC) - pa if HAS_ADD else 0.0
        for s0 in range(0, spatial, BLOCK):
            s = s0 + positions
            mask = s < spatial
            x = tl.load(x_ptr + _offsets(n, c, s, channels, spatial, CHANNELS_LAST), mask=mask, other=0).to(ACC)
            d = tl.where(mask, (x - px) + da, 0.0)
            total += d
            total_sq += d * d
    m = (cg * spatial) * 1.0
    shift = tl.sum(total, axis=0) / m
    var = tl.maximum(tl.sum(total_sq, axis=0) / m - shift * shift, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(shift_ptr + n * groups + g, shift)
    tl.store(rstd_ptr + n * groups + g, rstd)
    for k in range(0, cg):
        c = c0 + k
        da = tl.load(add_ptr + n * channels + c).to(ACC) - pa if HAS_ADD else 0.0
        w = tl.load(weight_ptr + c) * rstd
        b = tl.load(bias_ptr + c)
        for s0 in range(0, spatial, BLOCK):
            s = s0 + positions
            mask = s < spatial
            offsets = _offsets(n, c, s, channels, spatial, CHANNELS_LAST)
            x = tl.load(x_ptr + offsets, mask=mask, other=0).to(ACC)
            v = ((x - px) + da - shift) * w + b
            if ACT:
                v = _silu(v)
            if DROPOUT:
                v = v * _dropout_factor(n, c, s, spatial, sample_index_ptr, counter2_ptr, seed, c3, p, scale)
            tl.store(y_ptr + offsets, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_z(dy_ptr, x_ptr, offsets, mask, n, c, s, spatial, px, da, shift, rstd, w, b, sample_index_ptr,
            counter2_ptr, seed, c3, p, scale, ACT: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """(dz, xhat) of positions s of channel c: dz = dy * dropout * act'(z), z = xhat * w + b."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(ACC)
    xhat = ((x - px) + da - shift) * rstd
    g = tl.load(dy_ptr + offsets, mask=mask, other=0).to(ACC)
    if DROPOUT:
        g = g * _dropout_factor(n, c, s, spatial, sample_index_ptr, counter2_ptr, seed, c3, p, scale)
    if ACT:
        z = xhat * w + b
        sig = _sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    return tl.where(mask, g, 0.0), tl.where(mask, xhat, 0.0)


@triton.jit
def _group_norm_backward_kernel(
    dy_ptr, x_ptr,  # like x
    dx_ptr,  # like x: output
    weight_ptr, bias_ptr, add_ptr, shift_ptr, rstd_ptr, sample_index_ptr, counter2_ptr,
    dw_ptr, db_ptr,  # (N, C) accumulation dtype: per-sample partial gradients of weight and bias
    dadd_ptr,  # (N, C) accumulation dtype, or any pointer when not HAS_ADD
    channels, spatial, groups,
    seed, c3, p, scale,
    HAS_ADD: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    n, g, cg, c0, px, pa = _group(x_ptr, add_ptr, channels, spatial, groups, HAS_ADD, CHANNELS_LAST, ACC)
    positions = tl.arange(0, BLOCK)
    shift = tl.load(shift_ptr + n * groups + g)
    rstd = tl.load(rstd_ptr + n * groups + g)
    sum_g = px * 0.0  # ACC-typed zeros (a loop-carried value keeps its type)
    sum_gx = px * 0.0
    for k in range(0, cg):  # pass 1: per-channel sums of dz and dz * xhat
        c = c0 + k
        da = tl.load(add_ptr + n * channels + c).to(ACC) - pa if HAS_ADD else 0.0
        w = tl.load(weight_ptr + c)
        b = tl.load(bias_ptr + c)
        dw = tl.zeros([BLOCK], dtype=ACC)
        db = tl.zeros([BLOCK], dtype=ACC)
        for s0 in range(0, spatial, BLOCK):
            s = s0 + positions
            mask = s < spatial
            offsets = _offsets(n, c, s, channels, spatial, CHANNELS_LAST)
            dz, xhat = _grad_z(dy_ptr, x_ptr, offsets, mask, n, c, s, spatial, px, da, shift, rstd, w, b,
                               sample_index_ptr, counter2_ptr, seed, c3, p, scale, ACT, DROPOUT, ACC)
            dw += dz * xhat
            db += dz
        dw_c = tl.sum(dw, axis=0)
        db_c = tl.sum(db, axis=0)
        tl.store(dw_ptr + n * channels + c, dw_c)
        tl.store(db_ptr + n * channels + c, db_c)
        sum_g += db_c * w
        sum_gx += dw_c * w
    m = (cg * spatial) * 1.0
    mean_g = sum_g / m
    mean_gx = sum_gx / m
    for k in range(0, cg):  # pass 2: dx, and its sum per channel for add
        c = c0 + k
        da = tl.load(add_ptr + n * channels + c).to(ACC) - pa if HAS_ADD else 0.0
        w = tl.load(weight_ptr + c)
        b = tl.load(bias_ptr + c)
        dadd = tl.zeros([BLOCK], dtype=ACC)
        for s0 in range(0, spatial, BLOCK):
            s = s0 + positions
            mask = s < spatial
            offsets = _offsets(n, c, s, channels, spatial, CHANNELS_LAST)
            dz, xhat = _grad_z(dy_ptr, x_ptr, offsets, mask, n, c, s, spatial, px, da, shift, rstd, w, b,
                               sample_index_ptr, counter2_ptr, seed, c3, p, scale, ACT, DROPOUT, ACC)
            dx = tl.where(mask, rstd * (dz * w - mean_g - xhat * mean_gx), 0.0)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dadd += dx
        if HAS_ADD:
            tl.store(dadd_ptr + n * channels + c, tl.sum(dadd, axis=0))


# ---------------------------------------------------------------------------------------------------- launchers
def _prepared(x, weight, bias, add):
    x = runnable(x)
    acc = acc_dtype(x.dtype)
    return (x, weight.to(acc).contiguous(), bias.to(acc).contiguous(),
            add.to(acc).contiguous() if add is not None else None, acc)


def _common(x, num_groups, act, dropout, acc, add):
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    block = max(16, min(_BLOCK, triton.next_power_of_2(spatial)))
    flags = dict(HAS_ADD=add is not None, ACT=act, DROPOUT=dropout > 0, CHANNELS_LAST=is_channels_last(x),
                 ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, num_warps=_NUM_WARPS)
    return spatial, flags


def group_norm_silu(x, weight, bias, add, num_groups: int, eps: float, act: bool, dropout: float, sample_index,
                    counter2, seed: int, c3: int):
    """Returns (y, shift, rstd) as the C++ op: y in x's dtype and layout, the statistics (N, G) in the accumulation
    dtype."""
    x, weight, bias, add, acc = _prepared(x, weight, bias, add)
    y = torch.empty_like(x)
    shift = torch.empty(x.shape[0], num_groups, dtype=acc, device=x.device)
    rstd = torch.empty_like(shift)
    if x.numel():
        spatial, flags = _common(x, num_groups, act, dropout, acc, add)
        launch(_group_norm_forward_kernel, (x.shape[0] * num_groups,), x)(
            x, y, weight, bias, add if add is not None else weight, shift, rstd, sample_index.contiguous(),
            counter2.contiguous(), x.shape[1], spatial, num_groups, eps, seed, c3, dropout, 1.0 / (1.0 - dropout),
            **flags)
    else:  # no statistics: zeros, not garbage
        shift.zero_()
        rstd.zero_()
    return y, shift, rstd


def group_norm_silu_backward(grad_y, x, weight, bias, add, shift, rstd, num_groups: int, act: bool, dropout: float,
                             sample_index, counter2, seed: int, c3: int):
    """Returns (dx, dweight, dbias, dadd or an empty tensor) as the C++ op."""
    weight_dtype, bias_dtype = weight.dtype, bias.dtype
    add_dtype = add.dtype if add is not None else None
    x, weight, bias, add, acc = _prepared(x, weight, bias, add)
    dy = like(grad_y, x).to(x.dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    db = torch.zeros_like(dw)
    dadd = torch.zeros_like(dw) if add is not None else None
    if x.numel():
        spatial, flags = _common(x, num_groups, act, dropout, acc, add)
        launch(_group_norm_backward_kernel, (x.shape[0] * num_groups,), x)(
            dy, x, dx, weight, bias, add if add is not None else weight, shift.contiguous(), rstd.contiguous(),
            sample_index.contiguous(), counter2.contiguous(), dw, db, dadd if add is not None else dw, x.shape[1],
            spatial, num_groups, seed, c3, dropout, 1.0 / (1.0 - dropout), **flags)
    return (dx, dw.sum(0).to(weight_dtype), db.sum(0).to(bias_dtype),
            dadd.to(add_dtype) if add is not None else x.new_empty(0))
