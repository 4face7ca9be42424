"""UNet.from_original: checkpoints of the original DDPM network as ported to PyTorch (pytorch_diffusion's layout).
The layout's tensor names and shapes, and a forward pass over them, are written here from the original code's
structure, apart from ddpm_fast/unet.py, so that a mapping which is wrong but agrees with itself fails: every tensor
random (a fresh GroupNorm's weight 1 and bias 0 would hide swapped norms), the loaded model (fused ops on) against
that forward. Then the refusals: a missing file, a foreign file, missing / unexpected / misshapen tensors, config keys
the original does not take, a configuration the network cannot be."""
import math

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast
from ddpm_fast import Diffusion, UNet
from helpers import relative_error

# The original's CIFAR-10 structure at a test's size: 32 groups need widths of 32 and more.
CONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1,
              resamp_with_conv=True, in_channels=3, resolution=8)


def original_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the original Model with these arguments."""
    shapes = {}
    temb = 4 * cfg["ch"]

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def conv(name, cin, cout, k):
        shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        shapes.update({f"{name}.temb_proj.weight": (cout, temb), f"{name}.temb_proj.bias": (cout,)})
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    ch, mult, blocks = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    shapes.update({"temb.dense.0.weight": (temb, ch), "temb.dense.0.bias": (temb,),
                   "temb.dense.1.weight": (temb, temb), "temb.dense.1.bias": (temb,)})
    conv("conv_in", cfg["in_channels"], ch, 3)
    res, c_in = cfg["resolution"], ch
    for level, m in enumerate(mult):
        for b in range(blocks):
            resnet(f"down.{level}.block.{b}", c_in, ch * m)
            c_in = ch * m
            if res in cfg["attn_resolutions"]:
                attention(f"down.{level}.attn.{b}", c_in)
        if level < len(mult) - 1:
            conv(f"down.{level}.downsample.conv", c_in, c_in, 3)
            res //= 2
    resnet("mid.block_1", c_in, c_in)
    attention("mid.attn_1", c_in)
    resnet("mid.block_2", c_in, c_in)
    for level in reversed(range(len(mult))):
        for b in range(blocks + 1):
            skip = ch * mult[level] if b < blocks else ch * ((1,) + tuple(mult))[level]
            resnet(f"up.{level}.block.{b}", c_in + skip, ch * mult[level])
            c_in = ch * mult[level]
            if res in cfg["attn_resolutions"]:
                attention(f"up.{level}.attn.{b}", c_in)
        if level > 0:
            conv(f"up.{level}.upsample.conv", c_in, c_in, 3)
            res *= 2
    norm("norm_out", c_in)
    conv("conv_out", c_in, cfg["out_ch"], 3)
    return shapes


def random_state(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=gen) for name, shape in original_tensors(cfg).items()}


def original_forward(s, cfg, x, t):
    """The original Model's forward over the state dict s (float64)."""
    s = {k: v.double() for k, v in s.items()}
    x = x.double()

    def silu(v):
        return v * torch.sigmoid(v)

    def gn(v, name):
        return F.group_norm(v, 32, s[f"{name}.weight"], s[f"{name}.bias"], 1e-6)

    def conv(v, name, stride=1, padding=1):
        return F.conv2d(v, s[f"{name}.weight"], s[f"{name}.bias"], stride, padding)

    def resnet(v, temb, name):
        h = conv(silu(gn(v, f"{name}.norm1")), f"{name}.conv1")
        h = h + F.linear(silu(temb), s[f"{name}.temb_proj.weight"], s[f"{name}.temb_proj.bias"])[:, :, None, None]
        h = conv(silu(gn(h, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.nin_shortcut.weight" in s:
            v = conv(v, f"{name}.nin_shortcut", padding=0)
        return v + h

    def attention(v, name):
        b, c, hh, ww = v.shape
        h = gn(v, f"{name}.norm")
        q, k, val = (conv(h, f"{name}.{p}", padding=0).reshape(b, c, hh * ww) for p in ("q", "k", "v"))
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
        h = torch.bmm(val, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return v + conv(h, f"{name}.proj_out", padding=0)

    half = cfg["ch"] // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
    emb = t.double()[:, None] * freqs[None]
    temb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    temb = F.linear(silu(F.linear(temb, s["temb.dense.0.weight"], s["temb.dense.0.bias"])),
                    s["temb.dense.1.weight"], s["temb.dense.1.bias"])
    mult, blocks = cfg["ch_mult"], cfg["num_res_blocks"]
    hs = [conv(x, "conv_in")]
    for level in range(len(mult)):
        for b in range(blocks):
            h = resnet(hs[-1], temb, f"down.{level}.block.{b}")
            if f"down.{level}.attn.{b}.q.weight" in s:
                h = attention(h, f"down.{level}.attn.{b}")
            hs.append(h)
        if level < len(mult) - 1:
            hs.append(conv(F.pad(hs[-1], (0, 1, 0, 1)), f"down.{level}.downsample.conv", stride=2, padding=0))
    h = resnet(attention(resnet(hs[-1], temb, "mid.block_1"), "mid.attn_1"), temb, "mid.block_2")
    for level in reversed(range(len(mult))):
        for b in range(blocks + 1):
            h = resnet(torch.cat([h, hs.pop()], dim=1), temb, f"up.{level}.block.{b}")
            if f"up.{level}.attn.{b}.q.weight" in s:
                h = attention(h, f"up.{level}.attn.{b}")
        if level > 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{level}.upsample.conv")
    return conv(silu(gn(h, "norm_out")), "conv_out")


@pytest.mark.parametrize("cfg", [CONFIG, {**CONFIG, "ch_mult": (1, 1, 2), "num_res_blocks": 1,
                                          "attn_resolutions": (8, 2), "out_ch": 6}], ids=["cifar-like", "other"])
def test_loaded_model_equals_the_original_forward(cfg):
    state = random_state(cfg)
    model = UNet.from_original(state, cfg).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg["in_channels"], cfg["resolution"], cfg["resolution"], generator=gen)
    t = torch.tensor([0, 417, 999])
    with torch.inference_mode():
        got = model(x, t)
    assert relative_error(got, original_forward(state, cfg, x, t)) < 1e-4
    for name, tensor in model.state_dict().items():  # each tensor where the original put it
        assert torch.equal(tensor, state[name]), name


def test_from_a_file_and_then_sampled(tmp_path):
    state = random_state(CONFIG, seed=2)
    torch.save(state, tmp_path / "model.ckpt")
    model = UNet.from_original(tmp_path / "model.ckpt", CONFIG, diffusion=Diffusion(timesteps=4))
    assert torch.equal(model.state_dict()["mid.attn_1.k.weight"], state["mid.attn_1.k.weight"])
    images = ddpm_fast.sample(model, 2, progress=False)  # the model's own diffusion: 4 steps
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_refusals_name_what_is_wrong(tmp_path):
    state = random_state(CONFIG)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        UNet.from_original(tmp_path / "absent.ckpt", CONFIG)
    (tmp_path / "foreign.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="foreign.ckpt is not a checkpoint torch.load can read"):
        UNet.from_original(tmp_path / "foreign.ckpt", CONFIG)
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): mid.attn_1.q.bias"):
        UNet.from_original({k: v for k, v in state.items() if k != "mid.attn_1.q.bias"}, CONFIG)
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\): down.0.block.0.conv_shortcut.weight"):
        UNet.from_original({**state, "down.0.block.0.conv_shortcut.weight": torch.zeros(1)}, CONFIG)
    bad = dict(state, **{"up.1.block.0.norm2.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"up.1.block.0.norm2.weight is \(7,\), the model's \(64,\)"):
        UNet.from_original(bad, CONFIG)
    with pytest.raises(ValueError, match=r"keys the original Model does not take: \['num_groups'\]"):
        UNet.from_original(state, {**CONFIG, "num_groups": 8})
    with pytest.raises(ValueError, match=r"missing required keys: \['ch'\]"):
        UNet.from_original(state, {k: v for k, v in CONFIG.items() if k != "ch"})
    with pytest.raises(ValueError, match="not divisible by num_groups=32"):  # the original's 32 groups
        UNet.from_original(state, {**CONFIG, "ch": 8})
    with pytest.raises(ValueError, match="expected a state dict"):
        UNet.from_original([1, 2], CONFIG)
