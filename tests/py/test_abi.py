"""The Python view of the ABI constants is generated from the C header and matches it."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(path: Path) -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("abi_fresh", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: v for k, v in vars(mod).items() if k.startswith("NK_")}


def test_generated_constants(tmp_path: Path) -> None:
    out = tmp_path / "_abi.py"
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_abi.py"),
                    str(REPO / "include" / "netkernel" / "abi.h"), str(out)], check=True)
    fresh = load(out)
    # Values the C side pins with static asserts or uses on the wire.
    assert fresh["NK_REGION_MAGIC"] == int.from_bytes(b"NKRG", "big")
    assert fresh["NK_MSG_READY"] == ord("R")
    assert fresh["NK_DEFAULT_RING_SIZE"] == 1024 * 1024
    assert fresh["NK_OP_REGISTER"] == 1


def test_installed_matches_header(tmp_path: Path) -> None:
    try:
        _abi = importlib.import_module("netkernel._abi")
    except ImportError:
        pytest.skip("netkernel is not installed from a build (no generated _abi)")
    out = tmp_path / "_abi.py"
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_abi.py"),
                    str(REPO / "include" / "netkernel" / "abi.h"), str(out)], check=True)
    installed = {k: v for k, v in vars(_abi).items() if k.startswith("NK_")}
    assert installed == load(out), "installed package is stale: pip install . again"
