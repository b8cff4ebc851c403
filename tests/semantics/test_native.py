"""Pin Linux's socket behaviour: run every probe program in tests/semantics natively.

Each program (see sem.h for the contract) takes HOST PORT, prints "OK <name>" and exits 0 on
the Linux behaviour. The same programs later run inside a NetKernel tenant through the
LD_PRELOAD shim; reuse PROGRAMS, build_program() and run_program() for that:

    exe = build_program("dup2_onto_socket", out_dir)
    run_program(exe, "10.0.0.2", wrapper=["netkernel", "run", "--tenant", "x", "--"])
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers_c import build_c, build_dir, describe, run_c

SEM_DIR = Path(__file__).resolve().parent

# Every probe program, by name (tests/semantics/<name>.c).
PROGRAMS: list[str] = sorted(p.stem for p in SEM_DIR.glob("*.c"))

HOSTS = ["127.0.0.1", "::1"]
TIMEOUT = 60.0


def build_program(name: str, out_dir: Path) -> Path:
    return build_c(SEM_DIR / f"{name}.c", out_dir)


def run_program(
    exe: Path, host: str, wrapper: Sequence[str] = (), port: int = 0, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run one probe program against host (port 0: it picks), optionally under a wrapper
    command, and assert the Linux behaviour: exit 0 and "OK <name>" on stdout."""
    # build_c names executables <stem>-<flags hash>
    name = re.sub(r"-[0-9a-f]{10}$", "", Path(exe).name)
    proc = run_c([*wrapper, str(exe)], [host, str(port)], timeout=timeout)
    assert proc.returncode == 0, describe(proc)
    assert f"OK {name}" in proc.stdout.splitlines(), describe(proc)
    return proc


def _can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dir(tmp_path_factory)


def test_programs_found() -> None:
    assert len(PROGRAMS) >= 12, PROGRAMS


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", PROGRAMS)
def test_native(name: str, host: str, out_dir: Path) -> None:
    if not _can_bind(host):
        pytest.skip(f"cannot bind {host} here")
    exe = build_program(name, out_dir)
    run_program(exe, host)
