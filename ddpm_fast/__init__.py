"""ddpm_fast: DDPM (Ho, Jain & Abbeel 2020) with fused kernels. The public API, and nothing else."""
from ddpm_fast.ops._registry import check_required as _check_required

_check_required()

from ddpm_fast.ops import backends  # noqa: E402

__all__ = ["backends"]
