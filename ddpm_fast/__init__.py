"""ddpm_fast: DDPM (Ho, Jain & Abbeel 2020) with fused kernels. The public API, and nothing else."""
from ddpm_fast.ops._registry import check_required as _check_required

_check_required()  # $DDPM_FAST_REQUIRE=cpp,triton: a missing backend is an import error

from ddpm_fast.bundled import pretrained  # noqa: E402
from ddpm_fast.checkpoint import load  # noqa: E402
from ddpm_fast.diffusion import Diffusion, NLLResult  # noqa: E402
from ddpm_fast.evaluation import (InceptionStats, NLLReport, RateDistortion, fid, interpolate, nll,  # noqa: E402
                                  rate_distortion)
from ddpm_fast.images import make_grid, save_grid, to_uint8  # noqa: E402
from ddpm_fast.ops import backends  # noqa: E402
from ddpm_fast.sampling import SampleResult, sample  # noqa: E402
from ddpm_fast.training import TrainConfig, Trainer, train  # noqa: E402
from ddpm_fast.unet import UNet  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Diffusion", "NLLResult", "UNet", "sample", "SampleResult", "train", "Trainer", "TrainConfig", "load",
           "pretrained", "nll", "NLLReport", "rate_distortion", "RateDistortion", "interpolate",
           "fid", "InceptionStats",
           "backends", "to_uint8", "make_grid", "save_grid"]
