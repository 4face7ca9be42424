"""The U-Net's self-attention block: x + proj_out(softmax(q k^T / sqrt(C)) v), q, k, v 1x1 convs of GN(x).

One head of width C over the L = H*W positions. Eager code materialises the (L x L) scores of every sample and runs
four C x C x L products (q, k, v, proj_out). The fused op folds the weights first (exact algebra, fold_weights):

    softmax_j(q_i . k_j / sqrt(C)) = softmax_j(g_i . h_j),   g = M h + m,  M = Wk^T Wq / sqrt(C),  m = Wk^T bq / sqrt(C)

(the terms of q_i . k_j that do not depend on the key j, among them everything of bk, cancel in the softmax), and

    proj_out(v P^T) = N (h P^T) + b,   N = Wp Wv,  b = Wp bv + bp   (each row of P sums to one),

so a block is h = GN(x), one C x C x L product for g, attention with h as both keys and values, and one C x C x L
product that adds into x + b: half the products, and h read where q, k and v were. The C++ CPU kernels
(csrc/cpu/attention.cpp) compute it with the scores of one block of queries at a time; the Triton kernels
(kernels/attention.py) with flash attention. Gradients reach Wq, Wk, Wv, bq, bv, Wp and bp through the folding's
autograd (bk's is zero, as it is in exact arithmetic).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ddpm_fast.kernels.layout import acc_dtype, is_channels_last
from ddpm_fast.ops import registry

IMPLEMENTED = ("reference", "cpp", "triton")
# The C++ kernels run on CPU tensors only (no CUDA kernel of this op: the GPU's are Triton's).
ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


# ---------------------------------------------------------------------------------------------------- reference
def attention_block_reference(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                              num_groups: int, eps: float):
    """The paper's block, written plainly (DDPM's attn_block)."""
    batch, channels, height, width = x.shape
    h = F.group_norm(x, num_groups, norm_weight, norm_bias, eps).reshape(batch, channels, height * width)
    q, k, v = (torch.einsum("oc,bcn->bon", qkv_weight, h) + qkv_bias[None, :, None]).chunk(3, dim=1)
    scores = torch.einsum("bcn,bcm->bnm", q, k) * channels ** -0.5  # (B, N queries, N keys)
    h = torch.einsum("bnm,bcm->bcn", torch.softmax(scores, dim=-1), v)
    out = torch.einsum("oc,bcn->bon", proj_weight, h) + proj_bias[None, :, None]
    return x + out.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------------------------------- folding
class FoldedWeights(NamedTuple):
    """The block's weights folded for the fused op (module docstring): g = score_weight h + score_bias,
    y = x + out_weight (h P^T) + out_bias."""
    score_weight: torch.Tensor  # (C, C) = Wk^T Wq / sqrt(C)
    score_bias: torch.Tensor    # (C,) = Wk^T bq / sqrt(C)
    out_weight: torch.Tensor    # (C, C) = Wp Wv
    out_bias: torch.Tensor      # (C,) = Wp bv + bp


def fold_weights(qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, proj_weight: torch.Tensor,
                 proj_bias: torch.Tensor) -> FoldedWeights:
    """Fold q, k, v and proj_out (qkv_weight (3C, C) rows q then k then v) into FoldedWeights, differentiably. The
    products are taken in float64 and rounded once to the weights' dtype."""
    channels = proj_weight.shape[0]
    wq, wk, wv = qkv_weight.double().chunk(3)
    bq, _bk, bv = qkv_bias.double().chunk(3)
    wp, bp = proj_weight.double(), proj_bias.double()
    scale = channels ** -0.5
    folded = (wk.t() @ wq * scale, wk.t() @ bq * scale, wp @ wv, wp @ bv + bp)
    return FoldedWeights(*(t.to(proj_weight.dtype) for t in folded))


# ---------------------------------------------------------------------------------------------------- triton
Tensors7 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _register_triton_ops():
    """The Triton kernels as ops of their own (ddpm_fast::attention_block_triton and its backward), with the same
    outputs and autograd as the C++ op."""
    from ddpm_fast.kernels import attention as kernels

    @torch.library.triton_op("ddpm_fast::attention_block_triton", mutates_args=())
    def attention_block_triton(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                               score_weight: torch.Tensor, score_bias: torch.Tensor, out_weight: torch.Tensor,
                               out_bias: torch.Tensor, num_groups: int, eps: float) -> Tensors7:
        return kernels.attention_block(x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias,
                                       num_groups, eps)

    @torch.library.triton_op("ddpm_fast::attention_block_backward_triton", mutates_args=())
    def attention_block_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor,
                                        norm_bias: torch.Tensor, score_weight: torch.Tensor,
                                        score_bias: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                                        h: torch.Tensor, g: torch.Tensor, o_t: torch.Tensor, lse: torch.Tensor,
                                        shift: torch.Tensor, rstd: torch.Tensor, num_groups: int) -> Tensors7:
        return kernels.attention_block_backward(grad_y, x, norm_weight, norm_bias, score_weight, score_bias,
                                                out_weight, out_bias, h, g, o_t, lse, shift, rstd, num_groups)

    _register_autograd(attention_block_triton, attention_block_backward_triton)
    return attention_block_triton


