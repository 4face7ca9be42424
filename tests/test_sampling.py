"""ddpm_fast.sample: Algorithm 2 of the paper, seeded per image, batch-split invariant, with clear errors; progressive
generation (return_intermediates); the batch size by free memory."""
import copy
import gc
import time

import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, UNet, precision, sampling
from ddpm_fast.ops import philox
from test_unet import randomize_

T = 12


@pytest.fixture(scope="module")
def model():
    net = UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.1, num_groups=4, diffusion=Diffusion(timesteps=T))
    return randomize_(net, seed=3)


def run(model, n, **kwargs):
    """sample() with the network in float32 unless a test asks otherwise: these tests compare the algorithm with
    float32 references (the CPU default is bf16 where the CPU has native bf16: test_the_cpu_default_is_bf16...)."""
    return ddpm_fast.sample(model, n, progress=False, **{"network_dtype": torch.float32, **kwargs})


def test_matches_algorithm_2_written_out(model):
    """x_T ~ N(0, I) from stream 0; x_{t-1} = p_sample(x_t) with z from stream 1; the result is x_0."""
    images = run(model, 3, seed=11)
    d = model.diffusion
    index = torch.arange(3)
    with torch.no_grad():
        x = philox.randn(index, torch.full((3,), T), (1, 8, 8), seed=11, stream=philox.STREAM_X_T)
        for t in reversed(range(T)):
            x = d.p_sample(model.eval(), x, t, seed=11, sample_index=index).sample
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert torch.allclose(images, x.clamp(-1, 1), atol=1e-6)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.05


def test_same_seed_same_images_whatever_the_batch_split(model):
    whole = run(model, 7, seed=4)
    assert torch.equal(whole, run(model, 7, seed=4))
    for batch_size in [1, 3, 4]:
        assert torch.allclose(run(model, 7, seed=4, batch_size=batch_size), whole, atol=1e-5, rtol=0)
    assert not torch.allclose(run(model, 7, seed=5), whole)
    assert torch.allclose(run(model, 3, seed=4), whole[:3], atol=1e-5)  # image i depends on (seed, i) only


def test_diffusion_settings_come_from_the_argument_then_the_model(model):
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return model(x, t)

    run(counting, 1, shape=(1, 8, 8))  # a plain callable: the default Diffusion, T = 1000
    assert len(calls) == 1000
    calls.clear()
    run(counting, 1, shape=(1, 8, 8), diffusion=Diffusion(timesteps=5))
    assert calls == [4, 3, 2, 1, 0]
    calls.clear()
    run(counting, 1, shape=(1, 8, 8), diffusion=Diffusion(timesteps=100), steps=4)
    assert calls == [99, 66, 33, 0]  # respaced: the model sees the kept original timesteps
    small = run(model, 2, seed=1, variance="fixed_small")
    assert not torch.allclose(small, run(model, 2, seed=1))
    assert torch.allclose(small, run(model, 2, seed=1, diffusion=Diffusion(timesteps=T, variance="fixed_small")))
    # clipping: the argument, else the process's own setting
    free = Diffusion(timesteps=T, clip_denoised=False)
    unclipped = run(model, 2, seed=1, diffusion=free)
    assert torch.equal(unclipped, run(model, 2, seed=1, clip_denoised=False))
    assert not torch.allclose(unclipped, run(model, 2, seed=1))
    assert torch.equal(run(model, 2, seed=1, diffusion=free, clip_denoised=True), run(model, 2, seed=1))


def test_model_mode_is_restored(model):
    model.train()
    run(model, 1)
    assert model.training
    model.eval()


