"""The fused GroupNorm (+ add, SiLU, dropout): every backend against the float64 reference, forward and backward, odd
shapes, every dtype, both layouts, poisoned outputs, the mean-1e3/std-1e-3 case, the dropout mask (Philox stream 4,
the same in forward and backward), gradcheck, opcheck, torch.compile, bad input, and the U-Net wired to it."""
import os

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast
from ddpm_fast.ops import group_norm as gn
from ddpm_fast.ops import use_backend
from ddpm_fast.ops.philox import STREAM_DROPOUT
from helpers import cpu_isas, relative_error, run_with_cpu_isa
from test_unet import randomize_

FUSED = ["cpp", "triton"]
# (shape, groups): N = 1, H = W = 1, 3x7 spatial, one channel per group, 384 channels (the paper's up path), 1-D
CASES = [((2, 8, 5, 7), 4), ((1, 4, 1, 1), 4), ((3, 6, 3, 7), 3), ((2, 5, 4, 4), 5), ((2, 384, 2, 2), 32),
         ((2, 6, 9), 3)]
# Triton runs under the CPU interpreter here (~1 ms per program and per loop step): small groups only
CASES_BY_BACKEND = [("cpp", *case) for case in CASES] + [("triton", *case) for case in CASES if case[0][1] < 100]
LOW = {torch.bfloat16, torch.float16}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def poisoned():
    """Every torch.empty / at::empty inside the ops comes back NaN-filled, so an element a kernel skips shows."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def inputs(shape, dtype, seed, with_add=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    w = (torch.randn(shape[1], generator=g, dtype=torch.float64) + 1.0).to(dtype)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    add = torch.randn(shape[:2], generator=g, dtype=torch.float64).to(dtype) if with_add else None
    return x, w, b, add


def reference(x, w, b, groups, add, act, dropout, seed=7, layer=2, dtype=torch.float64):
    """The reference on the same values in `dtype` (float64: the truth), with the keys group_norm_silu uses."""
    n = x.shape[0]
    return gn.group_norm_silu_reference(
        x.to(dtype), w.to(dtype), b.to(dtype), groups, 1e-6, None if add is None else add.to(dtype), act, dropout,
        torch.arange(n), torch.zeros(n, dtype=torch.int64), seed, STREAM_DROPOUT | (layer << 8))


def tolerance(dtype, same_dtype_error, backend):
    """float32/64 < 1e-5; low precision: at most twice the same-dtype reference's error plus 1e-3, and < 1e-2.
    Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest): there only the 1e-2 ceiling."""
    if dtype not in LOW:
        return 1e-5
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        return 1e-2
    return min(2 * same_dtype_error + 1e-3, 1e-2)


def layouts(x):
    yield "contiguous", x
    if x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend,shape,groups", CASES_BY_BACKEND, ids=str)
@pytest.mark.parametrize("with_add,act,dropout", [(True, True, 0.0), (False, False, 0.0), (True, True, 0.3)])
def test_forward_equals_reference(backend, dtype, shape, groups, with_add, act, dropout, poisoned):
    x, w, b, add = inputs(shape, dtype, 1, with_add)
    truth = reference(x, w, b, groups, add, act, dropout)
    same = relative_error(reference(x, w, b, groups, add, act, dropout, dtype=dtype), truth) if dtype in LOW else 0
    for layout, xx in layouts(x):
        y = gn.group_norm_silu(xx, w, b, groups, 1e-6, add=add, act=act, dropout=dropout, seed=7, layer=2,
                               backend=backend)
        assert y.dtype == dtype and y.shape == shape and torch.isfinite(y).all(), layout
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(y, truth) < tolerance(dtype, same, backend), layout


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", [False, True])
def test_mean_1e3_std_1e3_is_normalised_with_shifted_statistics(backend, act):
    """float32 inputs of mean 1e3 and std 1e-3: < 1e-4 against float64 on the same inputs (F.group_norm: ~1e-2)."""
    g = torch.Generator().manual_seed(3)
    x = (1e3 + 1e-3 * torch.randn(4, 64, 8, 8, generator=g, dtype=torch.float64)).float()
    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    add = (1e-3 * torch.randn(4, 64, generator=g, dtype=torch.float64)).float()
    truth = reference(x, w, b, 32, add, act, 0.0)
    for layout, xx in layouts(x):
        got = gn.group_norm_silu(xx, w, b, 32, 1e-6, add=add, act=act, backend=backend)
        assert relative_error(got, truth) < 1e-4, layout
    eager = F.group_norm(x + add[:, :, None, None], 32, w, b, 1e-6)
    assert relative_error(F.silu(eager) if act else eager, truth) > 1e-3  # why the shift is needed


# ---------------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,shape,groups", CASES_BY_BACKEND, ids=str)
@pytest.mark.parametrize("with_add,act,dropout", [(True, True, 0.0), (False, False, 0.0), (True, True, 0.3)])
def test_gradients_equal_reference(backend, dtype, shape, groups, with_add, act, dropout, poisoned):
    x, w, b, add = inputs(shape, dtype, 2, with_add)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def grads(fn, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        fn(*leaves).backward(grad_y.to(leaves[0].dtype))
        return [leaf.grad for leaf in leaves]

    tensors = [x, w, b] + ([add] if with_add else [])
    truth = grads(lambda x_, w_, b_, *a: reference(x_, w_, b_, groups, a[0] if a else None, act, dropout),
                  [t.double() for t in tensors])
    for layout, xx in layouts(x):
        ours = grads(lambda x_, w_, b_, *a: gn.group_norm_silu(x_, w_, b_, groups, 1e-6, add=a[0] if a else None,
                                                                act=act, dropout=dropout, seed=7, layer=2,
                                                                backend=backend), [xx] + tensors[1:])
        for name, got, want in zip(["x", "weight", "bias", "add"], ours, truth):
            assert got.dtype == dtype and torch.isfinite(got).all(), (layout, name)
            limit = 1e-4 if dtype == torch.float32 else 1e-2  # reductions over the group: the reduction tolerance
            if want.abs().max() > 1e-9:
                assert relative_error(got, want) < limit, (layout, name, relative_error(got, want))


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_with_add_silu_dropout_and_channels_last(backend):
    x, w, b, add = inputs((2, 6, 3, 3) if backend == "cpp" else (1, 4, 2, 2), torch.float64, 4)
    groups = x.shape[1] // 2
    for xx, dropout, act in [(x, 0.0, True), (x, 0.4, True), (x.contiguous(memory_format=torch.channels_last), 0.4,
                                                              False)]:
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_, a_: gn.group_norm_silu(x_, w_, b_, groups, 1e-5, add=a_, act=act, dropout=dropout,
                                                      seed=11, layer=1, backend=backend),
            tuple(t.detach().requires_grad_() for t in (xx, w, b, add)))


def test_backward_is_deterministic():
    x, w, b, add = inputs((4, 64, 16, 16), torch.float32, 5)
    runs = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (x, w, b, add)]
        gn.group_norm_silu(*leaves[:3], 32, 1e-6, add=leaves[3], dropout=0.1, backend="cpp").square().sum().backward()
        runs.append([leaf.grad for leaf in leaves])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# Forward and gradients of the C++ op on float32 and bf16 x, written to argv[1]: rows of 81 (a 64-element block, a
# vector and a one-element tail), 21, 64 and 1 positions, with and without add, SiLU and dropout; contiguous, and
# channels_last (k + 4: 8, 6 and 64 channels, a masked vector of channels and four groups in one vector).
ISA_PROBE = """
import sys, torch
from ddpm_fast.ops import group_norm as gn
out = {}
cases = [((2, 8, 9, 9), 4), ((3, 6, 3, 7), 3), ((2, 64, 8, 8), 32), ((1, 4, 1, 1), 4)]
for k, (shape, groups) in enumerate(cases + cases[:3]):
  for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(k % 4)
    x, grad_y = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype), torch.randn(shape, generator=g).to(dtype)
    if k >= 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, add = 1 + 0.5 * torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g), torch.randn(shape[:2], generator=g)
    for act, dropout in [(True, 0.0), (False, 0.0), (True, 0.3)]:
        leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
        y = gn.group_norm_silu(*leaves[:3], groups, 1e-6, add=leaves[3], act=act, dropout=dropout, seed=5, layer=1,
                               backend="cpp")
        y.backward(grad_y)
        out[(k, dtype, act, dropout)] = [t.detach() for t in (y, *(leaf.grad for leaf in leaves))] + [x, w, b, add, grad_y]
