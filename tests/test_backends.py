"""The build and the backend registry: what is available and why, DDPM_FAST_REQUIRE, explicit choices that
cannot run, the packaging (kernels as ddpm_fast.kernels, headers in the sdist, the torch-first message)."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast.ops import BackendUnavailable, registry, use_backend

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TRITON_INTERPRET", "DDPM_FAST_REQUIRE", "DDPM_FAST_BACKEND")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=Path.home() if Path.home().exists() else "/")


def test_backends_report_every_backend_with_a_reason():
    status = ddpm_fast.backends()
    assert set(status) == {"reference", "cpp", "triton"}
    assert all(isinstance(s.reason, str) and s.reason for s in status.values())
    assert status["reference"].available and status["cpp"].available


def test_the_extension_belongs_to_the_running_torch():
    extension, reason = registry.cpp_module()  # the one place that imports ddpm_fast._C
    assert extension is not None, reason
    assert extension.torch_version == torch.__version__
    assert extension.with_cuda in (0, 1)


def test_an_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    module, reason = registry.cpp_module.__wrapped__()
    assert module is None
    assert "but torch 0.0.1+other is running" in reason and "--no-build-isolation" in reason


def test_kernels_ship_inside_the_package_only():
    """kernels/ is ddpm_fast.kernels, never a top-level `kernels` (a PyPI package has that name)."""
    import importlib.util

    import ddpm_fast.kernels.philox  # noqa: F401

    site = Path(ddpm_fast.__file__).resolve().parent.parent
    if site != Path(__file__).resolve().parent.parent:  # (an editable install's site is the checkout, kernels/ and all)
        assert not (site / "kernels").exists(), "a top-level `kernels` package was installed"
    spec = importlib.util.find_spec("kernels")
    ours = spec is not None and spec.origin is not None and (Path(spec.origin).parent / "diffusion_step.py").exists()
    assert not ours, f"a top-level `kernels` package of ours is importable: {spec.origin}"


def test_require_makes_a_missing_backend_an_import_error():
    done = run_python("import ddpm_fast", DDPM_FAST_REQUIRE="cpp,triton")  # no TRITON_INTERPRET, no GPU
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    assert "DDPM_FAST_REQUIRE" in done.stderr and "triton" in done.stderr and "TRITON_INTERPRET" in done.stderr
    done = run_python("import ddpm_fast", DDPM_FAST_REQUIRE="cpp,triton", TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    done = run_python("import ddpm_fast", DDPM_FAST_REQUIRE="cuda")
    assert done.returncode != 0 and "unknown backend 'cuda'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine Triton is available without the interpreter")
def test_triton_asked_for_without_a_gpu_or_interpreter_says_why():
    code = ("import torch; from ddpm_fast.ops import philox\n"
            "philox.randn(torch.arange(2), torch.zeros(2, dtype=torch.int64), (4,), seed=0, stream=0, "
            "backend='triton')")
    done = run_python(code)
    assert done.returncode != 0
    assert "BackendUnavailable" in done.stderr and "TRITON_INTERPRET" in done.stderr


def test_env_var_and_context_choose_and_refuse():
    with pytest.raises(BackendUnavailable, match="some_op has no 'cpp' implementation"):
        with use_backend("cpp"):  # (every ddpm_fast op has all three: a made-up op that has only the reference)
            registry.choose("some_op", torch.device("cpu"), ("reference",))
    done = run_python("import torch; from ddpm_fast.ops import group_norm as g\n"
                      "g.group_norm_silu(torch.randn(2, 8, 3, 3), torch.ones(8), torch.zeros(8), 4, 1e-6)",
                      DDPM_FAST_BACKEND="triton")
    assert done.returncode != 0 and "$DDPM_FAST_BACKEND" in done.stderr
    assert registry.choose("x", torch.device("cpu"), ("reference", "cpp")) == "cpp"
    assert registry.choose("x", torch.device("cpu"), ("reference",)) == "reference"
    assert registry.choose("x", torch.device("cpu"), ("reference", "cpp", "triton")) == "cpp"  # table, not timing


def test_plain_pip_install_stops_early_with_one_message():
    """Under build isolation torch is absent from the build environment: setup.py must say what to run."""
    code = (f"import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']\n"
            f"runpy.run_path({str(REPO / 'setup.py')!r}, run_name='__main__')")
    done = run_python(code)
    assert done.returncode != 0
    assert "pip install --no-build-isolation ." in done.stderr
    assert "Traceback" not in done.stderr


def test_sdist_carries_every_header(tmp_path):
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "DDPM_FAST_CUDA": "0"})
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*")
               if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert sources and sources <= names
    assert {"kernels/philox.py", "setup.py", "pyproject.toml"} <= names
