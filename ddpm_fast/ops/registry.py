"""Which backend runs an op: availability (with the reason when not), the static choice, and DDPM_FAST_REQUIRE.

Order of choice (docs/design.md): explicit `backend=` > `use_backend(...)` > $DDPM_FAST_BACKEND > the op's fixed table.
A backend named by any of the first three that cannot run is an error, never a quiet fallback; only the fixed table
falls through to the next entry (ending at "reference", which always runs).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import NamedTuple, Sequence

import torch

BACKENDS = ("reference", "cpp", "triton")

# The fixed table, per device type, for ops that do not give their own. The CUDA order (Triton first) is provisional:
# no GPU has run these kernels yet, so no benchmark chose it (bench/RESULTS.md has CPU numbers only; bench/gpu_check.sh
# times both GPU backends).
DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cpp", "reference")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("ddpm_fast_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A backend that was asked for cannot run this op on this device; the message says why."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def cpp_module():
    """(module or None, reason). The module only if its torch is the running torch (an ABI guarantee)."""
    try:
        module = importlib.import_module("ddpm_fast._C")
    except ImportError as error:
        return None, (f"ddpm_fast._C could not be imported ({error}); install torch first, then "
                      "`pip install --no-build-isolation .` to build it")
    built = getattr(module, "torch_version", "unknown")
    if built != torch.__version__:
        return None, (f"ddpm_fast._C was built against torch {built} but torch {torch.__version__} is running; "
                      "rebuild it with `pip install --no-build-isolation --force-reinstall --no-deps .`")
    return module, "C++ CPU kernels" + (" and CUDA kernels" if module.with_cuda else
                                        " (no CUDA kernels: built without a CUDA toolkit matching torch)")


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as error:
        return BackendStatus(False, f"triton is not installed ({error}); `pip install triton`")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendStatus(True, f"triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1; "
                                   "slow, for tests)")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on CUDA")
    return BackendStatus(False, f"triton {triton.__version__} is installed but there is no CUDA GPU; set "
                                "TRITON_INTERPRET=1 before importing ddpm_fast to run its kernels on CPU tensors")


def cpp_ops():
    """torch.ops.ddpm_fast, after loading _C; raises BackendUnavailable with the reason if it cannot be used."""
    module, reason = cpp_module()
    if module is None:
        raise BackendUnavailable(f"backend 'cpp' is unavailable: {reason}")
    return torch.ops.ddpm_fast


def backends() -> dict[str, BackendStatus]:
    """Every backend -> (available, reason): what runs here and, if not, why not."""
    module, cpp_reason = cpp_module()
    return {
        "reference": BackendStatus(True, "eager PyTorch, any device"),
        "cpp": BackendStatus(module is not None, cpp_reason),
        "triton": _triton_status(),
    }


def status_on(backend: str, device: torch.device) -> BackendStatus:
    """Can `backend` run on tensors of `device`?"""
    if backend == "reference":
        return BackendStatus(True, "")
    if backend == "cpp":
        module, reason = cpp_module()
        if module is None:
            return BackendStatus(False, reason)
        if device.type == "cuda" and not module.with_cuda:
            return BackendStatus(False, "ddpm_fast._C was built without CUDA kernels (" + reason + ")")
        if device.type not in ("cpu", "cuda"):
            return BackendStatus(False, f"no C++ kernels for device type {device.type!r}")
        return BackendStatus(True, "")
    status = _triton_status()
    if not status.available:
        return status
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cpu" and not interpreted:
        return BackendStatus(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if device.type == "cuda" and interpreted:
        return BackendStatus(False, "TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        return BackendStatus(False, f"no Triton kernels for device type {device.type!r}")
    return BackendStatus(True, "")


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run every op inside the block on backend `name` (an op that lacks it, or cannot run it here, raises)."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


@torch.compiler.assume_constant_result
def choose(op: str, device: torch.device, implemented: Sequence[str], backend: str | None = None,
           order: dict[str, Sequence[str]] | None = None) -> str:
    """The backend that runs `op` on `device`, given the backends the op implements.

    Under torch.compile the choice is made once, while tracing (it reads the environment and imports _C, which
    Dynamo cannot trace), and is baked into the graph: change use_backend() outside a compiled region."""
    if backend is not None:
        requested, where = _check_name(backend, "backend= argument"), "backend= argument"
    elif _forced.get() is not None:
        requested, where = _forced.get(), "use_backend()"
    elif os.environ.get("DDPM_FAST_BACKEND"):
        requested, where = _check_name(os.environ["DDPM_FAST_BACKEND"], "$DDPM_FAST_BACKEND"), "$DDPM_FAST_BACKEND"
    else:
        requested = None
    if requested is not None:
        if requested not in implemented:
            raise BackendUnavailable(f"{op} has no {requested!r} implementation (asked for by {where}); "
                                     f"it has: {', '.join(implemented)}")
        status = status_on(requested, device)
        if not status.available:
            raise BackendUnavailable(f"{op}: backend {requested!r} (asked for by {where}) cannot run on "
                                     f"{device.type}: {status.reason}")
        return requested
    for candidate in (order or DEFAULT_ORDER).get(device.type, ("reference",)):
        if candidate in implemented and status_on(candidate, device).available:
            return candidate
    return "reference"


def check_required() -> None:
    """$DDPM_FAST_REQUIRE=cpp,triton: a listed backend that is unavailable is an import error (CI sets it)."""
    required = [_check_name(name.strip(), "$DDPM_FAST_REQUIRE")
                for name in os.environ.get("DDPM_FAST_REQUIRE", "").split(",") if name.strip()]
    status = backends()
    missing = [f"{name}: {status[name].reason}" for name in required if not status[name].available]
    if missing:
        raise ImportError("DDPM_FAST_REQUIRE names backends that are unavailable:\n  " + "\n  ".join(missing))