torch.save(out, sys.argv[1])
"""


def test_every_cpu_instruction_set_equals_the_reference(tmp_path):
    """float32 and bf16 contiguous x (and channels_last x in the forward without dropout) run the AVX-512 kernels
    (group_norm_avx512.cpp) where the CPU has AVX-512, the portable kernels otherwise ($DDPM_FAST_CPU_ISA=portable
    forces them; avx2 runs the portable kernels' AVX2 clone): each against the float64 reference, forward and
    gradients (bf16: the tolerance rule against the bf16 reference's own error), and the same dropout mask; bf16
    outputs of every instruction set within one bf16 rounding of the portable kernels' (the math is float32 in both,
    rounded once on store as c10::BFloat16), its gradients within 1e-3 (a bf16 rounding apart in a few elements)."""
    results = {}
    for isa in cpu_isas():
        done = run_with_cpu_isa(isa, ISA_PROBE, str(tmp_path / f"{isa}.pt"))
        assert done.returncode == 0, done.stderr[-2000:]
        results[isa] = torch.load(tmp_path / f"{isa}.pt")
    groups_of = {0: 4, 1: 3, 2: 32, 3: 4, 4: 4, 5: 3, 6: 32}
    for isa, result in results.items():
        for (k, dtype, act, dropout), (y, *grads_and_inputs) in result.items():
            grads, (x, w, b, add, grad_y) = grads_and_inputs[:4], grads_and_inputs[4:]
            case = (isa, k, dtype, act, dropout)
            truth, same_dtype = [], []
            for ref_dtype, out in ((torch.float64, truth), (dtype, same_dtype)):
                leaves = [t.detach().to(ref_dtype, copy=True).requires_grad_() for t in (x, w, b, add)]
                want = reference(*leaves[:3], groups_of[k], leaves[3], act, dropout, seed=5, layer=1, dtype=ref_dtype)
                want.backward(grad_y.to(ref_dtype))
                out.extend([want.detach()] + [leaf.grad for leaf in leaves])
            assert relative_error(y, truth[0]) < tolerance(dtype, relative_error(same_dtype[0], truth[0]), "cpp"), case
            assert torch.equal(y == 0, truth[0] == 0) or not dropout or dtype != torch.float32, case  # the same mask
            for name, got, want, ours in zip(["x", "weight", "bias", "add"], grads, truth[1:], same_dtype[1:]):
                if want.abs().max() > 1e-9:
                    bound = 1e-4 if dtype == torch.float32 else tolerance(dtype, relative_error(ours, want), "cpp")
                    assert relative_error(got, want) < bound, (*case, name)
                else:  # one element per group: dx, dadd are 0 up to rounding times rstd = 1 / sqrt(eps) = 1e3
                    assert got.abs().max() < (1e-4 if dtype == torch.float32 else 1e-1), (*case, name)
            if dtype == torch.bfloat16:
                portable = results["portable"][(k, dtype, act, dropout)]
                assert ((y.float() - portable[0].float()).abs() <= 2 ** -7 * portable[0].float().abs()).all(), case  # 1 ulp
                for got, want in zip(grads, portable[1:5]):  # (dx: sums of cancelling terms in another order)
                    assert torch.equal(got, want) or relative_error(got, want) < 1e-3, case
    assert len(results) >= 2


# ---------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_dropout_mask_is_philox_stream_4_by_layer_seed_sample_and_step(backend):
    batch = 16 if backend == "triton" else 64  # the interpreter is slow
    x, w, b, _ = inputs((batch, 8, 4, 4) if backend == "triton" else (batch, 8, 8, 8), torch.float32, 6)
    plain = gn.group_norm_silu(x, w, b, 4, 1e-6, backend=backend)

    def kept(**keys):
        y = gn.group_norm_silu(x, w, b, 4, 1e-6, dropout=0.3, backend=backend, **keys)
        return y != 0

    mask = kept(seed=1, layer=3)
    assert abs(mask.float().mean().item() - 0.7) < 4 * (0.21 / mask.numel()) ** 0.5  # four standard errors
    y = gn.group_norm_silu(x, w, b, 4, 1e-6, dropout=0.3, seed=1, layer=3, backend=backend)
    assert torch.allclose(y[mask], plain[mask] / 0.7, rtol=1e-5, atol=1e-6)
    expected = gn.dropout_mask_reference(x, 0.3, torch.arange(batch), torch.zeros(batch, dtype=torch.int64), 1,
                                         STREAM_DROPOUT | (3 << 8)) != 0
    assert torch.equal(mask, expected)
    for other in [dict(seed=2, layer=3), dict(seed=1, layer=4), dict(seed=1, layer=3, step=1),
                  dict(seed=1, layer=3, sample_index=torch.arange(batch) + batch)]:
        assert not torch.equal(kept(**other), mask)
    # a sample's mask depends on its own index, not on the batch around it
    assert torch.equal(kept(seed=1, layer=3, sample_index=torch.arange(batch))[5:9], mask[5:9])


# ---------------------------------------------------------------------------------------------------- registration
def test_opcheck_cpp_ops():
    x, w, b, add = inputs((2, 8, 3, 5), torch.float32, 8)
    keys = (torch.arange(2), torch.zeros(2, dtype=torch.int64), 3, STREAM_DROPOUT)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        for a, dropout in [(add, 0.2), (None, 0.0)]:
            args = (xx.requires_grad_(), w.requires_grad_(), b.requires_grad_(), a, 4, 1e-6, True, dropout, *keys)
            torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, args)
            y, shift, rstd = torch.ops.ddpm_fast.group_norm_silu(*args)
            torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_backward.default,
                                  (torch.randn_like(y), xx.detach(), w.detach(), b.detach(), a, shift, rstd, 4, True,
                                   dropout, *keys))


def test_torch_compile_fullgraph_equals_eager():
    x, w, b, add = inputs((2, 8, 4, 4), torch.float32, 10)

    def step(x_, w_, b_, a_):
        y = gn.group_norm_silu(x_, w_, b_, 4, 1e-6, add=a_, dropout=0.2, seed=3, backend="cpp")
        return y.square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, add)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_empty_input_gives_empty_output_zero_statistics_and_zero_parameter_grads(backend, poisoned):
    x, w, b, add = (t.requires_grad_() for t in (torch.randn(2, 4, 0, 3), torch.randn(4), torch.randn(4),
                                                  torch.randn(2, 4)))
    y = gn.group_norm_silu(x, w, b, 2, 1e-6, add=add, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))
    assert torch.equal(add.grad, torch.zeros(2, 4))
    if backend == "cpp":  # the saved statistics are zeros, not uninitialised memory (NaN here: poisoned)
        _, shift, rstd = torch.ops.ddpm_fast.group_norm_silu(x.detach(), w.detach(), b.detach(), None, 2, 1e-6, True,
                                                             0.0, torch.zeros(2, dtype=torch.long),
                                                             torch.zeros(2, dtype=torch.long), 0, 0)
        assert torch.equal(shift, torch.zeros(2, 2)) and torch.equal(rstd, torch.zeros(2, 2))


def test_bad_input_names_the_reason():
    x, w, b, add = inputs((2, 8, 3, 3), torch.float32, 12)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        gn.group_norm_silu(x.long(), w, b, 4, 1e-6)
    with pytest.raises(ValueError, match="8 channels cannot be split into 3 groups"):
        gn.group_norm_silu(x, w, b, 3, 1e-6)
    with pytest.raises(ValueError, match=r"weight must be a float tensor of shape \(8,\)"):
        gn.group_norm_silu(x, w[:4], b, 4, 1e-6)
    with pytest.raises(ValueError, match=r"add must be a float tensor of shape \(2, 8\)"):
        gn.group_norm_silu(x, w, b, 4, 1e-6, add=add.t())
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        gn.group_norm_silu(x, w, b, 4, 1e-6, dropout=1.0)
    with pytest.raises(ValueError, match="seed"):
        gn.group_norm_silu(x, w, b, 4, 1e-6, seed=-1)
    with pytest.raises(RuntimeError, match="cannot be split into 3 groups"):  # the C++ op checks on its own too
        torch.ops.ddpm_fast.group_norm_silu(x, w, b, None, 3, 1e-6, True, 0.0, torch.arange(2), torch.arange(2), 0, 4)


# ---------------------------------------------------------------------------------------------------- the U-Net
@pytest.mark.parametrize("training", [False, True])
def test_unet_on_the_fused_op_equals_the_reference_op(training):
    """Every ResBlock (norm2 with the time embedding, SiLU and dropout fused), the attention norm and norm_out: the
    output and every parameter's gradient equal those with the reference op (float32 < 1e-4)."""
    net = randomize_(ddpm_fast.UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                    attn_resolutions=(4,), dropout=0.3, num_groups=4), seed=4)
    net.train(training)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    results = {}
    for backend in ["reference", "cpp"]:
        net.zero_grad()
        torch.manual_seed(0)  # the forward's dropout key
        with use_backend(backend) if backend == "reference" else torch.enable_grad():
            out = net(x, t)
            out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    ref_out, ref_grads = results["reference"]
    out, grads = results["cpp"]
    assert relative_error(out, ref_out) < 1e-4
    for name, grad in grads.items():
        # (the attention's key bias has a zero gradient in exact arithmetic: both are ~1e-12 of rounding)
        if ref_grads[name].abs().max() > 1e-8:
            assert relative_error(grad, ref_grads[name]) < 1e-4, name
    if training:  # dropout did something, and the same thing in both
        net.eval()
        assert relative_error(net(x, t), out) > 1e-3


def test_a_call_without_dropout_after_inference_mode_still_trains():
    """Calls without dropout share one placeholder for the counter words (no mask to draw); made inside
    inference_mode first, it must still be a normal tensor that a later training call can save for its backward."""
    from ddpm_fast.ops import group_norm as ops
    ops.placeholders.clear()
    x, w, b = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    with torch.inference_mode():
        ops.group_norm_silu(x, w, b, 4, 1e-6)
    leaf = x.clone().requires_grad_()
    ops.group_norm_silu(leaf, w, b, 4, 1e-6).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
