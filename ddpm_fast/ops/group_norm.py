"""GroupNorm with an optional per-(sample, channel) add before it, SiLU and dropout after it: the norm of every U-Net
block, y = dropout(act(GN(x + add[n, c]))), as one read and one write (eager PyTorch makes three to five passes).

Statistics are float32 (float64 for float64 inputs) sums taken relative to a pivot, the group's first element with x
and add apart (csrc/include/ddpm_fast/group_norm.h), so that inputs of mean 1e3 and std 1e-3 normalise to ~1e-7.
The dropout mask comes from Philox stream 4 (docs/design.md): element e of sample n is kept where the uniform of counter
(e // 4, sample_index[n], step[n], 4 | layer << 8), word e % 4, is >= p; the backward draws it again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast import checks
from ddpm_fast.kernels.layout import acc_dtype, runnable
from ddpm_fast.ops import philox, registry
from ddpm_fast.ops.philox import STREAM_DROPOUT, philox_uniform_reference

IMPLEMENTED = ("reference", "cpp", "triton")


# ---------------------------------------------------------------------------------------------------- reference
def dropout_mask_reference(x: torch.Tensor, p: float, sample_index, step, seed: int, stream_word: int) -> torch.Tensor:
    """The kept-and-scaled factor per element of x (logical order): 1 / (1 - p) where kept, else 0; float32."""
    numel = x.numel() // x.shape[0]
    u = philox_uniform_reference(sample_index, step, seed, stream_word, numel).view(x.shape)
    return (u >= p).to(torch.float32) / (1.0 - p)


def group_norm_silu_reference(x, weight, bias, num_groups: int, eps: float, add=None, act: bool = True,
                              dropout: float = 0.0, sample_index=None, step=None, seed: int = 0, stream_word: int = 0):
    """The specification, plainly: add, normalise per (sample, group), affine, SiLU, dropout."""
    if add is not None:
        x = x + add.view(*add.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(dim=-1, keepdim=True)
    var = groups.var(dim=-1, unbiased=False, keepdim=True)  # (F.group_norm refuses groups of one element)
    xhat = ((groups - mean) / torch.sqrt(var + eps)).view(x.shape)
    affine = (-1, *([1] * (x.dim() - 2)))
    y = xhat * weight.to(x.dtype).view(affine) + bias.to(x.dtype).view(affine)
    y = F.silu(y) if act else y
    if dropout > 0:
        y = y * dropout_mask_reference(x, dropout, sample_index, step, seed, stream_word).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------------- triton
def _register_triton_ops():
    """The Triton kernels as ops of their own (ddpm_fast::*_triton), with the same autograd as the C++ op."""
    from ddpm_fast.kernels import group_norm as kernels

    @torch.library.triton_op("ddpm_fast::group_norm_silu_triton", mutates_args=())
    def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None,
                               num_groups: int, eps: float, act: bool, dropout: float, sample_index: torch.Tensor,
                               step: torch.Tensor, seed: int, stream_word: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
        return kernels.group_norm_silu(x, weight, bias, add, num_groups, eps, act, dropout, sample_index, step,
                                       seed, stream_word)

    @torch.library.triton_op("ddpm_fast::group_norm_silu_backward_triton", mutates_args=())
    def group_norm_silu_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                        bias: torch.Tensor, add: torch.Tensor | None, shift: torch.Tensor,
                                        rstd: torch.Tensor, num_groups: int, act: bool, dropout: float,
                                        sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return kernels.group_norm_silu_backward(grad_y, x, weight, bias, add, shift, rstd, num_groups, act, dropout,
                                                sample_index, step, seed, stream_word)

    _register_autograd(group_norm_silu_triton, group_norm_silu_backward_triton)
    return group_norm_silu_triton


_triton_op = None


def triton_ops():
    """The Triton ops, registered with torch.library on first use (triton is imported only then)."""
    global _triton_op
    if _triton_op is None:
        _triton_op = _register_triton_ops()
    return _triton_op


# ---------------------------------------------------------------------------------------------------- autograd
def _register_cpp_extras() -> None:
    """Fake impls and autograd of the C++ ops (only when _C is loaded)."""
    if registry.cpp_module()[0] is None:
        return

    @torch.library.register_fake("ddpm_fast::group_norm_silu")
    def _(x, weight, bias, add, num_groups, eps, act, dropout, sample_index, step, seed, stream_word):
        stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x.dtype))
        return torch.empty_like(runnable(x)), stats, torch.empty_like(stats)

    @torch.library.register_fake("ddpm_fast::group_norm_silu_backward")
    def _(grad_y, x, weight, bias, add, shift, rstd, num_groups, act, dropout, sample_index, step, seed, stream_word):
        dadd = add.new_empty(add.shape) if add is not None else x.new_empty(0)  # contiguous, as the kernels'
        return torch.empty_like(runnable(x)), weight.new_empty(weight.shape), bias.new_empty(bias.shape), dadd

    _register_autograd("ddpm_fast::group_norm_silu", torch.ops.ddpm_fast.group_norm_silu_backward)


def _register_autograd(op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        x, weight, bias, add, num_groups, eps, act, dropout, sample_index, step, seed, stream_word = inputs
        _, shift, rstd = output
        ctx.save_for_backward(x, weight, bias, add, shift, rstd, sample_index, step)
        ctx.config = (num_groups, act, dropout, seed, stream_word)
        ctx.mark_non_differentiable(shift, rstd)

    def backward(ctx, grad_y, _grad_shift, _grad_rstd):
        x, weight, bias, add, shift, rstd, sample_index, step = ctx.saved_tensors
        num_groups, act, dropout, seed, stream_word = ctx.config
        dx, dweight, dbias, dadd = backward_op(grad_y, x, weight, bias, add, shift, rstd, num_groups, act, dropout,
                                               sample_index, step, seed, stream_word)
        return (dx, dweight, dbias, dadd if add is not None else None) + (None,) * 8

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_register_cpp_extras()


# ---------------------------------------------------------------------------------------------------- public
placeholders: dict[torch.device, torch.Tensor] = {}  # _no_counters' tensors; clearing it is safe


def _no_counters(device: torch.device) -> torch.Tensor:
    """A placeholder int64 tensor on `device` for the counter words of a call without dropout, which no kernel reads:
    one per device, so that an inference call allocates nothing for them (they were two small tensors per norm,
    ~10 us of a U-Net's 41 norms). One element, not empty: a GPU kernel gets a real pointer."""
    if torch.compiler.is_compiling():
        return torch.zeros(1, dtype=torch.int64, device=device)
    if device not in placeholders:
        with torch.inference_mode(False):  # a normal tensor: autograd saves it in training calls
            placeholders[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return placeholders[device]


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, *,
                    add: torch.Tensor | None = None, act: bool = True, dropout: float = 0.0, seed: int = 0,
                    layer: int = 0, sample_index: torch.Tensor | None = None, step: int = 0,
                    backend: str | None = None) -> torch.Tensor:
    """dropout(act(GroupNorm(x + add))), differentiable for x, weight, bias and add.

    :param x: (N, C, *spatial) float32, bfloat16, float16 or float64 (CPU); contiguous or channels_last.
    :param weight, bias: (C,). :param num_groups: divides C (any C: 384 works).
    :param add: optional (N, C), added to every position of (n, c) before the statistics are taken.
    :param act: apply SiLU after the affine. :param dropout: p in [0, 1) (0 in eval).
    :param seed, layer, sample_index, step: the dropout mask's Philox keys: key `seed`, stream 4 with `layer`,
        counter words sample_index[n] (default arange(N)) and `step`.
    :return: x's shape, dtype and layout.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                         torch.float64) or x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be a float tensor of shape (N, C, ...), got {checks.describe(x)}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels cannot be split into {num_groups!r} groups")
    for name, value in (("weight", weight), ("bias", bias)):
        if not isinstance(value, torch.Tensor) or value.shape != (channels,) or value.device != x.device \
                or not value.is_floating_point():
            raise ValueError(f"group_norm_silu: {name} must be a float tensor of shape ({channels},) on {x.device}, "
                             f"got {checks.describe(value)}")
    if add is not None and (not isinstance(add, torch.Tensor) or add.shape != x.shape[:2] or add.device != x.device
                            or not add.is_floating_point()):
        raise ValueError(f"group_norm_silu: add must be a float tensor of shape {tuple(x.shape[:2])} on {x.device}, "
                         f"got {checks.describe(add)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"group_norm_silu: dropout must be a number in [0, 1), got {dropout!r}")
    word = philox.stream_word(STREAM_DROPOUT, layer)  # (checks the layer)
    seed = checks.seed(seed)
    if sample_index is not None and (not isinstance(sample_index, torch.Tensor) or sample_index.dtype != torch.int64
                                     or sample_index.shape != (x.shape[0],) or sample_index.device != x.device):
        raise ValueError(f"group_norm_silu: sample_index must be an int64 tensor of shape ({x.shape[0]},) on "
                         f"{x.device}, got {checks.describe(sample_index)}")
    if dropout == 0:  # no mask to draw: the kernels read no counter words
        sample_index = steps = _no_counters(x.device)
    else:
        if sample_index is None:
            sample_index = torch.arange(x.shape[0], device=x.device)
        steps = torch.full_like(sample_index, step)
    chosen = registry.choose("group_norm_silu", x.device, IMPLEMENTED, backend)
    if chosen == "reference":
        return group_norm_silu_reference(x, weight, bias, num_groups, float(eps), add, act, float(dropout),
                                         sample_index, steps, seed, word)
    op = torch.ops.ddpm_fast.group_norm_silu if chosen == "cpp" else triton_ops()
    return op(x, weight, bias, add, num_groups, float(eps), bool(act), float(dropout), sample_index, steps, seed,
              word)[0]