def test_nan_is_reported_with_its_step(model):
    def broken(x, t):
        eps = model(x, t)
        return torch.where(t[:, None, None, None] == 5, torch.full_like(eps, float("nan")), eps)

    with pytest.raises(FloatingPointError, match=r"step from t=5 \(code index; paper t=6\)"):
        run(broken, 2, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T))

    def broken_second(x, t):  # only the images from index 2 on (the second batch of two) go bad, from t = 7
        eps = model(x, t)
        bad = (x.shape[0] == 1) & (t[:, None, None, None] <= 7)
        return torch.where(bad, torch.full_like(eps, float("nan")), eps)

    with pytest.raises(FloatingPointError, match=r"from t=7 \(code index; paper t=8\) for images 2\.\.2"):
        run(broken_second, 3, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T), batch_size=2)

    # respaced: the reverse step flags its step of the respaced process; the message gives the original t
    def broken_late(x, t):  # the model sees original timesteps
        eps = model(x, t)
        return torch.where(t[:, None, None, None] <= 6, torch.full_like(eps, float("nan")), eps)

    kept = Diffusion(timesteps=T).respace(4).timestep_map.tolist()
    first = max(m for m in kept if m <= 6)
    assert first not in (6, kept.index(first))  # (neither the threshold nor its code index: the map is tested)
    with pytest.raises(FloatingPointError, match=rf"from t={first} \(code index; paper t={first + 1}\)"):
        run(broken_late, 2, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T), steps=4)


def test_bad_input_names_the_argument(model):
    for n in [0, -3, 2.5, True, "4"]:
        with pytest.raises(ValueError, match="n must be a positive int"):
            run(model, n)
    with pytest.raises(ValueError, match="batch_size"):
        run(model, 2, batch_size=0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        run(model, 2, sampler="euler")
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        run(model, 2, variance="learned")
    with pytest.raises(ValueError, match="steps"):
        run(model, 2, steps=T + 1)
    with pytest.raises(ValueError, match="seed"):
        run(model, 2, seed=-1)
    with pytest.raises(ValueError, match="model must return eps with the shape of x_t"):
        run(lambda x, t: x[:, :, :4], 2, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="cannot tell the image shape"):
        run(lambda x, t: x, 2)
    with pytest.raises(ValueError, match="shape must be"):
        run(lambda x, t: x, 2, shape=(1, 0, 8))
    with pytest.raises(ValueError, match="device 'meta' is not available here"):
        run(model, 2, device="meta")
    with pytest.raises(ValueError, match="the model is on meta but device=cpu"):
        run(copy.deepcopy(model).to("meta"), 2, device="cpu")
    with pytest.raises(ValueError, match="model must be callable"):
        run(None, 2, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="diffusion must be"):
        run(model, 2, diffusion="linear")
    with pytest.raises(ValueError, match="eta must be a number in"):
        run(model, 2, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        run(model, 2, eta=0.5)
    for every in [-1, 1.5, True]:
        with pytest.raises(ValueError, match="return_intermediates must be an int >= 0"):
            run(model, 2, return_intermediates=every)


# ---------------------------------------------------------------------------------------------------- progressive
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 5)])
def test_progressive_generation_records_x_t_and_x0_hat(model, sampler, steps):
    """return_intermediates=k: every k-th step from t = T and the last; the images those of a plain run; x_t the
    state entering the step and x0_hat the model's prediction there, as Diffusion computes them."""
    images = run(model, 3, seed=2, sampler=sampler, steps=steps, batch_size=2)
    result = run(model, 3, seed=2, sampler=sampler, steps=steps, batch_size=2, return_intermediates=5)
    d = model.diffusion if steps is None else model.diffusion.respace(steps)
    count = d.num_timesteps
    positions = sorted(set(range(0, count, 5)) | {count - 1})
    assert isinstance(result, ddpm_fast.SampleResult) and torch.equal(result.images, images)
    assert result.timesteps == tuple(int(d.timestep_map[count - 1 - j]) + 1 for j in positions)
    assert result.timesteps[0] == T and result.timesteps[-1] == 1
    assert result.x_t.shape == result.x0_hat.shape == (len(positions), 3, 1, 8, 8)
    index = torch.arange(3)
    x_T = philox.randn(index, torch.full((3,), T), (1, 8, 8), seed=2, stream=philox.STREAM_X_T)
    assert torch.equal(result.x_t[0], x_T)
    with torch.no_grad():
        for k, j in enumerate(positions):
            t = torch.full((3,), count - 1 - j)
            eps = model.eval()(result.x_t[k], d.timestep_map[t])
            want = d.predict_x0_from_eps(result.x_t[k], t, eps).clamp(-1, 1)
            assert torch.allclose(result.x0_hat[k], want, atol=1e-5), k
    if sampler == "ddpm":  # the last step's mean is its x0_hat (no noise at t = 1)
        assert torch.allclose(result.x0_hat[-1], images, atol=1e-6)
    # the prediction approaches the image as t falls
    errors = [float((x0 - images).abs().mean()) for x0 in result.x0_hat]
    assert errors[-1] < errors[0]


