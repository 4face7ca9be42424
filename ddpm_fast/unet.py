"""The paper's U-Net (the original DDPM code's `model`, layer for layer), built from ddpm_fast.ops.

Module names follow the original code as ported to PyTorch (temb.dense.0, down.0.block.1.norm1, mid.attn_1.q,
up.3.upsample.conv, norm_out, conv_out), so checkpoints map one to one. The fused norms and attention and the
convolutions (PackedConv: nn.Conv2d's parameters, packed oneDNN weights in CPU inference) come from ops/, so faster
kernels drop in without touching this file.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast import checks
from ddpm_fast.ops import attention
from ddpm_fast.ops.cache import weights_key
from ddpm_fast.ops.conv import PackedConv
from ddpm_fast.ops.group_norm import group_norm_silu

PRESETS = {
    # the paper's CIFAR-10 network: 35.7M parameters
    "cifar10": dict(in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1, num_groups=32),
    # the bundled default's network (ddpm_fast/bundled.py): 8x8 grey digits, 1.0M parameters (4 MB)
    "digits": dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                   dropout=0.1, num_groups=8),
    # a 1x16x16 network for CPU demos, tests and benchmarks
    "small": dict(in_channels=1, image_size=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(8,), dropout=0.1, num_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The original sinusoidal embedding: frequencies exp(-k ln(10000) / (half - 1)), [sin, cos], float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000.0) / (half - 1)))
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _init_(module: nn.Module, zero: bool = False) -> nn.Module:
    """The original's init: variance scaling (fan_avg, uniform, scale 1) = Xavier uniform; zero for the last
    layer of a residual branch and the output conv (init_scale=0); biases zero."""
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class GroupNorm(nn.Module):
    """GroupNorm(num_groups, eps) with learned affine; forward can add a (B, C) vector first and apply SiLU after."""

    def __init__(self, channels: int, num_groups: int, eps: float):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, act: bool = False, dropout: float = 0.0,
                seed: int = 0, layer: int = 0, sample_index: torch.Tensor | None = None,
                step: int = 0) -> torch.Tensor:
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, add=add, act=act,
                               dropout=dropout, seed=seed, layer=layer, sample_index=sample_index, step=step)


def draw_dropout_seed() -> int:
    """A Philox key for one forward's dropout masks, from torch's default generator (so torch.manual_seed makes a
    training step reproducible; no device sync)."""
    return int(torch.randint(0, 2**62, ()))


class ResnetBlock(nn.Module):
    """h = conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + temb_proj(silu(temb)))))); out = shortcut(x) + h.
    norm2, the add of the time embedding, SiLU and dropout are one fused op; the dropout mask comes from Philox
    stream 4 with this block's `layer` index (set by UNet) and the forward's seed."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, num_groups: int,
                 eps: float):
        super().__init__()
        self.norm1 = GroupNorm(in_channels, num_groups, eps)
        self.conv1 = _init_(PackedConv(in_channels, out_channels, 3, padding=1))
        self.temb_proj = _init_(nn.Linear(temb_channels, out_channels))
        self.norm2 = GroupNorm(out_channels, num_groups, eps)
        self.dropout = dropout
        self.layer = 0
        self.conv2 = _init_(PackedConv(out_channels, out_channels, 3, padding=1), zero=True)
        # the original's `nin` (a 1x1 conv) where the channel count changes
        self.nin_shortcut = _init_(PackedConv(in_channels, out_channels, 1)) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, dropout_keys: tuple | None = None) -> torch.Tensor:
        """:param temb_act: silu(temb), (B, temb_channels), shared by every block.
        :param dropout_keys: the forward's dropout keys (seed, sample_index or None, step) (UNet.forward's); a seed
            is drawn here if None."""
        h = self.conv1(self.norm1(x, act=True))
        dropout = self.dropout if self.training else 0.0
        if dropout and dropout_keys is None:
            dropout_keys = (draw_dropout_seed(), None, 0)
        seed, sample_index, step = dropout_keys or (0, None, 0)
        h = self.norm2(h, add=self.temb_proj(temb_act), act=True, dropout=dropout, seed=seed, layer=self.layer,
                       sample_index=sample_index if dropout else None, step=step)
        return self.conv2(h, residual=x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) with q, k, v 1x1 convs of norm(x); one head of width C. The state dict keeps
    the paper's separate q, k, v, proj_out; the fused op runs on their folded form (ops/attention.py), which is
    kept between calls while no gradient is taken and the weights are unchanged (inference), and folded inside
    autograd on every call otherwise (training)."""

    def __init__(self, channels: int, num_groups: int, eps: float):
        super().__init__()
        self.norm = GroupNorm(channels, num_groups, eps)
        self.q = _init_(nn.Conv2d(channels, channels, 1))
        self.k = _init_(nn.Conv2d(channels, channels, 1))
        self.v = _init_(nn.Conv2d(channels, channels, 1))
        self.proj_out = _init_(nn.Conv2d(channels, channels, 1), zero=True)
        self._packed = None  # (key, (qkv_weight, qkv_bias, proj_weight, proj_bias), FoldedWeights): inference

    def _weights(self):
        c = self.q.weight.shape[0]
        qkv_weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * c, c)
        qkv_bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return qkv_weight, qkv_bias, self.proj_out.weight.view(c, c), self.proj_out.bias

    def _cached(self):
        """The packed and folded weights of the last inference call, rebuilt only when a parameter changed (its
        storage, its version counter, dtype or device)."""
        params = [self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.v.weight, self.v.bias,
                  self.proj_out.weight, self.proj_out.bias]
        key = weights_key(*params)
        if self._packed is None or self._packed[0] != key:
            weights = self._weights()
            self._packed = (key, weights, attention.fold_weights(*weights))
        return self._packed[1], self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            weights, folded = self._cached()
        else:
            weights, folded = self._weights(), None  # folded by the op, inside autograd
        return attention.attention_block(x, self.norm.weight, self.norm.bias, *weights, self.norm.num_groups,
                                         self.norm.eps, folded=folded)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv with TF "SAME" padding (the extra row/column at the bottom/right), or
    2x2 average pooling without the conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _init_(PackedConv(channels, channels, 3, stride=2)) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _init_(PackedConv(channels, channels, 3, padding=1)) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


def _check_config(in_channels, out_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                  num_groups, eps, resamp_with_conv) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """UNet's arguments, types first (num_groups=0 or image_size="32" would fail deep inside), then whether the
    network can be built; every problem of the second kind in one sentence. ch_mult and attn_resolutions as tuples."""
    sizes = dict(in_channels=in_channels, image_size=image_size, ch=ch, num_res_blocks=num_res_blocks,
                 num_groups=num_groups, **({} if out_channels is None else dict(out_channels=out_channels)))
    for name, value in sizes.items():
        checks.positive_int(f"UNet: {name}", value)
    for name, values in (("ch_mult", ch_mult), ("attn_resolutions", attn_resolutions)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"UNet: {name} must be a sequence of positive ints, got {values!r}")
        for value in values:
            checks.positive_int(f"UNet: each of {name}", value)
    checks.number("UNet: eps", eps, low=0, low_open=True)
    checks.number("UNet: dropout", dropout, low=0, high=1, high_open=True)
    checks.flag("UNet: resamp_with_conv", resamp_with_conv)
    ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
    levels = len(ch_mult)
    resolutions = [image_size // 2 ** i for i in range(levels)]
    problems = []
    if not ch_mult:  # (the sizes' signs are checked above)
        problems.append("ch_mult must have at least one level")
    if image_size % 2 ** (levels - 1):
        problems.append(f"image_size {image_size} is not divisible by 2^{levels - 1} for {levels} levels")
    bad_widths = sorted({ch * m for m in ch_mult if (ch * m) % num_groups})
    if ch % num_groups or bad_widths:
        problems.append(f"widths {bad_widths or [ch]} are not divisible by num_groups={num_groups}")
    missing = [r for r in attn_resolutions if r not in resolutions]
    if missing:
        problems.append(f"attention resolutions {missing} are never reached (resolutions: {resolutions})")
    if problems:
        raise ValueError("UNet: " + "; ".join(problems))
    return ch_mult, attn_resolutions


def _down_path(ch, ch_mult, num_res_blocks, attends, resamp_with_conv, block, attn) -> tuple[nn.ModuleList, int]:
    """The levels on the way down (num_res_blocks ResBlocks each, attention after each where the level attends, a
    downsampling but at the last); and the width it ends at."""
    levels = nn.ModuleList()
    block_in = ch
    for level in range(len(ch_mult)):
        down = nn.Module()
        down.block, down.attn = nn.ModuleList(), nn.ModuleList()
        block_out = ch * ch_mult[level]
        for _ in range(num_res_blocks):
            down.block.append(block(block_in, block_out))
            block_in = block_out
            if attends[level]:
                down.attn.append(attn(block_in))
        if level != len(ch_mult) - 1:
            down.downsample = Downsample(block_in, resamp_with_conv)
        levels.append(down)
    return levels, block_in


def _up_path(ch, ch_mult, num_res_blocks, attends, resamp_with_conv, block, attn,
             block_in: int) -> tuple[nn.ModuleList, int]:
    """The levels on the way up, built from the lowest (num_res_blocks + 1 ResBlocks each, taking the skips; an
    upsampling but at the full resolution), stored by level as the original: up[0] is the full resolution."""
    in_ch_mult = (1,) + ch_mult
    ups = []
    for level in reversed(range(len(ch_mult))):
        up = nn.Module()
        up.block, up.attn = nn.ModuleList(), nn.ModuleList()
        block_out = ch * ch_mult[level]
        for i_block in range(num_res_blocks + 1):
            # the skip popped last at this level is the previous level's output (or conv_in's)
            skip = ch * (ch_mult[level] if i_block < num_res_blocks else in_ch_mult[level])
            up.block.append(block(block_in + skip, block_out))
            block_in = block_out
            if attends[level]:
                up.attn.append(attn(block_in))
        if level != 0:
            up.upsample = Upsample(block_in, resamp_with_conv)
        ups.insert(0, up)
    return nn.ModuleList(ups), block_in


class UNet(nn.Module):
    """eps_theta(x_t, t): the DDPM U-Net.

    :param in_channels: image channels. :param out_channels: defaults to in_channels (eps has x's shape).
    :param image_size: the resolution the attention levels refer to (H = W at input).
    :param ch: base width; level i has ch * ch_mult[i] channels; temb has 4 * ch.
    :param num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    :param attn_resolutions: resolutions (of image_size halved per level) that get self-attention.
    :param num_groups, eps: GroupNorm settings (the paper: 32, 1e-6).
    :param diffusion: optional Diffusion this model was trained with; ddpm_fast.sample uses it.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int | None = None, image_size: int = 32,
                 ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_groups: int = 32,
                 eps: float = 1e-6, resamp_with_conv: bool = True, diffusion=None):
        super().__init__()
        ch_mult, attn_resolutions = _check_config(in_channels, out_channels, image_size, ch, ch_mult, num_res_blocks,
                                                  attn_resolutions, dropout, num_groups, eps, resamp_with_conv)
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size, ch=ch,
                           ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                           dropout=dropout, num_groups=num_groups, eps=eps, resamp_with_conv=resamp_with_conv)
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.ch, self.ch_mult, self.num_res_blocks = ch, ch_mult, num_res_blocks
        self.diffusion = diffusion
        temb_ch = 4 * ch
        block = lambda cin, cout: ResnetBlock(cin, cout, temb_ch, dropout, num_groups, eps)  # noqa: E731
        attn = lambda c: AttnBlock(c, num_groups, eps)  # noqa: E731
        attends = [image_size // 2 ** i in attn_resolutions for i in range(len(ch_mult))]  # per level

        # (built in the original's order: the same names, and the same draws of the initialisation)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([_init_(nn.Linear(ch, temb_ch)), _init_(nn.Linear(temb_ch, temb_ch))])
        self.conv_in = _init_(PackedConv(in_channels, ch, 3, padding=1))
        self.down, block_in = _down_path(ch, ch_mult, num_res_blocks, attends, resamp_with_conv, block, attn)
        self.mid = nn.Module()
        self.mid.block_1 = block(block_in, block_in)
        self.mid.attn_1 = attn(block_in)
        self.mid.block_2 = block(block_in, block_in)
        self.up, block_in = _up_path(ch, ch_mult, num_res_blocks, attends, resamp_with_conv, block, attn, block_in)
        self.norm_out = GroupNorm(block_in, num_groups, eps)
        self.conv_out = _init_(PackedConv(block_in, out_channels, 3, padding=1), zero=True)
        for layer, res_block in enumerate(m for m in self.modules() if isinstance(m, ResnetBlock)):
            res_block.layer = layer  # each block's dropout mask is its own Philox stream

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """UNet.from_preset("cifar10" | "small" | "digits", **overrides): the paper's CIFAR-10 network, the small CPU
        one, or the bundled digits model's."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_original(cls, state_dict_or_path, config: dict, *, diffusion=None) -> "UNet":
        """The original DDPM network as ported to PyTorch (pytorch_diffusion's `Model`: temb.dense.0, conv_in,
        down.0.block.1.norm1, mid.attn_1.q, up.3.upsample.conv, norm_out, conv_out, ...), whose names are this
        class's, so every tensor loads as it is.

        :param state_dict_or_path: a {name: tensor} mapping, or the path of a file torch.load reads into one (or
            of a .safetensors file).
        :param config: the original's keyword arguments: ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
            dropout, resamp_with_conv, in_channels, resolution (GroupNorm is its 32 groups, eps 1e-6).
        :param diffusion: the Diffusion it was trained with (ddpm_fast.sample then uses it).
        A key the original does not have, a missing or unexpected tensor, or a shape that differs is refused with
        the names; nothing is loaded before every tensor is checked (the model is new: no half-loaded one exists).
        """
        from ddpm_fast import conversions  # here: conversions -> checkpoint -> unet would be a cycle at the top
        return conversions.from_original(cls, state_dict_or_path, config, diffusion)

    @classmethod
    def from_diffusers(cls, path_or_model, *, scheduler=None, diffusion=None) -> "UNet":
        """A diffusers UNet2DModel of the DDPM family (google/ddpm-cifar10-32, the 256x256 church / bedroom /
        celeba-hq / cat layouts, or your own of the same kind) as this network, every tensor mapped.

        :param path_or_model: a UNet2DModel, a pipeline holding one (DDPMPipeline: its scheduler comes along), or a
            local folder with its config.json and diffusion_pytorch_model.safetensors or .bin (a saved pipeline's
            folder with unet/ and scheduler/ also works).
        :param scheduler: the DDPM/DDIM scheduler it was trained with: a diffusers scheduler, its config dict or
            the path of its scheduler_config.json. Its beta schedule, variance type and clipping become the model's
            Diffusion. Default: the folder's scheduler_config.json (beside config.json, or ../scheduler/), else none
            (ddpm_fast.sample then uses Diffusion()).
        :param diffusion: a ddpm_fast.Diffusion to carry instead of a scheduler's.
        A configuration this network cannot be (several attention heads, another timestep embedding, symmetric
        downsampling padding, class conditioning, ...), a missing or unexpected tensor, or a shape that differs is
        refused with the config key or the checkpoint's tensor name; nothing is loaded before all are checked.
        """
        from ddpm_fast import conversions
        return conversions.from_diffusers(cls, path_or_model, scheduler, diffusion)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, dropout_keys: tuple | None = None) -> torch.Tensor:
        """:param x: (B, in_channels, H, W), H and W divisible by 2^(levels-1). :param t: (B,) code timesteps.
        :param dropout_keys: in training, the dropout masks' Philox keys (seed, sample_index (B,) int64, step):
            each sample's masks are then a function of (seed, its index, the step, the layer) alone, whatever the
            batch split (docs/design.md: the index in the global batch and the optimizer step). None: a seed drawn
            from torch's generator, sample_index arange(B), step 0.
        :return: eps prediction (B, out_channels, H, W)."""
        levels = len(self.ch_mult)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % 2 ** (levels - 1) \
                or x.shape[3] % 2 ** (levels - 1):
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W) with H, W divisible by "
                             f"{2 ** (levels - 1)}, got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.shape not in ((x.shape[0],), ()):
            raise ValueError(f"UNet expects t of shape ({x.shape[0]},), got {getattr(t, 'shape', t)}")
        t = t.expand(x.shape[0])
        temb = self.temb.dense[0](timestep_embedding(t, self.ch).to(x.dtype))
        temb_act = F.silu(self.temb.dense[1](F.silu(temb)))
        keys = None
        if self.training and self.config["dropout"] > 0:
            keys = tuple(dropout_keys) if dropout_keys is not None else (draw_dropout_seed(), None, 0)

        hs = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for i_block, res_block in enumerate(down.block):
                h = res_block(hs[-1], temb_act, keys)
                if len(down.attn):
                    h = down.attn[i_block](h)
                hs.append(h)
            if level != levels - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb_act, keys)), temb_act, keys)

        for level in reversed(range(levels)):
            up = self.up[level]
            for i_block, res_block in enumerate(up.block):
                h = res_block(torch.cat([h, hs.pop()], dim=1), temb_act, keys)
                if len(up.attn):
                    h = up.attn[i_block](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(self.norm_out(h, act=True))
