"""The attention block on folded weights in Triton (ddpm_fast/ops/attention.py explains the folding and registers
these; csrc/cpu/attention.cpp is the same computation on the CPU): plain functions of tensors returning what the C++
op returns.

Per sample, with h = GN(x) and g = M h + m stored (N, C, L): queries are the columns of g, keys and values are both
the columns of h, so one tile of h serves as K and as V. A flash-attention forward (online softmax over key blocks,
one program per block of queries) writes o^T = P h^T (N, L, C) and the log-sum-exp per query; the scores never
reach memory. The backward recomputes P from the log-sum-exp in two kernels: one per block of queries for dg^T, one
per block of keys for the key and value gradients of h (summed, since keys and values are the same h). The GEMMs
with the C x C weights (g = M h + m, y = x + b + N o and their gradients) are torch's (cuBLAS on a GPU), the
GroupNorm is kernels/group_norm.py's.

float32 tiles go through tl.dot at its default precision: tf32 on a GPU (results within ~1e-3 of float32), exact under
the CPU interpreter. Head width (C) up to 512 (launch_config).
"""

import torch
import triton
import triton.language as tl

from ddpm_fast.kernels import INTERPRETED, group_norm as group_norm_kernels, launch
from ddpm_fast.kernels.layout import acc_dtype

# Launch configurations per kernel and head width (BLOCK_D = C rounded up to a power of two, at least 16 for tl.dot),
# chosen from the sm_90 compile check (tests/sm90_jit.py prints registers, spills and shared memory): float32 tiles
# of (BLOCK_M or BLOCK_N) x BLOCK_D accumulate in registers and the dot operands stage through shared memory, so
# wider heads take fewer rows per tile, 8 warps and fewer pipeline stages. Measured under Triton 3.9 for sm_90
# (registers / spill bytes / shared KB): C = 256: forward 140 / 0 / 80, backward-query 170 / 0 / 112, backward-key
# 212 / 0 / 80 (was 64 x 32 tiles, 4 warps, 3 stages: 255 registers, stack frames of 96 / 640 / 984 B of spills,
# 128-193 KB of shared memory); C = 512 fits, its key kernel spills (~150 B stored per thread; no tile without spills
# was found: its 16 x 512 key tile alone fills the registers).
#   (BLOCK_D at most) -> {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
_CONFIGS = {
    64: {"forward": (64, 64, 4, 3), "backward_query": (64, 64, 4, 3), "backward_key": (64, 64, 4, 3)},
    128: {"forward": (64, 64, 8, 2), "backward_query": (32, 64, 4, 2), "backward_key": (64, 32, 8, 2)},
    256: {"forward": (32, 32, 8, 2), "backward_query": (32, 32, 8, 2), "backward_key": (16, 32, 8, 1)},
    512: {"forward": (16, 32, 8, 2), "backward_query": (16, 16, 8, 2), "backward_key": (16, 16, 8, 1)},
}
MAX_CHANNELS = 512


def launch_config(channels: int, kernel: str) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys), BLOCK_D (channels), num_warps, num_stages of `kernel` ("forward",
    "backward_query", "backward_key") for heads of `channels`. The interpreter pays per block step: 16 x 16 there."""
    if channels > MAX_CHANNELS:
        raise ValueError(f"the Triton attention kernels take heads of at most {MAX_CHANNELS} channels, got {channels}")
    block_d = max(16, triton.next_power_of_2(channels))
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    widest = min(width for width in _CONFIGS if width >= block_d)
    block_m, block_n, warps, stages = _CONFIGS[widest][kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


@triton.jit
def _tile(ptr, sample, first, count, channels, tokens, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens first .. first + BLOCK of a (N, C, L) tensor as a (BLOCK, BLOCK_D) tile (zeros past the ends)."""
    rows = first + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < count) & (cols[None, :] < channels)
    return tl.load(ptr + sample * channels * tokens + cols[None, :] * tokens + rows[:, None], mask=mask, other=0.0)


