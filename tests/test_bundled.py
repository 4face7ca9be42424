"""The bundled default: the digits data (17 levels, the split) and the shipped model (it loads with its manifest
checked, and its samples are digits: a classifier trained on the real digits reads them far better than an untrained
network's)."""
import pytest
import torch

import ddpm_fast
from ddpm_fast import bundled, checkpoint
from ddpm_fast.evaluation import sample_quality, train_classifier


def test_the_digits_and_their_split():
    train, train_labels = bundled.digits("train")
    held_out, held_out_labels = bundled.digits("held_out")
    every, _ = bundled.digits("all")
    assert train.shape == (1498, 1, 8, 8) and held_out.shape == (299, 1, 8, 8) and every.shape == (1797, 1, 8, 8)
    assert train.dtype == torch.uint8 and train_labels.dtype == torch.int64
    levels = torch.unique(every).tolist()
    assert levels == [round(v * 255 / 16) for v in range(17)]  # 0..16 spread over [0, 255]
    assert torch.equal(every[5::6], held_out) and torch.bincount(held_out_labels).min() >= 25  # every class held out
    with pytest.raises(ValueError, match="split must be one of"):
        bundled.digits("test")


def test_the_bundled_model_loads_checked():
    model = ddpm_fast.pretrained("digits")
    assert model.config == {**ddpm_fast.UNet.from_preset("digits").config}
    assert not model.training and model.diffusion.num_timesteps == 1000
    checkpoint.verify(bundled.MODELS["digits"])  # every file against its manifest
    with pytest.raises(ValueError, match="no bundled model 'cifar10'"):
        ddpm_fast.pretrained("cifar10")


@pytest.mark.slow
def test_the_bundled_models_samples_are_digits():
    train, labels = bundled.digits("train")
    classifier = train_classifier(train, labels, epochs=20, progress=False)
    held_out = bundled.digits("held_out")[0]
    torch.manual_seed(0)
    untrained = ddpm_fast.UNet.from_preset("digits").eval()
    quick = dict(sampler="ddim", steps=50, progress=False)
    good = sample_quality(ddpm_fast.sample(ddpm_fast.pretrained("digits"), 64, **quick), held_out, classifier)
    bad = sample_quality(ddpm_fast.sample(untrained, 64, **quick), held_out, classifier)
    assert good.real_confident > 0.85
    assert good.confident > bad.confident + 0.15 and good.frechet < 0.1 * bad.frechet
    assert sum(count > 0 for count in good.histogram) >= 8  # most digits drawn, not one
