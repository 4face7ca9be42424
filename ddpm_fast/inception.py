"""The FID variant of InceptionV3, for evaluation.fid: TensorFlow's 2015-12-05 Inception graph, the network of
Heusel et al.'s FID code and of the DDPM paper's FID of 3.17.

Its modules are named as in pytorch-fid's port, so that port's weight file (pt_inception-2015-12-05-6726825d.pth)
loads as it is. As in TF, and unlike torchvision's Inception3: the average pools leave padding out of the mean, the
last block pools by max, and the classifier has 1008 classes (its weights are checked on load, not used).
Weights are never downloaded: `find_weights` looks for the file on disk and refuses clearly when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast.checkpoint import load_checked, read_state_dict

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_ENV = "DDPM_FAST_INCEPTION"


def find_weights(path=None) -> Path:
    """The weight file: `path`, else $DDPM_FAST_INCEPTION, else torch hub's cache (where pytorch-fid puts it)."""
    if path is None and os.environ.get(WEIGHTS_ENV):
        path = os.environ[WEIGHTS_ENV]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception weight file at {path}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"FID needs the FID Inception weights, which ddpm_fast never downloads. None found: no weights= argument, no "
        f"${WEIGHTS_ENV}, nothing at {cached}. Download {WEIGHTS_URL} on a machine with network access (~92 MB; "
        f"pytorch-fid's port of TF's inception-2015-12-05) and pass its path, set ${WEIGHTS_ENV}, or put it there.")


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; the BN has no num_batches_tracked."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = _FrozenBatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _FrozenBatchNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF's: padding not in the mean


class _MixedA(nn.Module):  # 35x35
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _MixedB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # 17x17, factorised 7x7
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg_pool(x))], 1)


class _MixedD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = x
        for i in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{i}")(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8, split 3x3s
    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # the graph's last block pools by max (TF's, kept for comparable numbers), the one before by average
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(three), self.branch3x3_2b(three),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """images in [0, 1] (N, 3, H, W) -> their 2048-d pool features (N, 2048), resized bilinearly to 299x299 first."""

    FEATURES = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, "avg"), _MixedE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # ImageNet's 1008 logits: in the file, unused for FID

    @classmethod
    def from_file(cls, path=None) -> "FIDInception":
        """The network with the weights of find_weights(path), every name and shape checked, in eval mode."""
        state = read_state_dict(find_weights(path))
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # a training counter
        model = cls()
        load_checked(model, state)
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))
