"""mypy --strict and ruff over the Python package, run as tests (as uvloop does)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The source tree: mypy given a path inside site-packages trips over the modules around it.
PACKAGE = ROOT / "src" / "netkernel"
CHECKED = [str(PACKAGE), str(ROOT / "tests" / "conftest.py"), str(ROOT / "tests" / "py")]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (pip install '.[test]')")


def test_mypy_strict() -> None:
    _require("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(PACKAGE)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    _require("ruff")
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *CHECKED], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The formatters the repository is kept in (pyproject.toml [tool.ruff], .clang-format): a change
# that is not formatted fails here, so diffs stay about what changed.
def test_ruff_format() -> None:
    _require("ruff")
    dirs = [str(ROOT / d) for d in ("src", "tests", "scripts", "tools", "examples") if (ROOT / d).is_dir()]
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *dirs], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\nfix with: ruff format " + " ".join(dirs)


def test_clang_format() -> None:
    if shutil.which("clang-format") is None:
        pytest.skip("clang-format not installed (apt-get install clang-format; .ci/run does)")
    files = sorted(str(p) for d in ("csrc", "include", "tests") for p in (ROOT / d).rglob("*.[ch]"))
    proc = subprocess.run(
        ["clang-format", "--dry-run", "-Werror", *files], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + "\nfix with: clang-format -i <file>"
