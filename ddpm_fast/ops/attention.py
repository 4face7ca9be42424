"""The U-Net's self-attention block: x + proj_out(softmax(q k^T / sqrt(C)) v), q, k, v 1x1 convs of GN(x).

One head of width C over the H*W positions. Eager code materialises the (HW)^2 scores; the fused kernels
(a later issue) never do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast.ops import _registry

IMPLEMENTED = ("reference",)


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


def attention_block(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
                    qkv_bias: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, num_groups: int,
                    eps: float, *, backend: str | None = None) -> torch.Tensor:
    """x + proj(attention(q, k, v)) with [q; k; v] = qkv_weight @ GN(x) + qkv_bias.

    :param x: (B, C, H, W). :param norm_weight, norm_bias: (C,). :param qkv_weight: (3C, C), rows q then k then v.
    :param qkv_bias: (3C,). :param proj_weight: (C, C). :param proj_bias: (C,).
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
    _registry.choose("attention_block", x.device, IMPLEMENTED, backend)
    return attention_block_reference(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                     num_groups, eps)
