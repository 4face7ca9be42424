"""Philox4x32-10 in Triton (`tl.philox` with 32-bit counters) in the counter layout of docs/design.md.

Memory traffic: philox_normal writes 4 bytes per normal and reads 16 bytes per sample; it is bound by the ten
Philox rounds (~40 integer ops per four normals) and the Box-Muller log/sqrt/cos/sin, not by memory.
"""

import torch
import triton
import triton.language as tl

from ddpm_fast.kernels import INTERPRETED, launch

# Counters per program: the interpreter pays ~1 ms per program, a GPU wants many small ones.
_MAX_BLOCK = 16384 if INTERPRETED else 1024


@triton.jit
def _philox_kernel(
    counter_ptr,  # int64 (N, 4): counter words, uint32 values
    words_ptr,  # int64 (N, 4): output words
    n,  # number of counters
    seed,  # int64 key (low word, high word)
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    c0 = tl.load(counter_ptr + 4 * i + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + 4 * i + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + 4 * i + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + 4 * i + 3, mask=mask, other=0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(words_ptr + 4 * i + 0, r0.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 1, r1.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 2, r2.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 3, r3.to(tl.int64), mask=mask)


@triton.jit
def _philox_normal_kernel(
    out_ptr,  # float32 (B, numel), contiguous
    sample_index_ptr,  # int64 (B,): counter word c1
    counter2_ptr,  # int64 (B,): counter word c2
    seed,  # int64 key
    c3,  # int32: counter word c3 (stream | layer << 8)
    numel,  # normals per sample
    BLOCK: tl.constexpr,  # counters (four normals each) per program
):
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < (numel + 3) // 4
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    c0 = q.to(tl.uint32)
    c1 = zero + tl.load(sample_index_ptr + b).to(tl.uint32)
    c2 = zero + tl.load(counter2_ptr + b).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero + tl.cast(c3, tl.uint32))
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0),
                                              tl.random.uint_to_uniform_float(r1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2),
                                              tl.random.uint_to_uniform_float(r3))
    e = 4 * q  # element index within the sample; the 1-3 normals past numel are dropped
    row = out_ptr + b * numel
    tl.store(row + e + 0, n0, mask=mask)
    tl.store(row + e + 1, n1, mask=mask & (e + 1 < numel))
    tl.store(row + e + 2, n2, mask=mask & (e + 2 < numel))
    tl.store(row + e + 3, n3, mask=mask & (e + 3 < numel))


def philox(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Raw Philox4x32-10 words.

    Args: counter (N, 4) int64 with uint32 values; seed in [0, 2^63).
    Returns: (N, 4) int64 with uint32 values.
    """
    counter = counter.contiguous()
    words = torch.empty_like(counter)
    n = counter.shape[0]
    if n:
        block = min(_MAX_BLOCK, triton.next_power_of_2(n))
        launch(_philox_kernel, (triton.cdiv(n, block),), counter)(counter, words, n, seed, BLOCK=block)
    return words


def philox_normal(sample_index: torch.Tensor, counter2: torch.Tensor, seed: int, c3: int, numel: int) -> torch.Tensor:
    """Standard normals: out[b, e] from counter (e // 4, sample_index[b], counter2[b], c3) under `seed`.

    Args: sample_index, counter2 (B,) int64 (taken mod 2^32); seed in [0, 2^63); c3 in [0, 2^31); numel > 0.
    Returns: (B, numel) float32.
    """
    batch = sample_index.shape[0]
    out = torch.empty(batch, numel, dtype=torch.float32, device=sample_index.device)
    quads = (numel + 3) // 4
    block = min(_MAX_BLOCK, triton.next_power_of_2(quads))
    if batch:
        launch(_philox_normal_kernel, (batch, triton.cdiv(quads, block)), sample_index)(
            out, sample_index.contiguous(), counter2.contiguous(), seed, c3, numel, BLOCK=block)
    return out
