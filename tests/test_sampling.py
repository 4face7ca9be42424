"""ddpm_fast.sample: Algorithm 2 of the paper, seeded per image, batch-split invariant, with clear errors."""
import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, UNet
from ddpm_fast.ops import philox
from test_unet import randomize_

T = 12


@pytest.fixture(scope="module")
def model():
    net = UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.1, num_groups=4, diffusion=Diffusion(timesteps=T))
    return randomize_(net, seed=3)


def run(model, n, **kwargs):
    return ddpm_fast.sample(model, n, progress=False, **kwargs)


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
    with pytest.raises(ValueError, match="the model is on cpu but device=meta"):
        run(model, 2, device="meta")
    with pytest.raises(ValueError, match="model must be callable"):
        run(None, 2, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="diffusion must be"):
        run(model, 2, diffusion="linear")
    with pytest.raises(ValueError, match="eta must be a number in"):
        run(model, 2, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="eta applies to sampler='ddim' only"):
        run(model, 2, eta=0.5)
