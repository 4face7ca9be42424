"""Reference features of the FID Inception, from pytorch-fid itself, for tests/test_fid.py.

pytorch-fid needs torchvision, which does not import beside this project's CPU torch (see TOOLCHAIN.md), so the
reference is computed once, in a separate environment, and stored here (fid_inception.npz, ~40 KB):

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0
    /tmp/tvenv/bin/python tests/reference/fid_inception.py

The real weights cannot be downloaded here, so both sides use the synthetic weights of `synthetic_weights`: a
function of each tensor's name and shape only (seeded by its name), which the test calls again for our network.
It stores: pytorch-fid's state-dict names and shapes, its 2048-d features of `reference_images()`, and
pytorch-fid's own Fréchet distance (scipy's sqrtm) of two feature sets made by `reference_features()`.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fid_inception.npz"


def synthetic_weights(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Weights a deep ReLU network stays finite and non-trivial with: He-scaled convs, BatchNorm statistics near
    (0, 1) with a spread, so every layer's normalisation matters. num_batches_tracked is left out."""
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name.endswith(("bn.weight",)):
            value = 1.0 + 0.2 * z
        elif name.endswith(("bias", "running_mean")):
            value = 0.2 * z
        else:  # conv / fc weights: He scaling over the fan-in
            value = z * (2.0 / float(np.prod(shape[1:]))) ** 0.5
        state[name] = value.float()
    return state


def reference_images() -> torch.Tensor:
    """Four uint8 RGB images, 32x40 (not square: the 299x299 resize is part of what is compared)."""
    gen = torch.Generator().manual_seed(20261130)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 10, generator=gen), size=(32, 40), mode="bilinear")
    noise = torch.rand(4, 3, 32, 40, generator=gen)
    return ((0.8 * smooth + 0.2 * noise) * 255).round().to(torch.uint8)


def reference_features() -> tuple[np.ndarray, np.ndarray]:
    """Two (300, 24) float64 feature sets with different means and correlated covariances."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    b = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.7 + 0.3
    return a, b


def main() -> None:
    from pytorch_fid import fid_score, inception

    shapes = {}

    def synthetic(url, **_):  # in place of the download: the model's own names and shapes, synthetic values
        return synthetic_weights(shapes)

    real_loader = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = synthetic
    try:
        # the names and shapes fid_inception_v3 loads: build its structure once without weights
        skeleton = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        for name, cls, arg in (("Mixed_5b", inception.FIDInceptionA, (192, 32)),
                               ("Mixed_5c", inception.FIDInceptionA, (256, 64)),
                               ("Mixed_5d", inception.FIDInceptionA, (288, 64)),
                               ("Mixed_6b", inception.FIDInceptionC, (768, 128)),
                               ("Mixed_6c", inception.FIDInceptionC, (768, 160)),
                               ("Mixed_6d", inception.FIDInceptionC, (768, 160)),
                               ("Mixed_6e", inception.FIDInceptionC, (768, 192)),
                               ("Mixed_7b", inception.FIDInceptionE_1, (1280,)),
                               ("Mixed_7c", inception.FIDInceptionE_2, (2048,))):
            setattr(skeleton, name, cls(*arg))
        shapes.update({k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
        model = inception.InceptionV3([3]).eval()
    finally:
        inception.load_state_dict_from_url = real_loader
    with torch.no_grad():
        features = model(reference_images().float() / 255)[0].squeeze(-1).squeeze(-1)
    a, b = reference_features()
    distance = fid_score.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                                    b.mean(0), np.cov(b, rowvar=False))
    names = sorted(shapes)
    np.savez_compressed(FIXTURE, names=np.array(names), shapes=np.array([",".join(map(str, shapes[k]))
                                                                          for k in names]),
                        features=features.numpy().astype(np.float32), frechet=np.float64(distance),
                        versions=np.array([torch.__version__, inception.torchvision.__version__, "pytorch-fid 0.3.0"]))
    print(f"wrote {FIXTURE}: {len(names)} tensors, features {tuple(features.shape)} "
          f"(mean {features.mean():.4f}, std {features.std():.4f}), frechet {distance:.6f}")


if __name__ == "__main__":
    main()
