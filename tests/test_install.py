"""A plain source checkout is not importable: its kernels/ folder becomes ddpm_fast.kernels only once installed
(pip install --no-build-isolation ., or -e . for a contributor), and the import says so in one line."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_an_uninstalled_checkout_says_what_to_run(tmp_path):
    shutil.copytree(REPO / "ddpm_fast", tmp_path / "ddpm_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: no site-packages, so neither an installed ddpm_fast nor an editable install's finder is seen
    done = subprocess.run([sys.executable, "-S", "-c", "import ddpm_fast"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: ddpm_fast is imported from a source checkout that is not installed: run `pip install "
        "--no-build-isolation -e .` there (after torch), or run from outside the checkout")
