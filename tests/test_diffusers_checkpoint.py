"""UNet.from_diffusers: diffusers' UNet2DModel (and its scheduler) into our network. diffusers is a test-only
dependency; every model here is built locally (no network) with EVERY parameter random (a fresh GroupNorm's weight 1
and bias 0 would hide swapped norms), and our loaded model (fused ops on) is compared with diffusers' own forward.
The scheduler's translation is checked against diffusers' DDPMScheduler step by step; then the refusals."""
import json

import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, UNet
from ddpm_fast.conversions import unet_kwargs_from_diffusers
from ddpm_fast.ops import use_backend
from helpers import relative_error

diffusers = pytest.importorskip("diffusers")

# The DDPM family's configs as published (google/ddpm-cifar10-32; ddpm-church-256, -bedroom-256, -cat-256 and
# -celebahq-256 share the second), keys absent there left to diffusers' defaults as they are on the hub.
CIFAR10 = dict(act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
               center_input_sample=False, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                            "DownBlock2D"],
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
               mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, out_channels=3, sample_size=32,
               time_embedding_type="positional",
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
CHURCH = {**CIFAR10, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
          "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
          "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
# the cifar10 layout at a test's size
SMALL = {**CIFAR10, "block_out_channels": [32, 64, 64], "sample_size": 8, "layers_per_block": 1,
         "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
         "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
SCHEDULER = dict(_class_name="DDPMScheduler", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
                 clip_sample=True, num_train_timesteps=1000, trained_betas=None, variance_type="fixed_small")


def randomized(config: dict, seed: int = 0):
    """A UNet2DModel with every parameter drawn: norm weights around 1, other weights ~ N(0, 1/fan_in), biases
    ~ N(0, 0.2^2) (so the activations stay of order one through the depth)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * z if "norm" in name and name.endswith("weight") else 0.2 * z)
            else:
                p.copy_(z / p[0].numel() ** 0.5)
    return model


def forward_both(theirs, ours, size, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, theirs.config.in_channels, size, size, generator=gen)
    t = torch.tensor([0, 999, 417, 1][:batch])
    with torch.inference_mode():
        return theirs(x, t).sample, ours(x, t)


def test_small_layout_equals_diffusers():
    theirs = randomized(SMALL)
    ours = UNet.from_diffusers(theirs).eval()
    assert ours.config["attn_resolutions"] == (4,) and ours.ch_mult == (1, 2, 2) and ours.config["eps"] == 1e-6
    with use_backend("cpp"):  # every op of ours on its C++ kernels (the convolutions': torch's oneDNN)
        expected, got = forward_both(theirs, ours, 8, batch=3)
    assert relative_error(got, expected) < 1e-4
    assert torch.equal(ours.state_dict()["up.2.block.1.norm1.weight"],  # up blocks come lowest resolution first
                       theirs.state_dict()["up_blocks.0.resnets.1.norm1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("config, size", [(CIFAR10, 32), (CHURCH, 64)], ids=["cifar10-32", "church-256"])
def test_published_layouts_equal_diffusers(config, size):
    """The full published widths; the 256x256 layout at 64x64 inputs (the network is convolutional: its attention
    level is the same, at a quarter of the pixels)."""
    theirs = randomized(config)
    ours = UNet.from_diffusers(theirs).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    expected, got = forward_both(theirs, ours, size)
    assert relative_error(got, expected) < 1e-4


def test_a_saved_folder_with_its_scheduler_loads_and_samples(tmp_path):
    theirs = randomized(SMALL, seed=3)
    theirs.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "clip_sample": False}))
    ours = UNet.from_diffusers(tmp_path).eval()
    assert ours.diffusion.variance == "fixed_small" and ours.diffusion.clip_denoised is False
    assert ours.diffusion.num_timesteps == 1000 and ours.diffusion.schedule == "linear"
    expected, got = forward_both(theirs, ours, 8)
    assert relative_error(got, expected) < 1e-4
    images = ddpm_fast.sample(ours, 2, steps=4, progress=False)  # the model's own diffusion, respaced
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert UNet.from_diffusers(tmp_path, diffusion=Diffusion(timesteps=4)).diffusion.num_timesteps == 4  # given


def test_a_saved_pipeline_and_legacy_names(tmp_path):
    """A DDPMPipeline's folder (unet/, scheduler/); then weights saved as diffusers < 0.15 named them (query, key,
    value, proj_attn) in a .bin, with the attention's projections as 1x1-conv weights."""
    theirs = randomized(SMALL, seed=4)
    pipeline = diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler(variance_type="fixed_large"))
    pipeline.save_pretrained(tmp_path / "pipeline")
    ours = UNet.from_diffusers(tmp_path / "pipeline")
    assert ours.diffusion.variance == "fixed_large"
    assert relative_error(*forward_both(theirs, ours.eval(), 8)[::-1]) < 1e-4
    assert UNet.from_diffusers(pipeline).diffusion.variance == "fixed_large"  # the instance, with its scheduler

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **SMALL}))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in theirs.state_dict().items():
        for new, former in old.items():
            if f".{new}." in name:
                name, tensor = name.replace(f".{new}.", f".{former}."), (tensor[:, :, None, None]
                                                                        if tensor.dim() == 2 else tensor)
        state[name] = tensor
    torch.save(state, legacy / "diffusion_pytorch_model.bin")
    ours = UNet.from_diffusers(legacy).eval()
    assert ours.diffusion is None  # no scheduler config: sample() uses Diffusion()
    assert relative_error(*forward_both(theirs, ours, 8)[::-1]) < 1e-4


