"""Other codebases' checkpoints into ddpm_fast.UNet: the original DDPM network as ported to PyTorch
(pytorch_diffusion; its names are ours), and diffusers' UNet2DModel with its scheduler's settings (renamed, and the
schedule rebuilt from the scheduler's config). UNet.from_original and UNet.from_diffusers call these; our own
format is checkpoint.py's.

A configuration the U-Net cannot be, or a missing, unexpected or misshapen tensor, is refused with its name before
anything is loaded (checkpoint.load_checked).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ddpm_fast.checkpoint import load_checked, read_json, read_state_dict
from ddpm_fast.diffusion import Diffusion


# ---------------------------------------------------------------------------------------------- the original

_REQUIRED = object()
# The original Model's keyword arguments and their defaults (pytorch_diffusion/model.py)
ORIGINAL_CONFIG = dict(ch=_REQUIRED, out_ch=_REQUIRED, ch_mult=(1, 2, 4, 8), num_res_blocks=_REQUIRED,
                       attn_resolutions=_REQUIRED, dropout=0.0, resamp_with_conv=True, in_channels=_REQUIRED,
                       resolution=_REQUIRED)


def from_original(cls, state_dict_or_path, config: dict, diffusion):
    """See UNet.from_original. The original's names are ours, so the state dict loads as it is."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of the original Model's arguments, got {type(config).__name__}")
    unknown = sorted(set(config) - set(ORIGINAL_CONFIG))
    missing = sorted(k for k, default in ORIGINAL_CONFIG.items() if default is _REQUIRED and k not in config)
    if unknown or missing:
        raise ValueError("config: " + "; ".join(
            ([f"keys the original Model does not take: {unknown}"] if unknown else [])
            + ([f"missing required keys: {missing}"] if missing else [])) + f" (it takes {list(ORIGINAL_CONFIG)})")
    given = {k: (config[k] if k in config else default) for k, default in ORIGINAL_CONFIG.items()}
    model = cls(in_channels=given["in_channels"], out_channels=given["out_ch"], image_size=given["resolution"],
                ch=given["ch"], ch_mult=given["ch_mult"], num_res_blocks=given["num_res_blocks"],
                attn_resolutions=given["attn_resolutions"], dropout=given["dropout"], num_groups=32, eps=1e-6,
                resamp_with_conv=given["resamp_with_conv"], diffusion=diffusion)
    load_checked(model, read_state_dict(state_dict_or_path))
    return model


# ---------------------------------------------------------------------------------------------- diffusers

# UNet2DModel's arguments and their defaults (as of diffusers 0.42): a key absent from a config.json takes these.
DIFFUSERS_UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)

