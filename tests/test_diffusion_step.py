"""The fused diffusion ops (forward noising, L_simple, reverse step): every backend against the float64 reference on
random inputs, odd shapes, every dtype, both layouts, poisoned outputs, t at 0, T-1 and mixed; the noise equals the
Philox stream; gradients; registration (opcheck, fake impls, torch.compile); bad input; int64 index arithmetic."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import ddpm_fast
from ddpm_fast import Diffusion
from ddpm_fast.kernels.diffusion_step import element_offset
from ddpm_fast.ops import BackendUnavailable, diffusion_step as ds, philox
from helpers import relative_error

REPO = Path(__file__).resolve().parent.parent
FUSED = ["cpp", "triton"]
SHAPES = [(1, 1, 1, 1), (3, 7, 5, 9), (2, 3, 4, 6), (1, 3, 8, 8), (5, 13), (2, 5, 3, 2, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
T = 1000


@pytest.fixture
def poisoned():
    """Every torch.empty / at::empty inside the ops comes back NaN-filled, so an element a kernel skips shows."""
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion()


def mixed_t(batch: int, generator: torch.Generator) -> torch.Tensor:
    """t = 0, T - 1, then random: the ends of the table and the middle."""
    t = torch.randint(0, T, (batch,), generator=generator)
    t[0] = 0
    if batch > 1:
        t[1] = T - 1
    return t


def data(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def keys(batch: int):
    """Counter words past 2^31 and 2^32 (the latter wrap mod 2^32)."""
    index = torch.arange(batch) * 7 + 2**31 - 3
    counter2 = torch.arange(batch) + 2**32 - 2
    return index, counter2


def layouts(x: torch.Tensor):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------- q_sample
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_q_sample_philox_equals_reference_and_draws_the_stream(backend, dtype, shape, diffusion, poisoned):
    g = torch.Generator().manual_seed(1)
    x0 = data(shape, dtype, 2)
    t = mixed_t(shape[0], g)
    index, counter2 = keys(shape[0])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = diffusion.tables_on(torch.device("cpu"), acc)["q_sample"]
    coef64 = diffusion.tables_on(torch.device("cpu"), torch.float64)["q_sample"]
    stream = philox.randn(index, counter2, shape[1:], seed=2**40 + 1, stream=philox.STREAM_TRAIN_EPS,
                          backend="reference")
    expected = ds.q_sample_reference(x0.double(), t, coef64, stream.double())
    for name, x in layouts(x0):
        x_t, eps = ds.q_sample_philox(x, t, coef, index, counter2, seed=2**40 + 1, backend=backend)
        assert x_t.dtype == acc and eps.dtype == acc and x_t.shape == shape, name
        assert torch.isfinite(x_t).all() and torch.isfinite(eps).all(), name
        assert (eps.double() - stream.double()).abs().max() < 1e-6, name  # the Philox stream, to ~2 ulp
        assert relative_error(x_t, expected) < 1e-5, name
        if name == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert x_t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_q_sample_with_given_noise(backend, dtype, shape, diffusion, poisoned):
    x0, noise = data(shape, dtype, 3), data(shape, dtype, 4)
    t = mixed_t(shape[0], torch.Generator().manual_seed(5))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = diffusion.tables_on(torch.device("cpu"), acc)["q_sample"]
    coef64 = diffusion.tables_on(torch.device("cpu"), torch.float64)["q_sample"]
    expected = ds.q_sample_reference(x0.double(), t, coef64, noise.double())
    for name, x in layouts(x0):
        out = ds.q_sample(x, t, coef, noise, backend=backend)
        assert torch.isfinite(out).all() and relative_error(out, expected) < 1e-5, name


@pytest.mark.parametrize("backend", FUSED)
def test_q_sample_gradients(backend, diffusion):
    x0, noise = data((2, 3, 4, 4), torch.float64, 6), data((2, 3, 4, 4), torch.float64, 7)
    t = torch.tensor([0, 999])
    coef = diffusion.tables_on(torch.device("cpu"), torch.float64)["q_sample"]
    assert torch.autograd.gradcheck(lambda a, b: ds.q_sample(a, t, coef, b, backend=backend),
                                    (x0.requires_grad_(), noise.requires_grad_()))
    x = x0.detach().requires_grad_()
    x_t, _ = ds.q_sample_philox(x, t, coef, torch.arange(2), torch.arange(2), seed=0, backend=backend)
    x_t.sum().backward()
    assert torch.allclose(x.grad, coef[t, 0].view(2, 1, 1, 1).expand_as(x))


# ---------------------------------------------------------------------------------------------------- L_simple
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("pred_dtype,eps_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16), (torch.float64, torch.float64)],
                         ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 64, 64)], ids=str)
def test_simple_loss_and_its_gradient_equal_reference(backend, pred_dtype, eps_dtype, shape, poisoned):
    eps_pred, eps = data(shape, pred_dtype, 8), data(shape, eps_dtype, 9)
    expected = ds.simple_loss_reference(eps_pred.double(), eps.double())
    expected_grad = 2.0 * (eps_pred.double() - eps.double()) / eps[0].numel()
    for name, p in layouts(eps_pred):
        p = p.detach().requires_grad_()
        loss = ds.simple_loss(p, eps, backend=backend)
        assert loss.shape == (shape[0],) and loss.dtype == (torch.float64 if pred_dtype == torch.float64
                                                           else torch.float32), name
        assert relative_error(loss, expected) < 1e-5, name
        loss.sum().backward()
        assert p.grad.dtype == pred_dtype and torch.isfinite(p.grad).all(), name
        tolerance = 1e-5 if pred_dtype in (torch.float32, torch.float64) else 1e-2  # the gradient is stored in pred_dtype
        assert relative_error(p.grad, expected_grad) < tolerance, name


@pytest.mark.parametrize("backend", FUSED)
def test_simple_loss_gradcheck(backend):
    eps_pred = data((3, 2, 3, 5), torch.float64, 10).requires_grad_()
    eps = data((3, 2, 3, 5), torch.float64, 11).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ds.simple_loss(a, b, backend=backend), (eps_pred, eps))


def test_simple_loss_is_deterministic():
    eps_pred, eps = data((4, 3, 64, 64), torch.float32, 12), data((4, 3, 64, 64), torch.float32, 13)
    first = ds.simple_loss(eps_pred, eps, backend="cpp")
    for _ in range(3):
        assert torch.equal(ds.simple_loss(eps_pred, eps, backend="cpp"), first)


# ---------------------------------------------------------------------------------------------------- reverse step
def step_inputs(shape, eps_dtype, seed):
    x_t = data(shape, torch.float32, seed, scale=1.5)
    eps = data(shape, eps_dtype, seed + 1)
    t = mixed_t(shape[0], torch.Generator().manual_seed(seed + 2))
    return x_t, eps, t


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sampler,variance,clip", [("ddpm", "fixed_large", True), ("ddpm", "fixed_small", False),
                                                   ("ddim", "fixed_large", True), ("ddim_eta", "fixed_large", False)])
def test_reverse_step_equals_reference(backend, eps_dtype, shape, sampler, variance, clip, poisoned):
    d = Diffusion(variance=variance).respace(250) if sampler != "ddpm" else Diffusion(variance=variance)
    name, eta = ("ddim", 0.7) if sampler == "ddim_eta" else (sampler, 0.0)
    x_t, eps, t = step_inputs(shape, eps_dtype, 14)
    t = t.clamp(max=d.num_timesteps - 1)
    index, counter2 = keys(shape[0])
    table = d.step_table("cpu", torch.float32, name, eta)
    expected, expected_x0 = ds.reverse_step_reference(x_t.double(), eps.double(), t,
                                                      d.step_table("cpu", torch.float64, name, eta), index,
                                                      counter2, 77, philox.STREAM_REVERSE, clip, True)
    for layout, x in layouts(x_t):
        x_prev, x0_hat = ds.reverse_step(x, eps, t, table, index, counter2, seed=77, clip=clip, write_x0=True,
                                         backend=backend)
        assert x_prev.dtype == torch.float32 and torch.isfinite(x_prev).all() and torch.isfinite(x0_hat).all()
        assert relative_error(x_prev, expected) < 1e-5, layout
        assert relative_error(x0_hat, expected_x0) < 1e-5, layout
        same, _ = ds.reverse_step(x, eps, t, table, index, counter2, seed=77, clip=clip, backend=backend)
        assert torch.equal(same, x_prev), layout  # writing x0_hat changes nothing else
    if clip:
        assert x0_hat.abs().max() <= 1.0


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_reverse_step_flags_the_largest_t_whose_output_is_not_finite(backend):
    """nonfinite_t becomes max(itself, t[b]) over the samples b with a NaN or inf in x_{t-1}, set in the step's own
    pass (the sampler's flag); finite outputs leave it, and the outputs are those of a step without it."""
    d = Diffusion()
    x_t, eps, _ = step_inputs((4, 3, 5, 7), torch.float32, 30)
    t = torch.tensor([17, 400, 3, 250])
    table, (index, counter2) = d.step_table("cpu"), keys(4)
    bad_eps = eps.clone()
    bad_eps[0, 1, 2, 3] = float("nan")  # t = 17
    bad_eps[2, 2, 4, 6] = float("inf")  # t = 3, the last element
    for layout, x in layouts(x_t):
        for given, start, want in ((eps, -1, -1), (bad_eps, -1, 17), (bad_eps, 5, 17), (bad_eps, 100, 100)):
            flag = torch.tensor(start)
            out, _ = ds.reverse_step(x, given, t, table, index, counter2, seed=1, nonfinite_t=flag, backend=backend)
            assert flag.item() == want, (layout, start)
            plain, _ = ds.reverse_step(x, given, t, table, index, counter2, seed=1, backend=backend)
            assert torch.equal(out.isnan(), plain.isnan()) and torch.equal(out.nan_to_num(), plain.nan_to_num())
        hot = x.clone()
        hot[1, 0, 0, 0] = float("inf")  # in x_t: x_{t-1} = c_x0 x0_hat + c_xt x_t is inf there (t = 400)
        flag = torch.tensor(-1)
        ds.reverse_step(hot, eps, t, table, index, counter2, seed=1, nonfinite_t=flag, backend=backend)
        assert flag.item() == 400, layout
    for wrong in (torch.tensor(-1.0), torch.tensor([-1]), -1):
        with pytest.raises(ValueError, match="nonfinite_t must be a 0-d int64 tensor"):
            ds.reverse_step(x_t, eps, t, table, index, counter2, seed=1, nonfinite_t=wrong, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_reverse_step_is_the_papers_step(backend):
    """DDPM rows: x_{t-1} = posterior mean at the clipped x0_hat + exp(log variance / 2) z, z = philox.randn of
    stream 1 keyed by (seed, sample index, original t), no noise at t = 0 (Diffusion.p_mean_variance, eagerly)."""
    d = Diffusion()
    x_t, eps, t = step_inputs((4, 3, 6, 6), torch.float32, 20)
    index = torch.tensor([3, 0, 9, 2])
    out, x0_hat = ds.reverse_step(x_t, eps, t, d.step_table("cpu"), index, t, seed=5, write_x0=True,
                                  backend=backend)
    pmv = d.p_mean_variance(lambda x, tt: eps, x_t, t)
    z = philox.randn(index, t, (3, 6, 6), seed=5, stream=philox.STREAM_REVERSE)
    expected = pmv.mean + (t != 0).view(-1, 1, 1, 1) * torch.exp(0.5 * pmv.log_variance) * z
    assert relative_error(out, expected) < 1e-5
    assert relative_error(x0_hat, pmv.pred_x0) < 1e-6
    assert torch.allclose(out[0], pmv.mean[0], atol=1e-6)  # t = 0: the mean, no noise


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_rows_are_song_et_al(backend, eta):
    """DDIM as improved-diffusion's ddim_sample: eps re-derived from the clipped x0_hat, then eq. 12."""
    d = Diffusion().respace(50)
    x_t, eps, t = step_inputs((3, 2, 5, 5), torch.float32, 30)
    t = t.clamp(max=49)
    index = torch.arange(3)
    counter2 = d.timestep_map[t]
    out, x0_hat = ds.reverse_step(x_t, eps, t, d.step_table("cpu", torch.float32, "ddim", eta), index, counter2,
                                  seed=9, write_x0=True, backend=backend)
    tab = {k: v[t].view(-1, 1, 1, 1) for k, v in d.tables.items()}
    x, e = x_t.double(), eps.double()
    pred_x0 = (tab["sqrt_recip_alphas_cumprod"] * x - tab["sqrt_recipm1_alphas_cumprod"] * e).clamp(-1, 1)
    eps_prime = (tab["sqrt_recip_alphas_cumprod"] * x - pred_x0) / tab["sqrt_recipm1_alphas_cumprod"]
    abar, abar_prev = tab["alphas_cumprod"], tab["alphas_cumprod_prev"]
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    z = philox.randn(index, counter2, (2, 5, 5), seed=9, stream=philox.STREAM_REVERSE).double()
    expected = (pred_x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps_prime
                + (t != 0).view(-1, 1, 1, 1) * sigma * z)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(x0_hat, pred_x0) < 1e-6
    assert torch.allclose(out[0].double(), pred_x0[0], atol=1e-6)  # the last step returns x0_hat


def test_no_noise_is_drawn_where_the_step_has_none():
    """Changing the seed changes nothing at t = 0, nor anywhere for DDIM with eta = 0."""
    d = Diffusion().respace(50)
    x_t, eps, t = step_inputs((3, 2, 5, 5), torch.float32, 40)
    t = t.clamp(max=49)
    for table, rows in [(d.step_table("cpu"), slice(0, 1)), (d.step_table("cpu", torch.float32, "ddim", 0.0),
                                                             slice(None))]:
        a, _ = ds.reverse_step(x_t, eps, t, table, torch.arange(3), t, seed=1, backend="cpp")
        b, _ = ds.reverse_step(x_t, eps, t, table, torch.arange(3), t, seed=2, backend="cpp")
        assert torch.equal(a[rows], b[rows])


def test_nan_propagates_through_the_clip():
    d = Diffusion()
    x_t, eps, t = step_inputs((2, 1, 2, 2), torch.float32, 50)
    eps[1, 0, 0, 0] = float("nan")
    for backend in FUSED:
        out, x0_hat = ds.reverse_step(x_t, eps, t, d.step_table("cpu"), torch.arange(2), t, seed=0, write_x0=True,
                                      backend=backend)
        assert torch.isnan(out[1, 0, 0, 0]) and torch.isnan(x0_hat[1, 0, 0, 0])
        assert torch.isfinite(out[0]).all()


# ---------------------------------------------------------------------------------------------------- big batches
def test_batch_of_many_small_samples_and_one_large_sample(diffusion):
    """Batch 300 of 1x3x3 (many programs/chunks per launch) and one sample of 3x96x96 (many chunks)."""
    for shape in [(300, 1, 3, 3), (1, 3, 96, 96)]:
        x_t, eps, t = step_inputs(shape, torch.float32, 60)
        index, counter2 = keys(shape[0])
        table = diffusion.step_table("cpu")
        ref, _ = ds.reverse_step(x_t, eps, t, table, index, counter2, seed=3, backend="reference")
        for backend in FUSED:
            out, _ = ds.reverse_step(x_t, eps, t, table, index, counter2, seed=3, backend=backend)
            assert relative_error(out, ref) < 1e-6, (shape, backend)


# ---------------------------------------------------------------------------------------------------- registration
def cpp_op_samples(diffusion):
    x0 = data((2, 3, 4, 5), torch.float32, 70)
    eps = data((2, 3, 4, 5), torch.float32, 71)
    t = torch.tensor([0, 600])
    index, counter2 = torch.tensor([1, 2]), torch.tensor([3, 4])
    q = diffusion.tables_on(torch.device("cpu"), torch.float32)["q_sample"]
    step = diffusion.step_table("cpu")
    return {
        "q_sample": (x0, t, q, eps),
        "q_sample_philox": (x0, t, q, index, counter2, 7, 2),
        "simple_loss": (x0.clone().requires_grad_(), eps),
        "simple_loss_backward": (torch.rand(2), x0, eps),
        "reverse_step": (x0, eps, t, step, index, counter2, 7, 1, True, True),
    }


@pytest.mark.parametrize("op", ["q_sample", "q_sample_philox", "simple_loss", "simple_loss_backward",
                                "reverse_step"])
def test_opcheck_cpp_ops(op, diffusion):
    args = cpp_op_samples(diffusion)[op]
    torch.library.opcheck(getattr(torch.ops.ddpm_fast, op).default, args)
    if op == "reverse_step":  # with the flag, raised by an inf in eps (unclipped: x_{t-1} is -inf there; an inf,
        eps = args[1].clone()  # not a NaN, which opcheck's comparisons would call a mismatch)
        eps[1, 0, 0, 0] = float("inf")
        torch.library.opcheck(torch.ops.ddpm_fast.reverse_step.default,
                              (args[0], eps) + args[2:8] + (False, True, torch.tensor(-1)))
    if op in ("q_sample_philox", "reverse_step"):  # channels_last strides predicted by the fake impl
        cl = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                   else a for a in args)
        torch.library.opcheck(getattr(torch.ops.ddpm_fast, op).default, cl)


def test_torch_compile_fullgraph_equals_eager(diffusion):
    """One training step's ops and one sampling step, compiled whole, on the C++ ops."""
    q = diffusion.tables_on(torch.device("cpu"), torch.float32)["q_sample"]
    table = diffusion.step_table("cpu")

    def both(x0, eps_pred, t, index):
        x_t, eps = ds.q_sample_philox(x0, t, q, index, index, seed=3, backend="cpp")
        loss = ds.simple_loss(eps_pred, eps, backend="cpp")
        x_prev, x0_hat = ds.reverse_step(x_t, eps_pred, t, table, index, t, seed=3, write_x0=True, backend="cpp")
        return loss, x_prev, x0_hat

    x0, eps_pred = data((3, 2, 4, 4), torch.float32, 80), data((3, 2, 4, 4), torch.float32, 81)
    t, index = torch.tensor([0, 5, 999]), torch.arange(3)
    compiled = torch.compile(both, fullgraph=True, backend="inductor")
    for eager, fused in zip(both(x0, eps_pred, t, index), compiled(x0, eps_pred, t, index)):
        assert torch.equal(eager, fused)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_reason(diffusion):
    x, t = data((2, 3, 4, 4), torch.float32, 90), torch.tensor([1, 2])
    q = diffusion.tables_on(torch.device("cpu"), torch.float32)["q_sample"]
    table = diffusion.step_table("cpu")
    index = torch.arange(2)
    with pytest.raises(ValueError, match="x0 must be a"):
        ds.q_sample(x.long(), t, q, x)
    with pytest.raises(ValueError, match="noise must have the shape"):
        ds.q_sample(x, t, q, x[:1])
    with pytest.raises(ValueError, match="noise must have x0's dtype"):
        ds.q_sample(x, t, q, x.double())
    with pytest.raises(ValueError, match=r"coef must be a torch.float32 table of shape \(T, 2\)"):
        ds.q_sample(x, t, table, x)
    with pytest.raises(ValueError, match=r"t must be an int64 tensor of shape \(2,\)"):
        ds.q_sample_philox(x, t.int(), q, index, index, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ds.q_sample_philox(x, t, q, index, index, seed=-1)
    with pytest.raises(ValueError, match="x_t must be a"):
        ds.reverse_step(x.bfloat16(), x, t, table, index, index, seed=0)
    with pytest.raises(ValueError, match=r"coef must be a torch.float32 table of shape \(T, 5\)"):
        ds.reverse_step(x, x, t, table.double(), index, index, seed=0)
    with pytest.raises(ValueError, match="samples must have at least one element"):
        ds.simple_loss(x[:, :0], x[:, :0])
    # a t past the table: the C++ CPU op names it; the Python layer does not sync to check, and the GPU kernels
    # (Triton, CUDA) write NaN for that sample, which the sampler's NaN flag reports
    with pytest.raises(RuntimeError, match=r"t\[1\] = 1000 is outside \[0, 1000\)"):
        ds.reverse_step(x, x, torch.tensor([0, 1000]), table, index, index, seed=0, backend="cpp")
    out, _ = ds.reverse_step(x, x, torch.tensor([0, 1000]), table, index, index, seed=0, backend="triton")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    x_t, _ = ds.q_sample_philox(x, torch.tensor([-1, 3]), q, index, index, seed=0, backend="triton")
    assert torch.isnan(x_t[0]).all() and torch.isfinite(x_t[1]).all()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ds.simple_loss(x, x, backend="nope")
    with pytest.raises(BackendUnavailable, match="no 'cuda'|cannot run"):
        ds.simple_loss(x.to("meta"), x.to("meta"), backend="cpp")
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.step_table("cpu", torch.float32, "euler")
    with pytest.raises(ValueError, match="eta must be a number in"):
        diffusion.step_table("cpu", torch.float32, "ddim", 2.0)


def test_empty_batches_give_empty_outputs(diffusion):
    table = diffusion.step_table("cpu")
    empty, t = torch.empty(0, 3, 4, 4), torch.empty(0, dtype=torch.int64)
    for backend in ["reference"] + FUSED:
        out, _ = ds.reverse_step(empty, empty, t, table, t, t, seed=0, backend=backend)
        assert out.shape == (0, 3, 4, 4)
        assert ds.simple_loss(empty, empty, backend=backend).shape == (0,)


# ---------------------------------------------------------------------------------------------------- int64 indexing
def test_index_arithmetic_is_int64_in_cpp(tmp_path):
    """element_offset of csrc/include (the CPU and CUDA kernels' index math) past 2^31 and 2^32, against Python ints:
    such buffers do not fit here, so the arithmetic is tested on its own."""
    source = tmp_path / "offsets.cpp"
    source.write_text("""
#include <cstdio>
#include "ddpm_fast/diffusion_step.h"
int main() {
  using ddpm_fast::SampleLayout;
  const SampleLayout contiguous{3LL * 4096 * 4096, 3LL * 4096 * 4096, 3LL * 4096 * 4096, 0, 1};
  const SampleLayout channels_last{3LL * 4096 * 4096, 4096LL * 4096, 3LL * 4096 * 4096, 1, 3};
  std::printf("%lld %lld %lld\\n", (long long)ddpm_fast::element_offset(contiguous, 300, 5),
              (long long)ddpm_fast::element_offset(channels_last, 300, 2LL * 4096 * 4096 + 77),
              (long long)ddpm_fast::element_offset(channels_last, 0, 3LL * 4096 * 4096 - 1));
}
""")
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed for the index-arithmetic test"
    done = subprocess.run([compiler, "-std=c++17", "-I", str(REPO / "csrc" / "include"), str(source), "-o",
                           str(tmp_path / "offsets")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = [int(v) for v in subprocess.run([str(tmp_path / "offsets")], capture_output=True,
                                              text=True).stdout.split()]
    numel, spatial = 3 * 4096 * 4096, 4096 * 4096
    assert printed == [300 * numel + 5, 300 * numel + 2 + 77 * 3, (spatial - 1) * 3 + 2]
    assert printed[0] > 2**32


def test_index_arithmetic_is_int64_in_triton():
    """The Triton kernels' offset helper with sample and element indices past 2^31, in the interpreter."""

    @triton.jit
    def probe(out_ptr, b, e, spatial, stride_b, stride_c, stride_s, CONTIGUOUS: tl.constexpr):
        tl.store(out_ptr, element_offset(b.to(tl.int64), e.to(tl.int64), spatial, stride_b, stride_c, stride_s,
                                          CONTIGUOUS))

    numel, spatial = 3 * 4096 * 4096, 4096 * 4096
    for contiguous, args, expected in [
        (True, (300, 5, numel, numel, 0, 1), 300 * numel + 5),
        (False, (300, 2 * spatial + 77, spatial, numel, 1, 3), 300 * numel + 2 + 77 * 3),
    ]:
        out = torch.zeros(1, dtype=torch.int64)
        probe[(1,)](out, *args, CONTIGUOUS=contiguous)
        assert int(out) == expected and expected > 2**32


# ---------------------------------------------------------------------------------------------------- wiring
def test_diffusion_methods_run_on_the_fused_ops(diffusion):
    """q_sample and training_loss equal the paper's formulas written out, with the Philox eps of stream 2."""
    x0 = data((3, 1, 4, 4), torch.float32, 100).clamp(-1, 1)
    t = torch.tensor([0, 500, 999])
    index = torch.tensor([4, 5, 6])
    eps = philox.randn(index, torch.full((3,), 11), (1, 4, 4), seed=2, stream=philox.STREAM_TRAIN_EPS)
    abar = diffusion.tables["alphas_cumprod"][t].view(-1, 1, 1, 1).float()
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    x_t = diffusion.q_sample(x0, t, seed=2, step=11, sample_index=index)
    assert relative_error(x_t, expected) < 1e-5

    def model(x, tt):
        return 0.5 * x

    loss = diffusion.training_loss(model, x0, t, seed=2, step=11, sample_index=index, reduction="none")
    assert relative_error(loss, ((eps - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))) < 1e-5
    # a bfloat16 prediction against the float32 eps is read as it is
    loss_bf16 = diffusion.training_loss(lambda x, tt: model(x, tt).bfloat16(), x0, t, seed=2, step=11,
                                        sample_index=index, reduction="none")
    assert relative_error(loss_bf16, loss) < 1e-2


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_sampler_gives_the_same_images_on_every_backend_and_as_the_eager_step(backend):
    """sample() runs on the fused step and gives the images of the eager Algorithm 2 (p_mean_variance + sigma z
    with z = philox.randn), on every backend, float32."""
    d = Diffusion(timesteps=8)

    def model(x, t):
        return torch.tanh(x) * (t.float().view(-1, 1, 1, 1) / 8.0 + 0.5)

    with ddpm_fast.ops.use_backend(backend):
        images = ddpm_fast.sample(model, 3, diffusion=d, shape=(2, 4, 4), seed=6, progress=False)
    index = torch.arange(3)
    x = philox.randn(index, torch.full((3,), 8), (2, 4, 4), seed=6, stream=philox.STREAM_X_T)
    for i in reversed(range(8)):
        t = torch.full((3,), i)
        z = philox.randn(index, t, (2, 4, 4), seed=6, stream=philox.STREAM_REVERSE)
        x = d.p_sample(model, x, t, noise=z).sample
    assert relative_error(images, x.clamp(-1, 1)) < 1e-5


def test_ddim_sampler(diffusion):
    """sampler="ddim": eta = 0 is deterministic (the seed only picks x_T), respaced steps, clipped output."""
    def model(x, t):
        return 0.3 * x

    a = ddpm_fast.sample(model, 2, shape=(1, 4, 4), sampler="ddim", steps=10, seed=1, progress=False)
    b = ddpm_fast.sample(model, 2, shape=(1, 4, 4), sampler="ddim", steps=10, seed=1, progress=False, batch_size=1)
    assert torch.allclose(a, b, atol=1e-6)
    d = diffusion.respace(10)
    x = philox.randn(torch.arange(2), torch.full((2,), T), (1, 4, 4), seed=1, stream=philox.STREAM_X_T)
    table = d.step_table("cpu", torch.float32, "ddim", 0.0)
    for i in reversed(range(10)):
        t = torch.full((2,), i)
        x, _ = ds.reverse_step(x, model(x, t), t, table, torch.arange(2), d.timestep_map[t], seed=1,
                               backend="reference")
    assert relative_error(a, x.clamp(-1, 1)) < 1e-5
    noisy = ddpm_fast.sample(model, 2, shape=(1, 4, 4), sampler="ddim", steps=10, eta=1.0, seed=1, progress=False)
    assert not torch.allclose(noisy, a)


# ---------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 9), (64, 3, 32, 32)], ids=str)
def test_every_op_on_cuda_equals_the_cpu_reference(backend, dtype, shape, diffusion, poisoned):
    """CUDA (cpp) and Triton kernels on CUDA tensors against the float64 reference computed on the CPU; the GPU's
    log/sin/cos/sqrt put the noise ~1 ulp off, hence 1e-5 on the noise."""
    cuda = torch.device("cuda")
    x = data(shape, dtype, 200)
    eps_in = data(shape, dtype, 201)
    t = mixed_t(shape[0], torch.Generator().manual_seed(202))
    index, counter2 = keys(shape[0])
    q64 = diffusion.tables_on(torch.device("cpu"), torch.float64)["q_sample"]
    q = diffusion.tables_on(cuda, torch.float32)["q_sample"]
    on = {name: v.to(cuda) for name, v in dict(x=x, eps=eps_in, t=t, index=index, counter2=counter2).items()}
    stream = philox.randn(index, counter2, shape[1:], seed=11, stream=philox.STREAM_TRAIN_EPS, backend="reference")
    for layout, xx in layouts(on["x"]):
        x_t, eps = ds.q_sample_philox(xx, on["t"], q, on["index"], on["counter2"], seed=11, backend=backend)
        assert (eps.cpu().double() - stream.double()).abs().max() < 1e-5, layout
        assert relative_error(x_t.cpu(), ds.q_sample_reference(x.double(), t, q64, stream.double())) < 1e-5, layout
        out = ds.q_sample(xx, on["t"], q, on["eps"], backend=backend)
        assert relative_error(out.cpu(), ds.q_sample_reference(x.double(), t, q64, eps_in.double())) < 1e-5, layout
        pred = xx.detach().clone().requires_grad_()
        loss = ds.simple_loss(pred, on["eps"], backend=backend)
        assert relative_error(loss.cpu(), ds.simple_loss_reference(x.double(), eps_in.double())) < 1e-5, layout
        loss.sum().backward()
        expected_grad = 2.0 * (x.double() - eps_in.double()) / x[0].numel()
        assert relative_error(pred.grad.cpu(), expected_grad) < (1e-5 if dtype == torch.float32 else 1e-2), layout
        table64 = diffusion.step_table("cpu", torch.float64)
        state = xx.float()
        x_prev, x0_hat = ds.reverse_step(state, on["eps"], on["t"], diffusion.step_table(cuda), on["index"],
                                         on["counter2"], seed=11, write_x0=True, backend=backend)
        ref, ref_x0 = ds.reverse_step_reference(x.double(), eps_in.double(), t, table64, index, counter2, 11,
                                                philox.STREAM_REVERSE, True, True)
        assert relative_error(x_prev.cpu(), ref) < 1e-5 and relative_error(x0_hat.cpu(), ref_x0) < 1e-5, layout


@pytest.mark.gpu
def test_opcheck_and_compile_on_cuda(diffusion):
    """opcheck of the CUDA (cpp) ops and the Triton ops on CUDA tensors, and torch.compile(fullgraph=True) of the
    Triton ops equal to eager (on CPU tensors the interpreter cannot run under compile)."""
    cuda = torch.device("cuda")
    samples = {name: tuple(a.to(cuda) if isinstance(a, torch.Tensor) else a for a in args)
               for name, args in cpp_op_samples(diffusion).items()}
    ds.triton_ops()
    flagged = samples["reverse_step"] + (torch.tensor(-1, device=cuda),)
    for name, args in list(samples.items()) + [("reverse_step", flagged)]:
        torch.library.opcheck(getattr(torch.ops.ddpm_fast, name).default, args)
        torch.library.opcheck(getattr(torch.ops.ddpm_fast, name + "_triton").default, args)
    q = diffusion.tables_on(cuda, torch.float32)["q_sample"]
    table = diffusion.step_table(cuda)

    def both(x0, eps_pred, t, index):
        x_t, eps = ds.q_sample_philox(x0, t, q, index, index, seed=3, backend="triton")
        loss = ds.simple_loss(eps_pred, eps, backend="triton")
        x_prev, _ = ds.reverse_step(x_t, eps_pred, t, table, index, t, seed=3, backend="triton")
        return loss, x_prev

    x0, eps_pred = data((3, 2, 4, 4), torch.float32, 210).to(cuda), data((3, 2, 4, 4), torch.float32, 211).to(cuda)
    t, index = torch.tensor([0, 5, 999], device=cuda), torch.arange(3, device=cuda)
    for eager, fused in zip(both(x0, eps_pred, t, index), torch.compile(both, fullgraph=True)(x0, eps_pred, t, index)):
        assert torch.allclose(eager, fused, atol=1e-6)
