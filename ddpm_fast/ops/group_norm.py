"""GroupNorm with an optional per-(sample, channel) add before it and SiLU after it: the norm of every U-Net block.

y = act(GN(x + add[n, c])). Eager PyTorch makes three or four passes over the activation for this; the fused
kernels (a later issue) make one read and one write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast.ops import _registry

IMPLEMENTED = ("reference",)


def group_norm_silu_reference(x, weight, bias, num_groups: int, eps: float, add=None, act: bool = True):
    """The specification, plainly: add, normalise per (sample, group), affine, SiLU."""
    if add is not None:
        x = x + add.view(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if act else y


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, *,
                    add: torch.Tensor | None = None, act: bool = True, backend: str | None = None) -> torch.Tensor:
    """act(GroupNorm(x + add)).

    :param x: (N, C, *spatial) floating. :param weight, bias: (C,). :param num_groups: divides C.
    :param add: optional (N, C), added to every position of (n, c) before the statistics are taken.
    :param act: apply SiLU after the affine.
    :return: x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be a floating tensor (N, C, ...), got {getattr(x, 'shape', x)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels cannot be split into {num_groups} groups")
    for name, value in (("weight", weight), ("bias", bias)):
        if value.shape != (channels,) or value.device != x.device:
            raise ValueError(f"group_norm_silu: {name} must have shape ({channels},) on {x.device}, got "
                             f"{tuple(value.shape)} on {value.device}")
    if add is not None and (add.shape != x.shape[:2] or add.device != x.device):
        raise ValueError(f"group_norm_silu: add must have shape {tuple(x.shape[:2])} on {x.device}, got "
                         f"{tuple(add.shape)} on {add.device}")
    _registry.choose("group_norm_silu", x.device, IMPLEMENTED, backend)
    return group_norm_silu_reference(x, weight, bias, num_groups, eps, add=add, act=act)
