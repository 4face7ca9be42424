"""The network: the paper's sizes, the original code's layers, batch independence, and bad configurations."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import UNet
from ddpm_fast.ops.attention import attention_block
from ddpm_fast.ops.group_norm import group_norm_silu
from ddpm_fast.unet import Downsample, timestep_embedding
from helpers import relative_error


def randomize_(model, seed=0):
    """Every parameter random (the zero-initialised convs included), so no test passes on zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny(**overrides):
    config = dict(in_channels=2, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.1, num_groups=4)
    return UNet(**{**config, **overrides})


def test_preset_parameter_counts():
    assert sum(p.numel() for p in UNet.from_preset("cifar10").parameters()) == 35_746_307  # diffusers' equivalent
    small = UNet.from_preset("small")
    assert sum(p.numel() for p in small.parameters()) == 1_623_169
    assert (small.in_channels, small.image_size, small.config["num_groups"]) == (1, 16, 8)


def test_layout_and_zero_init_of_the_original():
    model = UNet.from_preset("cifar10")
    keys = set(model.state_dict())
    for key in ["temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.0.norm1.weight",
                "down.1.block.0.nin_shortcut.weight", "down.1.attn.1.q.weight", "down.2.downsample.conv.weight",
                "mid.block_1.temb_proj.weight", "mid.attn_1.proj_out.weight", "up.3.block.2.conv2.weight",
                "up.1.attn.2.k.bias", "up.1.upsample.conv.weight", "norm_out.bias", "conv_out.weight"]:
        assert key in keys, key
    assert "down.3.downsample.conv.weight" not in keys and "up.0.upsample.conv.weight" not in keys
    assert len(model.up[1].block) == 3 and len(model.up[1].attn) == 3 and len(model.down[0].attn) == 0
    assert model.up[0].block[2].conv1.in_channels == 256  # concat of 128 + the conv_in skip of 128
    for name, p in model.named_parameters():
        if name.endswith(("conv2.weight", "proj_out.weight", "conv_out.weight")):
            assert not p.any(), name
    assert model.conv_in.weight.std().item() == pytest.approx(math.sqrt(2 / (27 + 1152)), rel=0.1)  # xavier


def test_timestep_embedding_is_the_originals():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 16)
    for i, ti in enumerate(t.tolist()):
        freqs = [math.exp(-k * math.log(10000) / 7) for k in range(8)]
        expected = [math.sin(ti * f) for f in freqs] + [math.cos(ti * f) for f in freqs]
        assert emb[i].tolist() == pytest.approx(expected, abs=2e-4 * max(ti, 1))  # float32 phases


def test_downsample_pads_like_tensorflow_same():
    down = Downsample(3, with_conv=True)
    randomize_(down)
    x = torch.randn(2, 3, 8, 8)
    padded = torch.zeros(2, 3, 9, 9)
    padded[:, :, :8, :8] = x  # TF "SAME" for stride 2 on even sizes: one extra row and column, bottom and right
    expected = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    assert torch.allclose(down(x), expected, atol=1e-6) and expected.shape == (2, 3, 4, 4)


def test_forward_shapes_and_batch_independence():
    model = randomize_(tiny()).eval()
    x = torch.randn(5, 2, 8, 8)
    t = torch.tensor([0, 10, 200, 500, 999])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
        for i in [0, 3]:
            alone = model(x[i:i + 1], t[i:i + 1])
            assert relative_error(alone[0], out[i]) < 1e-5
        assert not torch.allclose(model(x, t.flip(0)), out)  # t matters


def test_dropout_only_in_training():
    model = randomize_(tiny(dropout=0.5))
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 4])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


def test_dropout_keys_make_each_samples_masks_its_own():
    """dropout_keys=(seed, sample_index, step): a sample's masks follow its index and the step, whatever the batch
    (training keys them by the index in the global batch, so any split of a batch over processes agrees)."""
    model = randomize_(tiny(dropout=0.5)).train()
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([3, 4, 5, 6])
    index = torch.tensor([10, 11, 12, 13])
    whole = model(x, t, dropout_keys=(7, index, 2))
    assert torch.equal(whole, model(x, t, dropout_keys=(7, index, 2)))
    half = model(x[2:], t[2:], dropout_keys=(7, index[2:], 2))
    assert relative_error(half, whole[2:]) < 1e-6
    assert not torch.allclose(model(x, t, dropout_keys=(7, index, 3)), whole)  # another step, other masks
    assert not torch.allclose(model(x, t, dropout_keys=(8, index, 2)), whole)  # another seed


def test_group_norm_reference_against_float64():
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    w, b, add = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(3, 8,
                                                                                                     dtype=torch.float64)
    out = group_norm_silu(x, w, b, 4, 1e-6, add=add)
    h = (x + add[:, :, None, None]).view(3, 4, -1)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    h = h.view(3, 8, 5, 7) * w[:, None, None] + b[:, None, None]
    assert relative_error(out, h * torch.sigmoid(h)) < 1e-12
    assert relative_error(group_norm_silu(x, w, b, 4, 1e-6, add=add, act=False), h) < 1e-12


def test_attention_reference_against_sdpa():
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    nw, nb = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    wqkv, bqkv = torch.randn(24, 8, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    wp, bp = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = attention_block(x, nw, nb, wqkv, bqkv, wp, bp, 2, 1e-6)
    h = F.group_norm(x, 2, nw, nb, 1e-6).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = (h @ wqkv.T + bqkv).split(8, dim=-1)
    a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
    expected = x + (a @ wp.T + bp).transpose(1, 2).reshape(2, 8, 3, 5)
    assert relative_error(out, expected) < 1e-12


def test_bad_configurations_and_inputs():
    with pytest.raises(ValueError, match="unknown preset"):
        UNet.from_preset("imagenet")
    with pytest.raises(ValueError, match="num_groups"):
        tiny(num_groups=3)
    with pytest.raises(ValueError, match=r"attention resolutions \[5\] are never reached"):
        tiny(attn_resolutions=(5,))
    with pytest.raises(ValueError, match="image_size 10 is not divisible"):
        tiny(image_size=10, ch_mult=(1, 2, 2))
    model = tiny()
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 2, H, W\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects t of shape"):
        model(torch.randn(2, 2, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        group_norm_silu(torch.randn(2, 8, 2, 2), torch.ones(8), torch.zeros(8), 3, 1e-6)
    with pytest.raises(ValueError, match="add must be a float tensor of shape"):
        group_norm_silu(torch.randn(2, 8, 2, 2), torch.ones(8), torch.zeros(8), 4, 1e-6, add=torch.ones(8))
    with pytest.raises(ValueError, match="qkv_weight must have shape"):
        attention_block(torch.randn(1, 4, 2, 2), *[torch.ones(4)] * 2, torch.ones(4, 4), torch.ones(12),
                        torch.ones(4, 4), torch.ones(4), 2, 1e-6)