def test_progressive_grid_png(model, tmp_path):
    from PIL import Image

    result = run(model, 3, seed=1, return_intermediates=4)
    path = result.save_grid(tmp_path / "progressive.png", max_images=2, scale=1)
    columns = len(result.timesteps) + 1  # the recorded steps, then the final image
    assert Image.open(path).size == (2 + columns * 10, 2 + 2 * 10)  # 8x8 images, 2-pixel padding
    enlarged = result.save_grid(tmp_path / "progressive8.png", max_images=2)  # default: 8x8 -> 64x64
    assert Image.open(enlarged).size == (8 * (2 + columns * 10), 8 * (2 + 2 * 10))
    result.save_grid(tmp_path / "x_t.png", which="x_t")
    with pytest.raises(ValueError, match="which must be"):
        result.save_grid(tmp_path / "bad.png", which="eps")


# ---------------------------------------------------------------------------------------------------- memory
def test_memory_readings_on_the_cpu():
    from ddpm_fast import memory

    def hold_64_mib():
        block = torch.empty(16 * 2**20)  # 64 MiB, written, then held for 20 ms (the poller reads every 0.1 ms)
        block.fill_(1.0)
        time.sleep(0.02)

    # mallinfo2 counts the whole process: a garbage collection of earlier tests' objects inside the window would
    # subtract what it frees (CI once read 64 MiB - 30 KB), so collect first and hold the collector off
    gc.collect()
    gc.disable()
    try:
        peak = memory.peak_bytes(hold_64_mib, torch.device("cpu"))
    finally:
        gc.enable()
    assert 64 * 2**20 - 2**20 <= peak < 80 * 2**20  # 1 MiB of slack for frees by other threads
    assert memory.free_bytes(torch.device("cpu")) > 64 * 2**20
    assert memory.peak_bytes(hold_64_mib, torch.device("meta")) is None


def test_batch_size_defaults_to_what_fits_and_a_batch_too_big_is_refused(monkeypatch):
    """Checked on the CPU with the probe switched on there (it is on for CUDA only) and the free memory set: a model
    that holds 32 MiB per image while it runs fits 4 images in 0.8 x 190 MiB (4.75, so measurement noise of a MiB
    cannot change it)."""
    from ddpm_fast import memory, sampling

    batches = []

    def model(x, t):
        batches.append(x.shape[0])
        block = torch.empty(x.shape[0], 8 * 2**20)  # 32 MiB per image, held for 10 ms
        block.fill_(0.0)
        time.sleep(0.01)
        return torch.zeros_like(x)

    monkeypatch.setattr(sampling, "PROBED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: 190 * 2**20)
    kwargs = dict(shape=(1, 8, 8), diffusion=Diffusion(timesteps=2))
    images = run(model, 10, **kwargs)
    assert batches[:2] == [1, 2]  # the probe
    assert batches[2:] == [4, 4, 4, 4, 2, 2] and images.shape == (10, 1, 8, 8)  # batches of 4, 4, 2; two steps each
    with pytest.raises(ValueError, match=r"batch_size=8 does not fit: 0.19 GiB free on cpu.*batch_size=4 would"):
        run(model, 10, batch_size=8, **kwargs)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 20 * 2**20)
    with pytest.raises(MemoryError, match="not even one image fits"):
        run(model, 10, **kwargs)


# ---------------------------------------------------------------------------------------------------- precision
def test_network_dtype_runs_the_network_under_autocast_and_keeps_the_state_float32(model):
    """network_dtype=torch.bfloat16 (the GPU's default, and a CPU's with native bf16): the network sees autocast
    (its convolutions return bf16), the images stay float32 and close to the float32 run's; None is
    default_network_dtype's choice; a dtype that is not a float is refused."""
    seen = []

    def spying(x, t):
        eps = model(x, t)
        seen.append((x.dtype, eps.dtype))
        return eps

    images = run(spying, 3, seed=6, shape=(1, 8, 8), diffusion=model.diffusion, network_dtype=torch.bfloat16)
    assert images.dtype == torch.float32 and set(seen) == {(torch.float32, torch.bfloat16)}
    assert (images - run(model, 3, seed=6, network_dtype=torch.float32)).abs().max() < 0.05
    default = precision.default_network_dtype("cpu")[0]
    assert torch.equal(run(model, 3, seed=6, network_dtype=default), run(model, 3, seed=6, network_dtype=None))
    with pytest.raises(ValueError, match="network_dtype must be one of"):
        run(model, 2, network_dtype=torch.int8)


