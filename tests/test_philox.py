"""The Philox noise: known answers, every backend against the reference (words exact, normals to 1e-6), the layout,
batch-split invariance, the statistics of the normals, and bad input."""
import math
import sys

import pytest
import torch

from ddpm_fast.ops import BACKENDS, philox, use_backend
from helpers import cpu_isas, run_with_cpu_isa

# Random123's known-answer vectors for philox4x32 with 10 rounds: (counter, key) -> output words
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counter,key,expected", [KAT[0], KAT[2]])  # KAT[1]'s key is past the public seed range
def test_known_answers(backend, counter, key, expected):
    seed = key[0] | key[1] << 32
    words = philox.philox(torch.tensor([counter], dtype=torch.int64), seed, backend=backend)
    assert tuple(words[0].tolist()) == expected


def test_known_answer_reference_full_key():
    # the all-ones key is outside the public seed range; the reference takes it directly
    words = philox.philox_reference(torch.tensor([[0xFFFFFFFF] * 4]), 2**64 - 1)
    assert tuple(words[0].tolist()) == KAT[1][2]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**63 - 1])
def test_raw_words_equal_reference(backend, seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    counter = torch.randint(0, 2**32, (517, 4), generator=gen, dtype=torch.int64)
    expected = philox.philox_reference(counter, seed)
    assert torch.equal(philox.philox(counter, seed, backend=backend), expected)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (3, 5, 5), (1, 16, 16), (2, 7, 9)])
def test_normals_equal_reference(backend, shape):
    index = torch.tensor([0, 5, 2**31 + 3, 2**32 + 1, 17], dtype=torch.int64)  # values past 2^32 wrap
    counter2 = torch.tensor([1000, 999, 0, 3, 2**32 - 1], dtype=torch.int64)
    for stream, layer in [(0, 0), (1, 0), (4, 37)]:
        ref = philox.randn(index, counter2, shape, seed=2**40 + 9, stream=stream, layer=layer, backend="reference")
        out = philox.randn(index, counter2, shape, seed=2**40 + 9, stream=stream, layer=layer, backend=backend)
        assert out.shape == (5, *shape) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max().item() < 1e-6


