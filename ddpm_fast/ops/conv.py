"""The U-Net's convolutions, y = conv2d(x, W, b) (+ residual), with the residual add of a ResBlock fused in.

In CPU inference ("cpp", no gradient, not compiling; float32, or bf16: under bf16 autocast or with a bf16 model)
they run on oneDNN through torch's own mkldnn ops, with the weights packed once into oneDNN's blocked format in the
compute dtype and kept (PackedConv), the residual added as the convolution's post-op, and channels_last activations
whatever the model's layout. F.conv2d reorders the weights on every call (a third of a small 3x3 convolution's time
at batch 16 here: 511 -> 381 us at 16x32x16x16 with the add fused; 5-8% at the cifar10 preset's shapes), the add is
one more pass over the output, and oneDNN's packed convolutions run 10-30% faster on channels_last input than on
NCHW at the U-Net's shapes (the fused GroupNorm and attention take either layout; the network's output comes back
channels_last). Under bf16 autocast the input is cast to bf16 as autocast would, and the weights are packed as
bf16 once instead of cast on every call: with AVX512-BF16 (or AMX) oneDNN's bf16 convolutions are 1.8-2.5x its
float32 ones at the U-Net's shapes here (bench/RESULTS.md). The packed path is torch's (the kernels inductor's
freezing uses), not ours: the arithmetic is oneDNN's either way, so the outputs agree with F.conv2d's to rounding.
Elsewhere (GPU, autograd, float16 autocast, other dtypes): F.conv2d, then the add.

Not an op of the backend registry: no kernel here is ours (the convolutions are oneDNN's or cuDNN's on every
path), so `use_backend(...)` and `backend=` choose among our kernels only and leave the convolutions as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast.kernels.layout import is_channels_last
from ddpm_fast.ops.cache import weights_key


def _mkldnn_ready() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


MKLDNN = _mkldnn_ready()  # whether this torch has the oneDNN packed convolutions that PackedConv uses


def conv2d_reference(x, weight, bias, stride, padding, residual=None):
    y = F.conv2d(x, weight, bias, stride, padding)
    return y if residual is None else residual + y


class PackedConv(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict) whose forward takes an optional residual to add, and which keeps
    its weights packed for oneDNN per input shape while they are unchanged (keyed by the weight's storage and
    version counter, as AttnBlock keeps its folded weights): a CPU U-Net in inference holds a second copy of its
    convolution weights, two for two input shapes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed: dict = {}  # (input key) -> the packed weights and bias; at most two

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv2d(self, x, residual)

    def packed_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights in oneDNN's format for channels_last input of x's shape and dtype, and the bias in x's dtype
        (oneDNN's bf16 convolution takes a bf16 bias)."""
        key = (tuple(x.shape), x.dtype, weights_key(self.weight, *([] if self.bias is None else [self.bias])))
        if key not in self.packed:
            if len(self.packed) >= 2:  # a copy of the weights each: keep two (a sampler's batch and its last one)
                self.packed.clear()
            weight = self.weight.to(x.dtype).contiguous(memory_format=torch.channels_last)
            self.packed[key] = (torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape)), None if self.bias is None else self.bias.to(x.dtype))
        return self.packed[key]

    def __getstate__(self):  # copy.deepcopy, pickle: oneDNN's packed tensors have no storage to copy
        return {**self.__dict__, "packed": {}}

    def __setstate__(self, state):  # (a module pickled before the cache was named `packed` has `_packed`)
        super().__setstate__({k: v for k, v in state.items() if k != "_packed"})
        self.packed = {}

    def _apply(self, fn, *args, **kwargs):
        self.packed = {}  # .to(), .cuda(), .double(): the packed weights belong to the old tensors
        return super()._apply(fn, *args, **kwargs)


def _packed_dtype(conv: PackedConv, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the packed path runs in for this call (module docstring), None where it does not apply: bf16 under
    bf16 autocast (autocast's own rule for conv2d, with float32 weights), else x's dtype where it is the weights' and
    float32 or bf16."""
    if not (MKLDNN and x.device.type == "cpu" and x.dim() == 4 and (x.is_contiguous() or is_channels_last(x))
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return None
    if torch.is_autocast_enabled("cpu"):
        ok = torch.get_autocast_dtype("cpu") == torch.bfloat16 and conv.weight.dtype == torch.float32
        return torch.bfloat16 if ok else None
    return x.dtype if x.dtype == conv.weight.dtype and x.dtype in (torch.float32, torch.bfloat16) else None


def conv2d(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) + residual (residual: the output's shape) with `conv`'s weights; the packed oneDNN path where it
    applies (module docstring), F.conv2d otherwise."""
    dtype = _packed_dtype(conv, x) if isinstance(conv, PackedConv) else None
    if dtype is not None:
        x = x.to(dtype, memory_format=torch.channels_last)  # (a copy for the network's first convolution only)
        weight, bias = conv.packed_weight(x)
        args = (weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if residual is not None and residual.dtype == dtype \
                and residual.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
        out = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        return out if residual is None else residual + out  # (eager's promotion for a residual of another dtype)
    return conv2d_reference(x, conv.weight, conv.bias, conv.stride, conv.padding, residual)
