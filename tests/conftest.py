"""Test setup. Tests run against the installed package (pip install --no-build-isolation ., or -e . for a
contributor), never a plain source tree: _C and ddpm_fast.kernels exist only once installed (an uninstalled
checkout's import says so and what to run)."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter where there is no GPU; this must precede their import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO]  # never import ddpm_fast from the checkout

import ddpm_fast  # noqa: E402,F401  (an uninstalled checkout stops here, saying what to run)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

