"""ddpm_fast: DDPM (Ho, Jain & Abbeel 2020) with fused kernels. The public API, and nothing else."""
import importlib.util as _util

# The repository's top-level kernels/ becomes ddpm_fast.kernels only when the package is installed (pip install
# --no-build-isolation ., or -e . for a contributor): a plain checkout on sys.path lacks it, and would fail later
# with a ModuleNotFoundError from deep inside.
if _util.find_spec("ddpm_fast.kernels") is None:
    raise ImportError("ddpm_fast is imported from a source checkout that is not installed: run `pip install "
                      "--no-build-isolation -e .` there (after torch), or run from outside the checkout")

from ddpm_fast.ops.registry import check_required as _check_required  # noqa: E402

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