# The values our network has, and why another is refused (the DDPM family's configs have all of these).
_DIFFUSERS_FIXED = dict(
    center_input_sample=(False, "inputs are not recentred"),
    time_embedding_type=("positional", "the timestep embedding is the sinusoidal one"),
    freq_shift=(1, "the sinusoid's frequencies are exp(-k ln(10000) / (half - 1))"),
    flip_sin_to_cos=(False, "the embedding is [sin, cos]"),
    mid_block_type=("UNetMidBlock2D", "the middle is ResBlock, attention, ResBlock"),
    mid_block_scale_factor=(1, "residuals are not rescaled"),
    downsample_padding=(0, "the stride-2 conv pads the bottom/right only (TF 'SAME')"),
    downsample_type=("conv", "downsampling is a stride-2 conv"),
    upsample_type=("conv", "upsampling is nearest + conv"),
    act_fn=("silu", "the activation is SiLU"),
    resnet_time_scale_shift=("default", "the timestep is added, not a scale-shift"),
    add_attention=(True, "the middle has attention"),
    class_embed_type=(None, "the network is unconditional"),
    num_class_embeds=(None, "the network is unconditional"),
)
_DOWN, _UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def unet_kwargs_from_diffusers(config: Mapping) -> dict:
    """Our UNet's arguments for a UNet2DModel config (a config.json's dict); anything we cannot be is refused with
    the keys and values at fault."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_UNET_DEFAULTS)
    if unknown:
        raise ValueError(f"UNet2DModel config: keys this loader does not know: {unknown}")
    c = {**DIFFUSERS_UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = [f"{key}={c[key]!r} (ours: {value!r}: {why})" for key, (value, why) in _DIFFUSERS_FIXED.items()
                if c[key] != value]
    widths = [int(w) for w in c["block_out_channels"]]
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    levels = len(widths)
    if len(down) != levels or len(up) != levels:
        problems.append(f"{len(down)} down and {len(up)} up block types for {levels} block_out_channels")
    bad = sorted({b for b in down if b not in _DOWN} | {b for b in up if b not in _UP})
    if bad:
        problems.append(f"block types {bad} (ours: {list(_DOWN)} down, {list(_UP)} up)")
    attention_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    if not problems and attention_levels != [levels - 1 - i for i, b in enumerate(up) if b == "AttnUpBlock2D"][::-1]:
        problems.append(f"attention at down levels {attention_levels} but not at the same up levels "
                        f"(up_block_types={up}, lowest resolution first)")
    ch = widths[0]
    if any(w % ch for w in widths):
        problems.append(f"block_out_channels {widths} are not multiples of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']} (ours: 4 x {ch})")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']} differs from norm_num_groups")
    head = c["attention_head_dim"]
    multi_head = sorted({widths[i] for i in attention_levels + [levels - 1]} - ({head} if head else set()))
    if head is not None and multi_head:  # diffusers runs C // head heads of width head
        problems.append(f"attention_head_dim={head} gives several heads at widths {multi_head} (ours: one head)")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    if not isinstance(size, int):
        problems.append(f"sample_size={c['sample_size']!r} (ours: one int, square images)")
    if problems:
        raise ValueError("UNet2DModel config we cannot represent: " + "; ".join(problems))
    return dict(in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), image_size=size, ch=ch,
                ch_mult=tuple(w // ch for w in widths), num_res_blocks=int(c["layers_per_block"]),
                attn_resolutions=tuple(size // 2 ** i for i in attention_levels), dropout=float(c["dropout"]),
                num_groups=int(c["norm_num_groups"]), eps=float(c["norm_eps"]), resamp_with_conv=True)


_RESNET_PARTS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}  # others keep their names
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.15


def diffusers_name(name: str, levels: int) -> str:
    """Our tensor's name in UNet2DModel. Its up blocks run from the lowest resolution (ours: by level)."""
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "mid.block_1": "mid_block.resnets.0", "mid.attn_1": "mid_block.attentions.0",
             "mid.block_2": "mid_block.resnets.1"}
    for ours, theirs in fixed.items():
        if name.startswith(ours + "."):
            name = theirs + name[len(ours):]
    match = re.match(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", name)
    if match:
        side, level, kind, rest = match.groups()
        level = int(level) if side == "down" else levels - 1 - int(level)
        kind = {"block": "resnets", "attn": "attentions", "downsample": "downsamplers.0",
                "upsample": "upsamplers.0"}[kind]
        name = f"{side}_blocks.{level}.{kind}.{rest}"
    module, _, leaf = name.rpartition(".")  # leaf: weight / bias
    path, _, part = module.rpartition(".")
    if ".resnets." in name:
        part = _RESNET_PARTS.get(part, part)
    elif ".attentions." in name:
        part = _ATTENTION_PARTS[part]
    return f"{path}.{part}.{leaf}" if path else f"{part}.{leaf}"


def _modern_attention_names(state: dict) -> dict:
    """Attention tensors saved under diffusers' old names (query, key, value, proj_attn) under the current ones."""
    renamed = {}
    for key, value in state.items():
        match = re.match(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        new = f"{match[1]}.{_LEGACY_ATTENTION[match[2]]}.{match[3]}" if match else key
        if new in renamed:
            raise ValueError(f"the checkpoint has {new} twice (under its old and its new name)")
        renamed[new] = value
    return renamed


# DDPMScheduler's and DDIMScheduler's arguments and their defaults (as of diffusers 0.42). Those that steer their own
# inference loops (timestep_spacing, steps_offset, set_alpha_to_one) are read and not used: sample() is ours.
DIFFUSERS_SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    steps_offset=0, rescale_betas_zero_snr=False, set_alpha_to_one=True)
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large"}


def diffusion_from_scheduler(config: Mapping) -> Diffusion:
    """The Diffusion of a diffusers DDPM/DDIM scheduler config: its betas, variance type and clipping. What our
    process cannot be (another prediction type, thresholding, a clip range other than 1, learned variances,
    zero-terminal-SNR betas) is refused."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_SCHEDULER_DEFAULTS)
    if unknown:
        raise ValueError(f"scheduler config: keys this loader does not know: {unknown}")
    c = {**DIFFUSERS_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = []
    if c["prediction_type"] != "epsilon":
        problems.append(f"prediction_type={c['prediction_type']!r} (ours: the network predicts 'epsilon')")
    if c["thresholding"]:
        problems.append("thresholding=True (ours: clipping to [-1, 1] or nothing)")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        problems.append(f"clip_sample_range={c['clip_sample_range']} (ours: 1)")
    if c["variance_type"] not in _VARIANCES:
        problems.append(f"variance_type={c['variance_type']!r} (ours: {', '.join(_VARIANCES)})")
    if c["rescale_betas_zero_snr"]:
        problems.append("rescale_betas_zero_snr=True (abar_T = 0 has no eps-parameterised x0)")
    steps = c["num_train_timesteps"]
    if not problems:
        betas = _diffusers_betas(c, steps, problems)
    if problems:
        raise ValueError("scheduler config we cannot represent: " + "; ".join(problems))
    if c["trained_betas"] is None and c["beta_schedule"] == "linear" and (c["beta_start"], c["beta_end"]) == (1e-4,
                                                                                                              0.02):
        diffusion = Diffusion("linear", steps, _VARIANCES[c["variance_type"]], clip_denoised=bool(c["clip_sample"]))
    else:
        diffusion = Diffusion(variance=_VARIANCES[c["variance_type"]], betas=betas,
                              clip_denoised=bool(c["clip_sample"]))
    return diffusion


def _diffusers_betas(c: dict, steps: int, problems: list):
    """diffusers' beta schedules, in float64."""
    start, end = float(c["beta_start"]), float(c["beta_end"])
    name = c["beta_schedule"]
    if c["trained_betas"] is not None:
        return torch.tensor(c["trained_betas"], dtype=torch.float64)
    if name == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (end - start) + start
    if name == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, betas capped at 0.999
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                             for i in range(steps)], dtype=torch.float64)
    problems.append(f"beta_schedule={name!r} (ours: linear, scaled_linear, sigmoid, squaredcos_cap_v2, "
                    f"trained_betas)")
    return None