def test_layout_of_design_md():
    """normal e of sample b comes from counter (e // 4, sample_index[b], step[b], stream | layer << 8),
    pairs (r0, r1) and (r2, r3) through Box-Muller, cos first."""
    index, step = torch.tensor([7, 3]), torch.tensor([11, 500])
    out = philox.randn(index, step, (2, 3), seed=99, stream=4, layer=2, backend="reference")
    for b in range(2):
        for e in range(6):
            words = philox.philox_reference(torch.tensor([[e // 4, index[b], step[b], 4 | 2 << 8]]), 99)[0]
            u = [((w if w < 2**31 else 2**32 - 1 - w) * 4.6566127342e-10) for w in words.tolist()]
            pair = (u[0], u[1]) if e % 4 < 2 else (u[2], u[3])
            r = math.sqrt(-2.0 * math.log(max(pair[0], 1e-7)))
            value = r * (math.cos if e % 2 == 0 else math.sin)(2 * math.pi * pair[1])
            assert out[b].flatten()[e].item() == pytest.approx(value, abs=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_of_a_sample_does_not_depend_on_its_batch(backend):
    whole = philox.randn(torch.arange(10), torch.full((10,), 42), (3, 4, 4), seed=5, stream=1, backend=backend)
    part = philox.randn(torch.arange(6, 10), torch.full((4,), 42), (3, 4, 4), seed=5, stream=1, backend=backend)
    assert torch.equal(whole[6:], part)


def test_streams_seeds_and_steps_differ():
    base = dict(sample_index=torch.arange(4), step=torch.full((4,), 3), shape=(64,))
    a = philox.randn(**base, seed=1, stream=1)
    assert not torch.equal(a, philox.randn(**base, seed=2, stream=1))
    assert not torch.equal(a, philox.randn(**base, seed=1, stream=0))
    assert not torch.equal(a, philox.randn(**base, seed=1, stream=1, layer=1))
    assert not torch.equal(a[0], a[1])


def test_normal_statistics_over_a_million_draws():
    n = 1 << 20
    x = philox.randn(torch.arange(256), torch.full((256,), 1000), (n // 256,), seed=2024, stream=0).flatten().double()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)  # 5 sigma
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x ** 3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness
    assert abs((x ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    # Kolmogorov-Smirnov against N(0, 1); 1.95 / sqrt(n) is the 0.1% critical value
    sorted_x, _ = torch.sort(x)
    cdf = torch.special.ndtr(sorted_x)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum((grid - cdf).abs(), (cdf - (grid - 1 / n)).abs()).max().item()
    assert d < 1.95 / math.sqrt(n)


def test_cpp_ops_pass_opcheck():
    ops = torch.ops.ddpm_fast
    torch.library.opcheck(ops.philox.default, (torch.randint(0, 2**32, (9, 4)), 77))
    torch.library.opcheck(ops.philox_normal.default, (torch.arange(3), torch.tensor([5, 6, 7]), 77, 1, 75))


def test_bad_input_is_refused_with_the_argument_named():
    index, c2 = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="seed"):
        philox.randn(index, c2, (4,), seed=-1, stream=0)
    with pytest.raises(ValueError, match="seed"):
        philox.randn(index, c2, (4,), seed=2**63, stream=0)
    with pytest.raises(ValueError, match="step"):
        philox.randn(index, c2[:2], (4,), seed=0, stream=0)
    with pytest.raises(ValueError, match="sample_index"):
        philox.randn(index.float(), c2, (4,), seed=0, stream=0)
    with pytest.raises(ValueError, match="stream"):
        philox.randn(index, c2, (4,), seed=0, stream=256)
    with pytest.raises(ValueError, match="shape"):
        philox.randn(index, c2, (0, 3), seed=0, stream=0)
    with pytest.raises(ValueError, match="counter"):
        philox.philox(torch.zeros(3, 3, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.ddpm_fast.philox_normal(index.int(), c2, 0, 0, 4)


def test_backend_choice():
    index, c2 = torch.arange(2), torch.zeros(2, dtype=torch.int64)
    with use_backend("reference"):
        ref = philox.randn(index, c2, (8,), seed=0, stream=0)
    assert torch.allclose(ref, philox.randn(index, c2, (8,), seed=0, stream=0, backend="cpp"), atol=1e-6)
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("cuda-magic"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        philox.randn(index, c2, (8,), seed=0, stream=0, backend="fast")


CPU_ISA_PROBE = """
import hashlib, torch
from ddpm_fast.ops import diffusion_step, philox
index, counter2 = torch.arange(5) + 2**31, torch.tensor([0, 1, 999, 2**32 - 1, 7])
normals = philox.randn(index, counter2, (3, 7, 9), seed=2**40 + 1, stream=1, backend="cpp")
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 3, 7, 9, generator=g)
step, _ = diffusion_step.reverse_step(x, x.flip(0), torch.tensor([0, 1, 5, 8, 9]), torch.rand(10, 5, generator=g), index,
                                      counter2, seed=3, backend="cpp")
print(hashlib.sha256(normals.numpy().tobytes() + step.numpy().tobytes()).hexdigest())
"""


def test_every_cpu_instruction_set_gives_the_same_bits():
    """The C++ normals come from AVX-512, AVX2 or portable code, whichever the CPU runs ($DDPM_FAST_CPU_ISA forces
    one): no FMA contraction and no select-dependent rounding, so all three give identical bits."""
    digests = {}
    for isa in cpu_isas():
        done = run_with_cpu_isa(isa, CPU_ISA_PROBE)
        assert done.returncode == 0, done.stderr[-2000:]
        digests[isa] = done.stdout.strip()
    assert len(digests) >= 2 or sys.platform != "linux"
    assert len(set(digests.values())) == 1, digests


def test_an_unknown_cpu_instruction_set_is_refused():
    done = run_with_cpu_isa("sse9", CPU_ISA_PROBE)
    assert done.returncode != 0 and "DDPM_FAST_CPU_ISA must be portable, avx2 or avx512, got 'sse9'" in done.stderr