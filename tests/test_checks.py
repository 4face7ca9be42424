"""Bad input gets one clear sentence wherever it is given (ddpm_fast/checks.py and the entry points that use it):
devices, limits, typed options, image sizes, network settings, schedules; the CLI prints it as one line."""
import math

import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, UNet, checks, cli
from ddpm_fast.schedule import respaced_timesteps
from helpers import random_tiny_unet

DATA = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    return random_tiny_unet(timesteps=4)


def one_sentence(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("entry", ["sample", "nll", "train", "load"])
def test_a_device_that_does_not_exist_is_named_in_one_sentence(model, entry, tmp_path):
    calls = {
        "sample": lambda device: ddpm_fast.sample(model, 1, device=device, progress=False),
        "nll": lambda device: ddpm_fast.nll(model, DATA, device=device, progress=False),
        "train": lambda device: ddpm_fast.train(random_tiny_unet(timesteps=4), DATA, steps=1, batch_size=2,
                                                device=device, progress=False),
        "load": lambda device: ddpm_fast.load(ddpm_fast.bundled.MODELS["digits"], device=device),
    }
    with pytest.raises(ValueError) as error:
        calls[entry]("foo")
    assert one_sentence(error).startswith("device 'foo' is not a device torch knows")
    if NO_CUDA:
        with pytest.raises(ValueError) as error:
            calls[entry]("cuda")
        assert one_sentence(error).startswith("device 'cuda': CUDA is not available here")


@pytest.mark.skipif(not NO_CUDA, reason="a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "foo"])
def test_the_cli_says_one_line_for_a_device_it_cannot_use(capsys, device):
    assert cli.main(["sample", "-n", "1", "--steps", "1", "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ddpm-fast sample: error: device '{device}'")


def test_a_gpu_index_past_the_last_is_named():
    if NO_CUDA:
        pytest.skip("needs CUDA (the count is the message)")
    with pytest.raises(ValueError, match=rf"has {torch.cuda.device_count()} GPU\(s\)"):
        checks.device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
@pytest.mark.parametrize("entry", [ddpm_fast.nll, ddpm_fast.rate_distortion])
def test_a_bad_limit_is_named_as_such(model, entry, limit):
    with pytest.raises(ValueError, match=rf"^limit must be a positive int, got {limit!r}$"):
        entry(model, DATA, limit=limit, progress=False)


def test_a_batch_larger_than_the_data_is_refused_up_front():
    with pytest.raises(ValueError, match=r"batch_size 10000000 is larger than the data \(4 images\)"):
        ddpm_fast.train(random_tiny_unet(timesteps=4), DATA, steps=1, batch_size=10**7, progress=False)


# ---------------------------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize("setting, message", [
    (dict(lr=math.inf), "lr must be a finite number, got inf"),
    (dict(lr=0.0), r"lr must be in \(0, inf\), got 0.0"),
    (dict(flip="no"), "flip must be True or False, got 'no'"),
    (dict(grad_clip=-1), r"grad_clip must be in \[0, inf\), got -1"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\), got 1.0"),
    (dict(progress="no"), "progress must be True or False, got 'no'"),
])
def test_training_options_check_their_type_and_range(setting, message):
    with pytest.raises(ValueError, match=message):
        ddpm_fast.train(random_tiny_unet(timesteps=4), DATA, steps=1, batch_size=2, **{"progress": False, **setting})


@pytest.mark.parametrize("setting, message", [
    (dict(cuda_graph="no"), "cuda_graph must be True or False, got 'no'"),
    (dict(progress="no"), "progress must be True or False, got 'no'"),
    (dict(out_format="jpg"), "out_format must be one of png, npz, got 'jpg'"),
])
def test_sampling_options_check_their_type(model, setting, message):
    with pytest.raises(ValueError, match=message):
        ddpm_fast.sample(model, 1, **{"progress": False, **setting})


# ---------------------------------------------------------------------------------------------------- image sizes
def test_the_image_size_must_be_the_models(model):
    with pytest.raises(ValueError, match=r"shape: \(1, 16, 16\), but the model takes \(1, 8, 8\)"):
        ddpm_fast.sample(model, 1, shape=(1, 16, 16), progress=False)
    big = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"the data's images: \(1, 16, 16\), but the model takes"):
        ddpm_fast.nll(model, big, progress=False)
    plain = lambda x, t: 0.5 * x  # noqa: E731  (a callable without sizes: any shape)
    assert ddpm_fast.sample(plain, 1, shape=(1, 4, 4), diffusion=Diffusion(timesteps=2), progress=False).shape \
        == (1, 1, 4, 4)


@pytest.mark.parametrize("setting, message", [
    (dict(num_groups=0), "UNet: num_groups must be a positive int, got 0"),
    (dict(image_size="32"), "UNet: image_size must be a positive int, got '32'"),
    (dict(ch_mult=(1, 0)), "UNet: each of ch_mult must be a positive int, got 0"),
    (dict(dropout=1.0), r"UNet: dropout must be in \[0, 1\), got 1.0"),
    (dict(eps=0), r"UNet: eps must be in \(0, inf\), got 0"),
])
def test_unet_settings_check_their_type_first(setting, message):
    config = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0, num_groups=4)
    with pytest.raises(ValueError, match=message):
        UNet(**{**config, **setting})


# ---------------------------------------------------------------------------------------------------- schedules
def test_one_respaced_step_starts_from_x_T():
    """steps=1 keeps T-1 (one step from x_T at its noise level), as the docstring says; k >= 2 keeps 0 and T-1."""
    assert respaced_timesteps(1000, 1).tolist() == [999]
    assert respaced_timesteps(1000, 2).tolist() == [0, 999]
    one = Diffusion().respace(1)
    assert one.num_timesteps == 1 and one.timestep_map.tolist() == [999]
    assert float(one.tables["alphas_cumprod"][0]) == pytest.approx(float(Diffusion().tables["alphas_cumprod"][-1]))


@pytest.mark.parametrize("bad", [1.0, 0.0, float("nan"), 1.5])
def test_betas_outside_0_1_are_refused(bad):
    betas = torch.full((4,), 0.1, dtype=torch.float64)
    betas[2] = bad
    with pytest.raises(ValueError, match=r"betas must be a non-empty 1-D tensor with values in \(0, 1\)"):
        Diffusion(betas=betas)


# ---------------------------------------------------------------------------------------------------- threads
def test_the_cli_threads_option_sets_torchs_threads(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert cli.main(["info", "--threads", "1"]) == 0
    assert seen == [1]
    capsys.readouterr()
