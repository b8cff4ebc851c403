"""The SPSC byte ring (include/netkernel/ring.h): unit tests and a cross-process stress test,
both C programs under tests/c, plain and under ASan+UBSan."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers_c import SANITIZE_FLAGS, build_c, build_dir, cc_supports, describe, run_c

C_DIR = Path(__file__).resolve().parent / "c"
STRESS_SECONDS = os.environ.get("NETKERNEL_STRESS_SECONDS", "2")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def sanitize(out_dir: Path) -> tuple[str, ...]:
    if not cc_supports(SANITIZE_FLAGS, out_dir / "probe"):
        pytest.skip("compiler cannot build and run with -fsanitize=address,undefined")
    return SANITIZE_FLAGS


def _check(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, describe(proc)


def test_ring_unit(out_dir: Path) -> None:
    exe = build_c(C_DIR / "ring_unit.c", out_dir)
    proc = run_c(exe, timeout=60)
    _check(proc)
    assert "OK ring_unit" in proc.stdout


def test_ring_unit_sanitized(out_dir: Path, sanitize: tuple[str, ...]) -> None:
    exe = build_c(C_DIR / "ring_unit.c", out_dir, sanitize)
    proc = run_c(exe, timeout=120)
    _check(proc)


@pytest.mark.parametrize("variant", ["process", "thread"])
def test_ring_stress(out_dir: Path, variant: str) -> None:
    exe = build_c(C_DIR / "ring_stress.c", out_dir)
    proc = run_c(exe, [STRESS_SECONDS, variant], timeout=float(STRESS_SECONDS) + 60)
    _check(proc)
    assert f"{variant}:" in proc.stdout and "OK ring_stress" in proc.stdout
    print(proc.stdout.strip())


def test_ring_stress_thread_sanitized(out_dir: Path, sanitize: tuple[str, ...]) -> None:
    exe = build_c(C_DIR / "ring_stress.c", out_dir, sanitize)
    proc = run_c(exe, [STRESS_SECONDS, "thread"], timeout=float(STRESS_SECONDS) + 90)
    _check(proc)