@pytest.mark.parametrize("fast", [True, False])
def test_the_cpu_default_is_bf16_where_the_cpu_multiplies_bf16_natively(monkeypatch, fast):
    """AVX512-BF16 or AMX (and oneDNN): bf16; neither: float32; a GPU: bf16. The reason names what decided it
    (`ddpm-fast info` prints it)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    dtype, why = precision.default_network_dtype("cpu")
    assert dtype == (torch.bfloat16 if fast and torch.backends.mkldnn.is_available() else torch.float32)
    assert ("has AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "neither AVX512-BF16 nor AMX") in why
    assert precision.default_network_dtype("cuda")[0] == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- GPU engine
@pytest.fixture(scope="module")
def cuda_model(model):
    import copy
    return copy.deepcopy(model).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 5)])
def test_cuda_graph_replays_equal_the_step_by_step_loop(cuda_model, sampler, steps):
    """float32: the graphed run (a batch of 3 and a tail of 2: two graphs sharing a pool) equals the Python loop, the
    recorded steps too, and the CPU's images within float32 rounding; bf16 (the default) stays close."""
    kwargs = dict(seed=3, sampler=sampler, steps=steps, batch_size=3, network_dtype=torch.float32,
                  return_intermediates=4)
    graphed = run(cuda_model, 5, cuda_graph=True, **kwargs)
    loop = run(cuda_model, 5, cuda_graph=False, **kwargs)
    for got, want in zip((graphed.images, graphed.x_t, graphed.x0_hat), (loop.images, loop.x_t, loop.x0_hat)):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    cpu = run(cuda_model.cpu(), 5, **{**kwargs, "network_dtype": None})
    cuda_model.cuda()
    assert torch.allclose(graphed.images.cpu(), cpu.images, atol=1e-3, rtol=0)
    bf16 = run(cuda_model, 5, seed=3, sampler=sampler, steps=steps, batch_size=3)
    assert bf16.dtype == torch.float32 and (bf16 - graphed.images).abs().max() < 0.1


@pytest.mark.gpu
def test_cuda_graph_keeps_the_nan_flag_and_refuses_an_uncapturable_model(cuda_model):
    def broken(x, t):
        eps = cuda_model(x, t)
        return torch.where(t[:, None, None, None] == 5, torch.full_like(eps, float("nan")), eps)

    with pytest.raises(FloatingPointError, match=r"step from t=5 \(code index; paper t=6\)"):
        run(broken, 2, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T), device="cuda")

    def syncing(x, t):
        return cuda_model(x, t) * float(x.abs().max())  # .item(): a host sync, not allowed in a capture

    with pytest.raises(RuntimeError, match="cuda_graph=False"):
        run(syncing, 2, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T), device="cuda")
    assert run(syncing, 2, shape=(1, 8, 8), diffusion=Diffusion(timesteps=T), device="cuda",
               cuda_graph=False).shape == (2, 1, 8, 8)


def test_a_channels_last_model_gets_a_channels_last_state():
    """model.to(memory_format=torch.channels_last): x_t follows (the first convolution then runs in that layout as
    the rest of the network), the images equal the contiguous run's and come back contiguous."""
    contiguous = randomize_(UNet(in_channels=3, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(4,), num_groups=4, diffusion=Diffusion(timesteps=T)), seed=4).eval()
    net = UNet(**contiguous.config, diffusion=contiguous.diffusion).eval()  # (C = 1 would make both layouts one)
    net.load_state_dict(contiguous.state_dict())
    net = net.to(memory_format=torch.channels_last)
    layouts = []
    forward = net.forward

    def spying(x, t):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return forward(x, t)

    net.forward = spying
    images = run(net, 3, seed=8, batch_size=2)
    assert all(layouts) and len(layouts) == 2 * T
    assert images.is_contiguous() and torch.allclose(images, run(contiguous, 3, seed=8), atol=1e-5, rtol=0)
