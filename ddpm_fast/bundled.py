"""The bundled default: a dataset that needs no download and a DDPM trained on it, shipped in the package.

The data are the 1,797 8x8 handwritten digits of the UCI "Optical Recognition of Handwritten Digits" test set (E.
Alpaydin and C. Kaynak, 1998; CC BY 4.0), as scikit-learn ships them: each pixel counts the on-pixels of a 4x4 block
of a 32x32 bitmap, 0..16. They are stored as uint8 round(v * 255 / 16): 17 levels spread over [0, 255], so the model
sees the usual 8-bit [-1, 1] scale. The images stay 8x8: a power of two, so the U-Net halves it once (8 -> 4) and
attends at 4x4; resizing would invent grey levels the data does not have, and padding would add border pixels whose
(trivial) likelihood dilutes bits/dim.

Bits/dim here are the paper's 8-bit measure (the discretised decoder has 256 bins), not comparable with CIFAR-10's:
the data use 17 of the 256 levels, so their entropy is at most log2(17) = 4.09 bits per pixel, and a model that
puts its mass on those 17 levels scores well below 8 bits/dim.

Split: image i is held out when i % 6 == 5 (299 images; 1,498 train), whichever call asks.

digits.npz was written once from scikit-learn's copy (not a dependency): d = sklearn.datasets.load_digits();
images = round(d.images * 255 / 16) as uint8 (1797, 1, 8, 8), labels = d.target as uint8; np.savez_compressed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm_fast import checkpoint

HERE = Path(__file__).resolve().parent / "pretrained"
DIGITS_DATA = HERE / "digits.npz"
MODELS = {"digits": HERE / "digits"}
SPLITS = ("train", "held_out", "all")

# The recipe for the bundled model: the paper's, scaled to a run of minutes. The warmup (1/16 of the run) and the
# EMA's horizon (1 / (1 - decay) = 1000 steps, 1/8) are short against the run, as the paper's 5000 steps and 0.9999
# are against its 800k; no flips (a mirrored digit is another glyph); Adam at 5e-4 (2.5x the paper's: a small
# network, a short run).
DIGITS_RECIPE = dict(steps=8000, batch_size=64, lr=5e-4, warmup=500, ema_decay=0.999, flip=False,
                     checkpoint_every=1000, log_every=100)


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits: uint8 images (N, 1, 8, 8) in 17 levels of [0, 255], and their labels (N,) int64."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    with np.load(DIGITS_DATA) as f:
        images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long()
    held_out = torch.arange(len(images)) % 6 == 5
    keep = {"train": ~held_out, "held_out": held_out, "all": torch.ones_like(held_out)}[split]
    return images[keep], labels[keep]


def pretrained(name: str = "digits", *, device=None):
    """A model shipped with the package, with its diffusion, in eval mode (checkpoint.load: its manifest checked)."""
    if name not in MODELS:
        raise ValueError(f"no bundled model {name!r}; there is: {', '.join(MODELS)}")
    if not (MODELS[name] / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from {MODELS[name]}: the package was "
                                "installed without its data files")
    return checkpoint.load(MODELS[name], device=device)


def export(run, destination) -> Path:
    """Write a training run's newest EMA weights as a model folder to ship (config, weights and manifest: what
    `pretrained` and `load` read), e.g. into a source tree's ddpm_fast/pretrained/digits (`ddpm-fast export`)."""
    folder, config = checkpoint.verify(run)
    step = checkpoint.read_json(folder / "state.json", "training state")["step"]
    model = checkpoint.load(folder, weights="ema")  # the EMA weights, saved as the model's: 1/3 of the run's files
    data = {k: v for k, v in config["data"].items() if k != "scaling"}
    return checkpoint.save(destination, model, step=step, training=config["training"], data=data)

