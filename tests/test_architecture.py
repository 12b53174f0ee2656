"""The architecture as the README draws it: layers that import one way (import-linter's contracts in pyproject.toml),
no import cycles, and no imports hidden inside functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mtpquant"
# Imports allowed inside a function: optional heavy dependencies, each with the reason.
LAZY_OK: dict[str, str] = {}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 2 kept, 0 broken." in run.stdout


def test_a_wrong_way_import_breaks_the_contract(tmp_path):
    """core importing the pipeline (a layer far above it) is caught, naming the offending import."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "mtpquant", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    errors = copy / "mtpquant" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom mtpquant.pipeline import build  # noqa: E402,F401\n")
    run = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                          "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache"],
                         cwd=copy, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "BROKEN" in run.stdout and "mtpquant.core.errors -> mtpquant.pipeline.build" in run.stdout


def _function_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    found.append((sub.lineno, sub.module or ""))
                elif isinstance(sub, ast.Import):
                    found += [(sub.lineno, alias.name) for alias in sub.names]
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_imports_inside_functions(path):
    """Every dependency shows at the top of its module, where the linter and a reader see it."""
    hidden = [f"{path.relative_to(REPO)}:{line}: {mod}" for line, mod in _function_imports(path)
              if mod.split(".")[0] not in LAZY_OK]
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)