@pytest.mark.parametrize("settings", [
    {}, {"variance_type": "fixed_large"}, {"clip_sample": False}, {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "sigmoid"}, {"variance_type": "fixed_small_log", "num_train_timesteps": 50},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_one_reverse_step_equals_the_ddpm_scheduler(settings):
    """Our p_sample under the scheduler's settings against DDPMScheduler.step, the same model output and noise,
    both in float64 (in float32, diffusers' 1 - abar_t from a float32 abar_t loses 3e-5 at small t; our tables are
    float64 before they are cast)."""
    scheduler = diffusers.DDPMScheduler(**settings)
    diffusion = UNet.from_diffusers(randomized(SMALL), scheduler=scheduler).diffusion
    assert torch.allclose(diffusion.tables["betas"].float(), scheduler.betas, rtol=1e-6, atol=0)
    scheduler.betas = scheduler.betas.double()  # its own float32 betas, its arithmetic in float64 from here
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t = 1.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = lambda x, t: eps  # noqa: E731
    for step in (0, 1, scheduler.config.num_train_timesteps // 2, scheduler.config.num_train_timesteps - 1):
        expected = scheduler.step(eps, step, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        got = diffusion.p_sample(model, x_t, step, noise=noise).sample
        assert got.dtype == torch.float64 and relative_error(got, expected) < 1e-6, step


def test_refusals_name_what_is_wrong(tmp_path):
    theirs = randomized(SMALL)
    config = dict(theirs.config)

    def refused(match, **changes):
        with pytest.raises(ValueError, match=match):
            unet_kwargs_from_diffusers({**config, **changes})

    refused(r"keys this loader does not know: \['cross_attention_dim'\]", cross_attention_dim=768)
    refused(r"flip_sin_to_cos=True \(ours: False: the embedding is \[sin, cos\]\)", flip_sin_to_cos=True)
    refused(r"downsample_padding=1", downsample_padding=1)
    refused(r"attention_head_dim=8 gives several heads at widths \[64\]", attention_head_dim=8)
    refused(r"attention at down levels \[1\] but not at the same up levels",
            up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
    refused(r"block types \['CrossAttnDownBlock2D'\]",
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])
    refused(r"num_class_embeds=10", num_class_embeds=10)
    refused(r"block_out_channels \[32, 48, 64\] are not multiples", block_out_channels=[32, 48, 64])

    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    folder = tmp_path / "model"
    theirs.save_pretrained(folder)
    del state["mid_block.attentions.0.to_k.bias"]
    state["down_blocks.0.resnets.0.extra.weight"] = torch.ones(1)
    state["conv_norm_out.weight"] = torch.ones(7)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): mid_block.attentions.0.to_k.bias \| "
                                         r"1 unexpected tensor\(s\): down_blocks.0.resnets.0.extra.weight \| "
                                         r"1 shape mismatch\(es\): conv_norm_out.weight is \(7,\), the model's \(32,\)"):
        UNet.from_diffusers(folder)

    with pytest.raises(FileNotFoundError, match="no diffusers model folder at"):
        UNet.from_diffusers(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        UNet.from_diffusers(tmp_path / "empty")
    (folder / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or .bin in"):
        UNet.from_diffusers(folder)
    theirs.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="is not a checkpoint safetensors can read"):
        UNet.from_diffusers(folder)
    with pytest.raises(ValueError, match="expected a diffusers UNet2DModel"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="give scheduler= or diffusion=, not both"):
        UNet.from_diffusers(theirs, scheduler=SCHEDULER, diffusion=Diffusion())

    for match, settings in [(r"prediction_type='v_prediction'", dict(prediction_type="v_prediction")),
                            (r"thresholding=True", dict(thresholding=True)),
                            (r"variance_type='learned_range'", dict(variance_type="learned_range")),
                            (r"clip_sample_range=2.0", dict(clip_sample_range=2.0)),
                            (r"rescale_betas_zero_snr=True", dict(rescale_betas_zero_snr=True)),
                            (r"beta_schedule='exp'", dict(beta_schedule="exp")),
                            (r"keys this loader does not know: \['karras'\]", dict(karras=True))]:
        with pytest.raises(ValueError, match=match):
            UNet.from_diffusers(theirs, scheduler={**SCHEDULER, **settings})
