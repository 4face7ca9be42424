"""Sample quality without a download: a small classifier trained on real images rates samples by how confidently it
classifies them, and by the Fréchet distance of its 64-d features to held-out real images'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.evaluation.frechet import frechet_distance


class FeatureClassifier(torch.nn.Module):
    """A small CNN for the sample-quality metrics: two conv stages, global pooling, a 64-d feature layer (the space
    of the Fréchet distance) and a linear classifier."""

    def __init__(self, channels: int, classes: int, width: int = 32, features: int = 64):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.GroupNorm(8, 2 * width), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, features), torch.nn.SiLU())
        self.head = torch.nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images, labels, *, epochs: int = 30, batch_size: int = 64, seed: int = 0,
                     progress: bool = True) -> FeatureClassifier:
    """FeatureClassifier trained on uint8 `images` (N, C, H, W) and integer `labels` (N,) (Adam 1e-3, seeded)."""
    images = load_images(images, progress=False)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (len(images),) or labels.min() < 0:
        raise ValueError(f"labels must be {len(images)} non-negative ints, one per image, got {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = FeatureClassifier(images.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    x_all = to_model_range(images)
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(classifier(x_all[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


@dataclass
class QualityReport:
    """Sample quality in a small classifier's terms (not FID: its network is ours, trained on the data).

    :param confident: the share of samples whose top class probability exceeds the threshold.
    :param histogram: samples per predicted class. :param frechet: the Fréchet distance between the samples'
        features (the classifier's 64-d layer) and those of the odd held-out images.
    :param real_confident: the confident share of the held-out images. :param real_frechet: the distance of the
        even held-out images to the odd ones: the floor a perfect sampler would reach with that many samples (with
        more samples its small-sample bias is a little smaller).
    """
    confident: float
    histogram: list
    frechet: float
    real_confident: float
    real_frechet: float

    def __str__(self) -> str:
        return (f"confidently classified {self.confident:.1%} (real {self.real_confident:.1%}); classifier-feature "
                f"Fréchet distance {self.frechet:.3f} (real vs real {self.real_frechet:.3f}); classes "
                f"{self.histogram}")


def sample_quality(samples: torch.Tensor, held_out, classifier: FeatureClassifier, *,
                   threshold: float = 0.9) -> QualityReport:
    """Rate `samples` (float in [-1, 1], (N, C, H, W)) with `classifier` (train_classifier on the training data)
    against `held_out` real images (uint8, or a path), which the classifier has not seen."""
    real = to_model_range(load_images(held_out, progress=False))
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1:] != real.shape[1:]:
        raise ValueError(f"samples must be a float tensor (N, {', '.join(map(str, real.shape[1:]))}) like the "
                         f"real images, got {getattr(samples, 'shape', type(samples).__name__)}")
    if len(real) < 4 or len(samples) < 2:
        raise ValueError("need at least 4 held-out images and 2 samples")
    with torch.no_grad():
        probs = torch.softmax(classifier(samples.float().cpu()), 1)
        real_probs = torch.softmax(classifier(real), 1)
        features, real_features = classifier.features(samples.float().cpu()), classifier.features(real)
    # the reference is the odd held-out images; the floor, the even ones against it (interleaved: a data set
    # stored in class order would otherwise compare two different mixes of classes)
    reference = real_features[1::2]
    histogram = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist()
    return QualityReport(confident=(probs.max(1).values > threshold).float().mean().item(), histogram=histogram,
                         frechet=frechet_distance(features, reference),
                         real_confident=(real_probs.max(1).values > threshold).float().mean().item(),
                         real_frechet=frechet_distance(real_features[0::2], reference))
