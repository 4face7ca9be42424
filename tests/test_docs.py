"""The design as built is in the repository (docs/design.md), and every repository path that the README, the design
or a source file names exists in a clone (a renamed module must take its mentions with it). bench/RESULTS.md is a
dated log: its entries name the files of their day. Dotted names of the package (ddpm_fast.ops.registry.choose) must
import and resolve too."""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a path into one of our trees: ddpm_fast/ops/philox.py, tests/helpers.py, csrc/cuda/, kernels/*.py, ...
PATH = re.compile(r"(?<![\w./-])((?:ddpm_fast|kernels|csrc|tests|bench|docs|\.ci)/[\w.*/-]*[\w*/])")
DOTTED = re.compile(r"(?<![\w./-])ddpm_fast(?:\.[A-Za-z_]\w*)+")
NOT_NAMES = {"ddpm_fast.samples"}  # the samples folder's format name (sample_store.FORMAT), not a module
SOURCES = ("README.md", "docs/design.md", "setup.py", "pyproject.toml", "MANIFEST.in")
TREES = ("ddpm_fast", "kernels", "csrc", "tests", "bench", ".ci")
SUFFIXES = (".py", ".h", ".cpp", ".cu", ".sh", ".md", "")


def _texts():
    for name in SOURCES:
        yield ROOT / name
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts \
                    and "pretrained" not in path.parts and "reference" not in path.parts \
                    and path.name not in ("RESULTS.md", "test_private_names.py") \
                    and path != Path(__file__).resolve():  # (those two name removed paths on purpose)
                yield path


def _missing(text: str) -> list[str]:
    gone = []
    for found in PATH.findall(text):
        path = found.rstrip(".")
        if "*" in path:
            if not list(ROOT.glob(path)):
                gone.append(path)
        elif not (ROOT / path).exists() and not (ROOT / "csrc" / "include" / path).exists():  # (an #include)
            gone.append(path)
    return gone


def _resolves(name: str) -> bool:
    """Whether ddpm_fast.a.b.c is a module of the installed package, or an attribute reached from one."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        module = ".".join(parts[:k])
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            obj = importlib.import_module(module)
            for attribute in parts[k:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


def _unresolved(text: str) -> list[str]:
    names = {found.rstrip(".") for found in DOTTED.findall(text)} - NOT_NAMES
    return sorted(name for name in names if "__main__" not in name and not _resolves(name))


def test_the_design_is_in_the_repository():
    design = (ROOT / "docs" / "design.md").read_text()
    for section in ("Layers", "Ops and backends", "Random numbers", "tolerances", "File formats",
                    "Testing without a GPU"):
        assert section in design
    assert "../shared" not in (ROOT / "README.md").read_text()


def test_every_path_named_exists():
    problems = []
    for path in _texts():
        text = path.read_text(errors="replace")
        if "DESIGN.md" in text:
            problems.append(f"{path.relative_to(ROOT)}: names DESIGN.md (the design is docs/design.md)")
        problems += [f"{path.relative_to(ROOT)}: {gone}" for gone in _missing(text) + _unresolved(text)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_name_that_does_not_resolve():
    assert _unresolved("ddpm_fast.sampling.Autocast, ddpm_fast.precision.Autocast, ddpm_fast.ops.registry.") == [
        "ddpm_fast.sampling.Autocast"]


def test_the_check_finds_a_missing_path():
    assert _missing("see `ddpm_fast/evaluation.py` and ddpm_fast/ops/philox.py, kernels/*.py.") == [
        "ddpm_fast/evaluation.py"]
