"""Counter-based noise: Philox4x32-10 in the layout of docs/design.md ("Random numbers"), on every backend.

A normal is a pure function of (seed, element index, sample index, step, stream, layer), so the noise of a
sample does not depend on the batch it is drawn in or its layout; across backends and devices the words are
identical and the normals agree to a few ulp (the C++ log/sin/cos, the GPU's sqrt).
"""
from __future__ import annotations

import math

import torch

from ddpm_fast import checks
from ddpm_fast.ops import registry

# Streams: the low 8 bits of counter word c3 (stream_word), what the draw is for (docs/design.md, "Random numbers").
STREAM_X_T = 0  # the initial x_T of sampling (step = T)
STREAM_REVERSE = 1  # the noise z of a reverse step (step = the step's t)
STREAM_TRAIN_EPS = 2  # eps of the forward noising in training (step = optimizer step)
STREAM_TRAIN_T = 3  # the t drawn per training sample
STREAM_DROPOUT = 4
STREAM_FLIP = 5
STREAM_EVAL_EPS = 6  # eps of q(x_t | x0) in the likelihood bound (step = t)

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key increments
_U32 = 0xFFFFFFFF
# tl.random.uint_to_uniform_float's scale: the largest with INT32_MAX * scale < 1 in float32
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586

IMPLEMENTED = ("reference", "cpp", "triton")


# ---------------------------------------------------------------------------------------------------- reference
def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a uint32 constant and uint32 values in int64, without int64 overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    x, y = a * b_hi, a * b_lo  # each < 2^48
    return (x + (y >> 16)) >> 16, (((x & 0xFFFF) << 16) + y) & _U32


def philox_reference(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 in torch int64 arithmetic. counter (..., 4) int64 (taken mod 2^32) -> words (..., 4) int64."""
    c0, c1, c2, c3 = (w & _U32 for w in counter.to(torch.int64).unbind(-1))
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def uint_to_uniform_reference(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> float32 in [0, 1), as tl.random.uint_to_uniform_float."""
    folded = torch.where(words >= 2**31, _U32 - words, words)  # int32 view, negatives folded by ~x
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=words.device)


def pair_uniform_to_normal_reference(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller in float32 as tl.random.pair_uniform_to_normal: u1 clamped at 1e-7, cos first."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = torch.tensor(_TWO_PI, dtype=torch.float32, device=u2.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def _words_reference(sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int,
                     numel: int) -> torch.Tensor:
    """(B, ceil(numel / 4), 4) words of counters (q, sample_index[b], step[b], stream_word) for q < ceil(numel / 4)."""
    quads = (numel + 3) // 4
    batch = sample_index.shape[0]
    counter = torch.empty(batch, quads, 4, dtype=torch.int64, device=sample_index.device)
    counter[..., 0] = torch.arange(quads, device=sample_index.device)
    counter[..., 1] = sample_index.to(torch.int64)[:, None]
    counter[..., 2] = step.to(torch.int64)[:, None]
    counter[..., 3] = stream_word
    return philox_reference(counter, seed)


def philox_uniform_reference(sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int,
                             numel: int) -> torch.Tensor:
    """out[b, e] = uniform of word e % 4 of counter (e // 4, sample_index[b], step[b], stream_word): (B, numel) float32
    in [0, 1) (the dropout masks' draws)."""
    words = _words_reference(sample_index, step, seed, stream_word, numel)
    return uint_to_uniform_reference(words).reshape(sample_index.shape[0], -1)[:, :numel].contiguous()


def philox_normal_reference(sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int,
                            numel: int) -> torch.Tensor:
    """out[b, e] = normal e % 4 of counter (e // 4, sample_index[b], step[b], stream_word): (B, numel) float32."""
    quads = (numel + 3) // 4
    batch = sample_index.shape[0]
    u = uint_to_uniform_reference(_words_reference(sample_index, step, seed, stream_word, numel))
    n0, n1 = pair_uniform_to_normal_reference(u[..., 0], u[..., 1])
    n2, n3 = pair_uniform_to_normal_reference(u[..., 2], u[..., 3])
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(batch, 4 * quads)[:, :numel].contiguous()


# ---------------------------------------------------------------------------------------------------- triton
def _register_triton_ops():
    """The Triton kernels as ops of their own (ddpm_fast::*_triton), so torch.compile traces into them."""
    from ddpm_fast.kernels import philox as kernels

    @torch.library.triton_op("ddpm_fast::philox_triton", mutates_args=())
    def philox_triton(counter: torch.Tensor, seed: int) -> torch.Tensor:
        return kernels.philox(counter, seed)

    @torch.library.triton_op("ddpm_fast::philox_normal_triton", mutates_args=())
    def philox_normal_triton(sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int,
                             numel: int) -> torch.Tensor:
        return kernels.philox_normal(sample_index, step, seed, stream_word, numel)

    return philox_triton, philox_normal_triton


_triton_ops = None