_triton_op = None


def triton_ops():
    """The Triton ops, registered with torch.library on first use (triton is imported only then)."""
    global _triton_op
    if _triton_op is None:
        _triton_op = _register_triton_ops()
    return _triton_op


# ---------------------------------------------------------------------------------------------------- autograd
def _register_cpp_extras() -> None:
    """Fake impls and autograd of the C++ op (only when _C is loaded)."""
    if registry.cpp_module()[0] is None:
        return

    @torch.library.register_fake("ddpm_fast::attention_block")
    def _(x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, num_groups, eps):
        n, c, tokens = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
        acc = acc_dtype(x.dtype)
        compute = torch.bfloat16 if x.dtype == torch.bfloat16 else acc  # the GEMMs' dtype (attention.cpp)
        # y, h and g in x's layout: channels_last (as the kernel sees it) makes h and g transposed (n, L, c) buffers
        channels_last = is_channels_last(x)
        y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        per_token = [x.new_empty((n, tokens, c), dtype=compute).transpose(1, 2) if channels_last
                     else x.new_empty((n, c, tokens), dtype=compute) for _ in range(2)]
        stats = x.new_empty((n, num_groups), dtype=acc)
        return (y, *per_token, x.new_empty((n, tokens, c), dtype=compute), x.new_empty((n, tokens), dtype=acc), stats,
                torch.empty_like(stats))

    @torch.library.register_fake("ddpm_fast::attention_block_backward")
    def _(grad_y, x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, h, g, o_t, lse, shift,
          rstd, num_groups):
        return (x.new_empty(x.shape),) + tuple(w.new_empty(w.shape) for w in (norm_weight, norm_bias, score_weight,
                                                                               score_bias, out_weight, out_bias))

    _register_autograd("ddpm_fast::attention_block", torch.ops.ddpm_fast.attention_block_backward)


def _register_autograd(op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, num_groups, eps = inputs
        _, h, g, o_t, lse, shift, rstd = output
        ctx.save_for_backward(x, norm_weight, norm_bias, score_weight, score_bias, out_weight, out_bias, h, g, o_t, lse,
                              shift, rstd)
        ctx.num_groups = num_groups
        ctx.mark_non_differentiable(h, g, o_t, lse, shift, rstd)

    def backward(ctx, grad_y, *_unused):
        return tuple(backward_op(grad_y, *ctx.saved_tensors, ctx.num_groups)) + (None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_register_cpp_extras()


# ---------------------------------------------------------------------------------------------------- public
def attention_block(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
                    qkv_bias: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, num_groups: int,
                    eps: float, *, folded: FoldedWeights | None = None, backend: str | None = None) -> torch.Tensor:
    """x + proj(attention(q, k, v)) with [q; k; v] = qkv_weight @ GN(x) + qkv_bias.

    :param x: (B, C, H, W). :param norm_weight, norm_bias: (C,). :param qkv_weight: (3C, C), rows q then k then v.
    :param qkv_bias: (3C,). :param proj_weight: (C, C). :param proj_bias: (C,).
    :param folded: fold_weights(qkv_weight, qkv_bias, proj_weight, proj_bias) if the caller keeps it (the U-Net does
        in inference); the fused op folds on every call otherwise. The reference ignores it.
    :return: x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"attention_block: x must be a floating (B, C, H, W) tensor, got {getattr(x, 'shape', x)}")
    c = x.shape[1]
    expected = {"norm_weight": (norm_weight, (c,)), "norm_bias": (norm_bias, (c,)), "qkv_weight": (qkv_weight, (3 * c, c)),
                "qkv_bias": (qkv_bias, (3 * c,)), "proj_weight": (proj_weight, (c, c)), "proj_bias": (proj_bias, (c,))}
    for name, (value, shape) in expected.items():
        if value.shape != shape or value.device != x.device:
            raise ValueError(f"attention_block: {name} must have shape {shape} on {x.device}, got "
                             f"{tuple(value.shape)} on {value.device}")
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"attention_block: {c} channels cannot be split into {num_groups} groups")
    chosen = registry.choose("attention_block", x.device, IMPLEMENTED, backend, ORDER)
    if chosen == "reference":
        return attention_block_reference(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                         num_groups, eps)
    if chosen == "cpp" and x.device.type != "cpu":
        raise registry.BackendUnavailable(
            f"attention_block: backend 'cpp' runs on CPU tensors only (the GPU kernels are Triton's); got x on "
            f"{x.device}")
    if folded is None:
        folded = fold_weights(qkv_weight, qkv_bias, proj_weight, proj_bias)
    op = torch.ops.ddpm_fast.attention_block if chosen == "cpp" else triton_ops()
    if torch.is_autocast_enabled(x.device.type):  # the op picks its GEMMs' dtype from x's and returns x's dtype;
        with torch.autocast(x.device.type, enabled=False):  # autocast would recast them under its buffers
            return op(x, norm_weight, norm_bias, *folded, num_groups, float(eps))[0]
    return op(x, norm_weight, norm_bias, *folded, num_groups, float(eps))[0]
