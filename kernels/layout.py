"""The memory layouts the fused elementwise kernels index (no Triton here: the C++ side has the same rules in
csrc/cpu/diffusion_step.cpp, and the fake impls in ddpm_fast/ops use these to predict output strides).

A tensor is run in its own layout if it is contiguous or channels_last; anything else is copied to contiguous. The
other inputs of an op are brought to the first input's layout, and outputs take it.
"""
import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D channels_last tensor that is not also plain contiguous (C = 1 or H = W = 1 are both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def runnable(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is contiguous or channels_last, else a contiguous copy."""
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def like(other: torch.Tensor, primary: torch.Tensor) -> torch.Tensor:
    """`other` in `primary`'s layout, copied only when they differ."""
    return other.contiguous(memory_format=torch.channels_last if is_channels_last(primary)
                            else torch.contiguous_format)


def sample_layout(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(numel, spatial, stride_b, stride_c, stride_s) of one sample of a runnable x, as csrc's SampleLayout:
    logical element e is channel e // spatial at position e % spatial."""
    numel = x.numel() // x.shape[0]
    if is_channels_last(x):
        return numel, x.shape[2] * x.shape[3], x.stride(0), 1, x.shape[1]
    return numel, numel, numel, 0, 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype for inputs of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