def triton_ops():
    """The Triton ops, registered with torch.library on first use (triton is imported only then)."""
    global _triton_ops
    if _triton_ops is None:
        _triton_ops = _register_triton_ops()
    return _triton_ops


# ---------------------------------------------------------------------------------------------------- fake impls
def _register_fakes() -> None:
    """Shapes for torch.compile / meta tensors of the C++ ops (only when _C is loaded)."""
    if registry.cpp_module()[0] is None:
        return

    @torch.library.register_fake("ddpm_fast::philox")
    def _(counter, seed):
        return torch.empty_like(counter)

    @torch.library.register_fake("ddpm_fast::philox_normal")
    def _(sample_index, step, seed, stream_word, numel):
        return sample_index.new_empty((sample_index.shape[0], numel), dtype=torch.float32)


_register_fakes()


# ---------------------------------------------------------------------------------------------------- public
def _check_counter_vector(name: str, value: torch.Tensor, batch: int, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.shape != (batch,):
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape ({batch},), got {got}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but sample_index is on {device}")


def stream_word(stream: int, layer: int = 0) -> int:
    """Counter word c3 of a draw: `stream` (one of the STREAM_* constants, 0..255) in the low 8 bits, the dropout
    layer index (0..2^23-1) above."""
    if not 0 <= stream < 256 or not 0 <= layer < 2**23:
        raise ValueError(f"stream must be in [0, 256) and layer in [0, 2^23), got stream={stream}, layer={layer}")
    return stream | (layer << 8)


def _check_keys(seed, sample_index, step) -> None:
    """The keys of a per-sample draw: the seed, and (B,) int64 sample_index and step on one device."""
    checks.seed(seed)
    if not isinstance(sample_index, torch.Tensor) or sample_index.dim() != 1:
        raise ValueError(f"sample_index must be a 1-D int64 tensor, got {getattr(sample_index, 'shape', sample_index)}")
    _check_counter_vector("sample_index", sample_index, sample_index.shape[0], sample_index.device)
    _check_counter_vector("step", step, sample_index.shape[0], sample_index.device)


def philox(counter: torch.Tensor, seed: int, *, backend: str | None = None) -> torch.Tensor:
    """Raw Philox4x32-10 words (for tests and integer draws).

    :param counter: (N, 4) int64, each word a uint32 value (taken mod 2^32).
    :param seed: int in [0, 2^63): the key (low word, high word).
    :return: (N, 4) int64 holding the uint32 output words.
    """
    checks.seed(seed)
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64 or counter.dim() != 2 \
            or counter.shape[1] != 4:
        raise ValueError(f"counter must be an int64 tensor of shape (N, 4), got {getattr(counter, 'shape', counter)}")
    chosen = registry.choose("philox", counter.device, IMPLEMENTED, backend)
    if chosen == "reference":
        return philox_reference(counter, seed)
    masked = counter & _U32
    if chosen == "cpp":
        return registry.cpp_ops().philox(masked, seed)
    return triton_ops()[0](masked, seed)


def words(sample_index: torch.Tensor, step: torch.Tensor, *, seed: int, stream: int,
          backend: str | None = None) -> torch.Tensor:
    """Four uint32 words (as int64) per sample, of counter (0, sample_index[b], step[b], stream): the per-sample
    draws (a training sample's t, its flip). (B,) int64 each -> (B, 4) int64."""
    _check_keys(seed, sample_index, step)
    if not 0 <= stream < 256:
        raise ValueError(f"stream must be in [0, 256), got {stream}")
    counter = torch.stack([torch.zeros_like(sample_index), sample_index, step,
                           torch.full_like(sample_index, stream)], dim=1)
    return philox(counter, seed, backend=backend)


def randn(sample_index: torch.Tensor, step: torch.Tensor, shape: tuple[int, ...], *, seed: int, stream: int,
          layer: int = 0, backend: str | None = None) -> torch.Tensor:
    """Standard normal noise, one sample per row, keyed by (seed, sample_index, step, stream, layer).

    :param sample_index: (B,) int64, counter word c1 (the global sample index), taken mod 2^32.
    :param step: (B,) int64, counter word c2 (the timestep, or the optimizer step), taken mod 2^32.
    :param shape: the per-sample shape, e.g. (C, H, W); elements are numbered in this (logical) order.
    :param stream: one of the STREAM_* constants (0..255); layer: the dropout layer index (0..2^23-1).
    :return: (B, *shape) float32 on sample_index's device.
    """
    _check_keys(seed, sample_index, step)
    word = stream_word(stream, layer)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel <= 0:
        raise ValueError(f"shape must have positive sizes, got {shape}")
    chosen = registry.choose("randn", sample_index.device, IMPLEMENTED, backend)
    if chosen == "reference":
        out = philox_normal_reference(sample_index, step, seed, word, numel)
    elif chosen == "cpp":
        out = registry.cpp_ops().philox_normal(sample_index, step, seed, word, numel)
    else:
        out = triton_ops()[1](sample_index, step, seed, word, numel)
    return out.view(sample_index.shape[0], *shape)