def _diffusers_folder(path: Path) -> tuple[dict, dict, Path | None]:
    """(UNet2DModel config, state dict, scheduler_config.json or None) of a saved model or pipeline folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"no diffusers model folder at {path}")
    unet = path / "unet" if (path / "unet" / "config.json").is_file() else path  # a whole saved pipeline
    if not (unet / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {unet}: a diffusers UNet2DModel folder has one")
    config = read_json(unet / "config.json", "UNet2DModel config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{unet / 'config.json'} describes a {config['_class_name']}, not a UNet2DModel")
    weights = [unet / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        sharded = sorted(p.name for p in unet.glob("diffusion_pytorch_model*.index.json"))
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {unet}"
                                + (f" (sharded weights {sharded} are not read: save the model unsharded)"
                                   if sharded else ""))
    schedulers = [unet / "scheduler_config.json", unet.parent / "scheduler" / "scheduler_config.json"]
    scheduler = next((s for s in schedulers if s.is_file()), None)
    return config, read_state_dict(weights[0]), scheduler


def from_diffusers(cls, path_or_model, scheduler, diffusion):
    """See UNet.from_diffusers."""
    scheduler_config = None
    if isinstance(path_or_model, (str, os.PathLike)):
        config, state, found = _diffusers_folder(Path(path_or_model))
        if scheduler is None and diffusion is None:
            scheduler = found
    else:
        if hasattr(path_or_model, "unet") and hasattr(path_or_model, "scheduler"):  # a pipeline, e.g. DDPMPipeline
            if scheduler is None and diffusion is None:
                scheduler = path_or_model.scheduler
            path_or_model = path_or_model.unet
        if type(path_or_model).__name__ != "UNet2DModel" or not hasattr(path_or_model, "config"):
            raise ValueError(f"expected a diffusers UNet2DModel, a pipeline holding one, or the path of a saved "
                             f"one, got {type(path_or_model).__name__}")
        config, state = dict(path_or_model.config), path_or_model.state_dict()
        state = {k: v.detach().cpu() for k, v in state.items()}
    if scheduler is not None and diffusion is not None:
        raise ValueError("give scheduler= or diffusion=, not both")
    if isinstance(scheduler, (str, os.PathLike)):
        scheduler_config = read_json(Path(scheduler), "scheduler config")
    elif isinstance(scheduler, Mapping):
        scheduler_config = scheduler
    elif scheduler is not None:
        if not isinstance(getattr(scheduler, "config", None), Mapping):
            raise ValueError(f"scheduler must be a diffusers scheduler, its config or a path to one, got "
                             f"{type(scheduler).__name__}")
        scheduler_config = scheduler.config
    if scheduler_config is not None:
        diffusion = diffusion_from_scheduler(scheduler_config)
    model = cls(**unet_kwargs_from_diffusers(config), diffusion=diffusion)
    levels = len(model.ch_mult)
    names = {name: diffusers_name(name, levels) for name in model.state_dict()}
    load_checked(model, _modern_attention_names(state), names)
    return model
