"""The network's precision: which dtype runs it by default on a device, and the wrapper that runs it in another
(the reverse update, the bound and the optimizer always stay float32). sample(), nll() and the Trainer use it."""
from __future__ import annotations

import torch

from ddpm_fast import checks

NETWORK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX) for oneDNN, whose bf16 convolutions and GEMMs are
    then 2-4x its float32 ones at the U-Net's shapes (bench/RESULTS.md)? Elsewhere bf16 is emulated and slower."""
    cpu = torch.cpu
    fast = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return fast and torch.backends.mkldnn.is_available()


def default_network_dtype(device) -> tuple[torch.dtype, str]:
    """network_dtype=None's choice on `device`, and why: bf16 on a GPU and on a CPU with native bf16 (the quality
    check in the README: held-out NLL and sample quality unchanged on the bundled model), float32 on other CPUs."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "a GPU: bf16 tensor cores"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "this CPU has AVX512-BF16 or AMX (oneDNN's bf16 kernels, 2-4x float32)"
    return torch.float32, "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower)"


def network_dtype(asked, device) -> torch.dtype:
    """A network_dtype argument: None takes default_network_dtype's choice for `device`."""
    if asked is None:
        return default_network_dtype(device)[0]
    return checks.choice("network_dtype", asked, NETWORK_DTYPES)


class Autocast:
    """model(x, t, ...) under torch.autocast(device_type, dtype, enabled, cache_enabled). Sampling turns the
    weight-cast cache off (a CUDA graph must capture the casts); training keeps autocast's defaults, and in float32
    runs with enabled=False (an autocast around the training loop does not reach the network)."""

    def __init__(self, model, device_type: str, dtype: torch.dtype, *, enabled: bool = True,
                 cache_enabled: bool = False):
        self.model, self.device_type, self.dtype = model, device_type, dtype
        self.enabled, self.cache_enabled = enabled, cache_enabled

    def __call__(self, x, t, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled,
                            cache_enabled=self.cache_enabled):
            return self.model(x, t, **kwargs)


def autocast(model, device_type: str, dtype: torch.dtype):
    """The network that runs `model` in `dtype`: the model itself in float32, else Autocast."""
    return model if dtype == torch.float32 else Autocast(model, device_type, dtype)
