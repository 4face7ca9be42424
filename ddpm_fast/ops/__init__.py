"""Fused ops: one module per op family, each with its eager reference, backend choice, fake and autograd.
Everything above (diffusion, unet) calls these functions, never a backend directly."""
from ddpm_fast.ops.registry import BACKENDS, BackendStatus, BackendUnavailable, backends, use_backend

__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailable", "backends", "use_backend"]
