"""No private name crosses two of our modules: what one module shares with another is a public, documented name of
the module that owns it (docs/design.md, "Layers"). Read from the source with `ast`, so it covers ddpm_fast/,
kernels/, bench/ and tests/ whichever way the package is installed.

Flagged: importing a private name or from a private module of ours; `module._x` on a name bound to one of our
modules, also as a string (getattr / setattr / monkeypatch.setattr); `anything._x` where `_x` is defined in another of
our files but not in this one (an object's private attribute, e.g. diffusion._on). Not seen: an object's private
attribute whose name this file also defines for itself."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("ddpm_fast", "kernels", "bench", "tests")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _files() -> list[Path]:
    return sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py") if "pretrained" not in p.parts)


# top-level names that are ours: the package, and the modules tests/ and bench/ import by file name (helpers, ...)
OURS = {"ddpm_fast", "kernels"} | {p.stem for p in _files()}


def _ours(module: str | None, level: int) -> bool:
    return level > 0 or (module or "").split(".")[0] in OURS


def _defined_private(tree: ast.AST) -> set[str]:
    """The private names a file defines: functions, classes, and names or attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def _crossings(path: Path, tree: ast.AST, defined_elsewhere: set[str]) -> list[str]:
    here = _defined_private(tree)
    modules = set()  # names bound to one of our modules here
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _ours(node.module, node.level):
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append(f"line {node.lineno}: from {'.' * node.level}{node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name, 0):
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) \
                and node.args[0].id in modules and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            found.append(f"line {node.lineno}: {node.args[0].id}, {node.args[1].value!r}")
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Name) and owner.id in modules:
            found.append(f"line {node.lineno}: {owner.id}.{node.attr}")
        elif node.attr in defined_elsewhere and node.attr not in here:
            found.append(f"line {node.lineno}: .{node.attr} (defined in another of our modules)")
    return found


def test_no_private_name_crosses_modules():
    parsed = {path: ast.parse(path.read_text(), str(path)) for path in _files()}
    defined = {path: _defined_private(tree) for path, tree in parsed.items()}
    problems = []
    for path, tree in parsed.items():
        elsewhere = set().union(*(names for other, names in defined.items() if other != path))
        problems += [f"{path.relative_to(ROOT)} {found}" for found in _crossings(path, tree, elsewhere)]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("from ddpm_fast.sampling import _x\n", ["line 1: from ddpm_fast.sampling import _x"]),
    ("from . import _registry\n", ["line 1: from . import _registry"]),
    ("from ddpm_fast.ops import philox\nphilox._check_seed(1)\n", ["line 2: philox._check_seed"]),
    ("import ddpm_fast.ops._registry as r\n", ["line 1: import ddpm_fast.ops._registry"]),
    ("d.tables_on(1)\nd._on(1)\n", ["line 2: ._on (defined in another of our modules)"]),
    ("from ddpm_fast.ops._registry import choose\n", ["line 1: from ddpm_fast.ops._registry import ..."]),
    ("from .ops._cache import weights_key\n", ["line 1: from .ops._cache import ..."]),
    ("from helpers import _x\n", ["line 1: from helpers import _x"]),
    ("from ddpm_fast import sampling\nmonkeypatch.setattr(sampling, '_x', 1)\n", ["line 2: sampling, '_x'"]),
    ("def _on(): pass\nd._on(1)\nself._y\ntorch._dynamo\nx.__class__\n", []),  # its own; self; not ours
])
def test_the_check_finds_what_it_looks_for(source, expected):
    assert _crossings(Path("x.py"), ast.parse(source), {"_on"}) == expected
