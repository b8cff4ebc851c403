"""mypy --strict and ruff over the Python package, run as tests (as uvloop does)."""

from __future__ import annotations

import importlib.util
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
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", str(PACKAGE)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    _require("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", *CHECKED],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
