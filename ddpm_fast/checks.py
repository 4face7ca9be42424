"""Argument checks shared by the public entry points (sample, nll, rate_distortion, train, UNet, Diffusion, the
CLI): each returns the value it checked, or raises ValueError with one sentence, "<name> must be ..., got <value>",
so that a bad argument reads the same wherever it is given (the CLI prints it as its one line)."""
from __future__ import annotations

import math

import torch


def describe(x) -> str:
    """What an argument is, for an error message: a tensor's dtype, shape and device, else its type."""
    return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) \
        else type(x).__name__


def seed(value) -> int:
    """A Philox key: an int in [0, 2^63) (two uint32 key words; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    """An int >= 1 (not a bool, not "3")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    """An int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def optional_positive_int(name: str, value) -> int | None:
    """None or positive_int's."""
    return None if value is None else positive_int(name, value)


def flag(name: str, value) -> bool:
    """True or False (not "no", not 0): a string would silently be taken as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """A finite real number (int or float, not a bool) in the interval given by low / high, open at an end where
    asked; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        interval = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
                    + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]"))
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def image_shape(model, shape: tuple, what: str) -> None:
    """Images of `shape` (C, H, W) must be what `model` was built for where it says (in_channels and image_size: a
    UNet's attention sits at resolutions of image_size, and another size would run without a word and mean
    something else); a model that does not say takes any shape."""
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    want = (channels, size, size)
    if channels is not None and size is not None and tuple(shape) != want:
        raise ValueError(f"{what}: {tuple(shape)}, but the model takes {want} (in_channels {channels}, image_size "
                         f"{size})")


def device(value) -> torch.device:
    """A torch.device that exists and can be used here: "cpu", "cuda", "cuda:1" where that GPU is present. One
    sentence naming the device otherwise (torch's own errors are an AssertionError from deep inside, or a
    RuntimeError listing every device type)."""
    try:
        result = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {value!r} is not a device torch knows (cpu, cuda, cuda:N, ...): "
                         f"{str(error).splitlines()[0]}") from None
    if result.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'})")
        if result.index is not None and result.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif result.type != "cpu":
        backend = getattr(torch, result.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {value!r} is not available here")
    return result
