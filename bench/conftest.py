"""Benchmarks: every op and the sampler against eager PyTorch, timed in the same run (medians).
Run: pytest bench/ --benchmark-only [--benchmark-columns=median,iqr,ops]."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO]  # the installed ddpm_fast, with _C