@triton.jit
def _rows(ptr, sample, first, channels, tokens, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and mask of rows first .. first + BLOCK of a (N, L, C) tensor as a (BLOCK, BLOCK_D) tile."""
    rows = first + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < tokens) & (cols[None, :] < channels)
    return ptr + sample * tokens * channels + rows[:, None] * channels + cols[None, :], mask


@triton.jit
def _query_block(g_ptr, do_ptr, lse_ptr, delta_ptr, sample, q0, channels, tokens, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """What the backward needs of queries q0 .. q0 + BLOCK_M: their g and do tiles, log-sum-exp (+inf past the end,
    so that their P is 0) and D."""
    queries = q0 + tl.arange(0, BLOCK_M)
    q = _tile(g_ptr, sample, q0, tokens, channels, tokens, BLOCK_M, BLOCK_D)
    do_ptrs, mask = _rows(do_ptr, sample, q0, channels, tokens, BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + sample * tokens + queries, mask=queries < tokens, other=float("inf"))
    delta = tl.load(delta_ptr + sample * tokens + queries, mask=queries < tokens, other=0.0)
    return q, do, lse, delta


@triton.jit
def _attention_forward_kernel(
    g_ptr, h_ptr,  # (N, C, L): queries g, keys and values h
    o_ptr,  # (N, L, C): o^T = P h^T
    lse_ptr,  # (N, L): log-sum-exp of each query's scores
    channels, tokens,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(1).to(tl.int64)
    q0 = tl.program_id(0) * BLOCK_M
    q = _tile(g_ptr, sample, q0, tokens, channels, tokens, BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(0, tokens, BLOCK_N):
        kv = _tile(h_ptr, sample, k0, tokens, channels, tokens, BLOCK_N, BLOCK_D)
        keys = k0 + tl.arange(0, BLOCK_N)
        s = tl.where(keys[None, :] < tokens, tl.dot(q, tl.trans(kv)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m_i = m_new
    ptrs, mask = _rows(o_ptr, sample, q0, channels, tokens, BLOCK_M, BLOCK_D)
    tl.store(ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=mask)
    queries = q0 + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + sample * tokens + queries, m_i + tl.log(l_i), mask=queries < tokens)


@triton.jit
def _attention_backward_query_kernel(
    g_ptr, h_ptr,  # (N, C, L)
    do_ptr,  # (N, L, C): the gradient of o^T
    lse_ptr, delta_ptr,  # (N, L): the forward's log-sum-exp; D_i = do_i . o_i
    dg_ptr,  # (N, L, C): dg^T = dS h^T
    channels, tokens,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(1).to(tl.int64)
    q0 = tl.program_id(0) * BLOCK_M
    q, do, lse, delta = _query_block(g_ptr, do_ptr, lse_ptr, delta_ptr, sample, q0, channels, tokens, BLOCK_M,
                                     BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(0, tokens, BLOCK_N):
        kv = _tile(h_ptr, sample, k0, tokens, channels, tokens, BLOCK_N, BLOCK_D)
        keys = k0 + tl.arange(0, BLOCK_N)
        p = tl.where(keys[None, :] < tokens, tl.exp(tl.dot(q, tl.trans(kv)) - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(kv)) - delta[:, None])
        acc += tl.dot(ds.to(kv.dtype), kv)
    ptrs, mask = _rows(dg_ptr, sample, q0, channels, tokens, BLOCK_M, BLOCK_D)
    tl.store(ptrs, acc.to(dg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_backward_key_kernel(
    g_ptr, h_ptr,  # (N, C, L)
    do_ptr,  # (N, L, C)
    lse_ptr, delta_ptr,  # (N, L)
    dh_ptr,  # (N, L, C): h's gradient as keys (dS^T g^T) plus as values (P^T do)
    channels, tokens,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(1).to(tl.int64)
    k0 = tl.program_id(0) * BLOCK_N
    kv = _tile(h_ptr, sample, k0, tokens, channels, tokens, BLOCK_N, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for q0 in range(0, tokens, BLOCK_M):
        q, do, lse, delta = _query_block(g_ptr, do_ptr, lse_ptr, delta_ptr, sample, q0, channels, tokens, BLOCK_M,
                                         BLOCK_D)
        p_t = tl.exp(tl.dot(kv, tl.trans(q)) - lse[None, :])  # P^T of this block; 0 for queries past the end
        acc += tl.dot(p_t.to(do.dtype), do)  # as values: P^T do
        ds_t = p_t * (tl.dot(kv, tl.trans(do)) - delta[None, :])
        acc += tl.dot(ds_t.to(q.dtype), q)  # as keys: dS^T g^T
    ptrs, mask = _rows(dh_ptr, sample, k0, channels, tokens, BLOCK_N, BLOCK_D)
    tl.store(ptrs, acc.to(dh_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _no_dropout_keys(x):
    index = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return index, index


def attention_block(x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, num_groups: int,
                    eps: float):
    """Returns (y, h, g, o_t, lse, shift, rstd) as the C++ op: y in x's dtype, the rest in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    n, c = x.shape[:2]
    tokens = x.shape[2] * x.shape[3]
    xa = x.to(acc).contiguous()
    h4, shift, rstd = group_norm_kernels.group_norm_silu(xa, norm_weight, norm_bias, None, num_groups, eps, False,
                                                         0.0, *_no_dropout_keys(x), 0, 0)
    h = h4.view(n, c, tokens)
    g = torch.matmul(score_weight.to(acc), h).add_(score_bias.to(acc).view(1, c, 1))
    o_t = torch.empty(n, tokens, c, dtype=acc, device=x.device)
    lse = torch.empty(n, tokens, dtype=acc, device=x.device)
    if n * tokens > 0:
        config = launch_config(c, "forward")
        launch(_attention_forward_kernel, (triton.cdiv(tokens, config["BLOCK_M"]), n), x)(
            g, h, o_t, lse, c, tokens, **config)
    y = xa.view(n, c, tokens) + out_bias.to(acc).view(1, c, 1)
    y.baddbmm_(out_weight.to(acc).expand(n, c, c), o_t.transpose(1, 2))
    return y.view(x.shape).to(x.dtype), h, g, o_t, lse, shift, rstd


def attention_block_backward(grad_y, x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, h, g,
                             o_t, lse, shift, rstd, num_groups: int):
    """Returns the gradients for x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, as the C++
    op (each in its input's dtype)."""
    acc = acc_dtype(x.dtype)
    n, c = x.shape[:2]
    tokens = x.shape[2] * x.shape[3]
    xa = x.to(acc).contiguous()
    dy = grad_y.to(acc).contiguous().view(n, c, tokens)
    d_out_bias = dy.sum((0, 2))
    d_out_weight = torch.einsum("ncl,nld->cd", dy, o_t)  # sum over samples of dy o^T
    do_t = torch.matmul(dy.transpose(1, 2), out_weight.to(acc))  # (N^T dy)^T
    delta = (do_t * o_t).sum(2)
    dg_t = torch.empty(n, tokens, c, dtype=acc, device=x.device)
    dh_t = torch.empty_like(dg_t)
    if n * tokens > 0:
        query, key = launch_config(c, "backward_query"), launch_config(c, "backward_key")
        launch(_attention_backward_query_kernel, (triton.cdiv(tokens, query["BLOCK_M"]), n), x)(
            g, h, do_t, lse, delta, dg_t, c, tokens, **query)
        launch(_attention_backward_key_kernel, (triton.cdiv(tokens, key["BLOCK_N"]), n), x)(
            g, h, do_t, lse, delta, dh_t, c, tokens, **key)
    # through g = M h + m, then h = GN(x) and the residual
    dh = dh_t.transpose(1, 2) + torch.matmul(score_weight.to(acc).t(), dg_t.transpose(1, 2))
    d_score_weight = torch.einsum("nlc,ndl->cd", dg_t, h)  # sum over samples of dg h^T
    d_score_bias = dg_t.sum((0, 1))
    dx, d_norm_weight, d_norm_bias, _ = group_norm_kernels.group_norm_silu_backward(
        dh.reshape(x.shape), xa, norm_weight, norm_bias, None, shift, rstd, num_groups, False, 0.0,
        *_no_dropout_keys(x), 0, 0)
    dx = dx + dy.view(x.shape)
    return (dx.to(x.dtype), d_norm_weight.to(norm_weight.dtype), d_norm_bias.to(norm_bias.dtype),
            d_score_weight.to(score_weight.dtype), d_score_bias.to(score_bias.dtype),
            d_out_weight.to(out_weight.dtype), d_out_bias.to(out_bias.dtype))
