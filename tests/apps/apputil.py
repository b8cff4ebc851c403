"""Helpers shared by the real-application tests (tests/apps).

Imported as ``from apputil import ...`` (pytest puts tests/apps on sys.path: no __init__.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROGS = Path(__file__).resolve().parent / "progs"
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable  # a tenant reaches it
LOG = Path("/var/log/netkernel.log")


def uname(prefix: str) -> str:
    """A unique tenant name (the tenant fixture deletes it)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_random_file(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    os.chmod(path, 0o644)
    return sha256_file(path)


def log_tail(n: int = 40) -> str:
    try:
        lines = LOG.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no engine log: {e})"
    return "\n".join(lines[-n:])


def describe(
    proc: subprocess.CompletedProcess[Any] | subprocess.Popen[Any], out: Any = None, err: Any = None
) -> str:
    """Everything useful about a finished process, plus the engine log tail."""
    args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
    if isinstance(proc, subprocess.CompletedProcess):
        out, err = proc.stdout, proc.stderr
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    return (
        f"\n$ {args}\nexit {proc.returncode}\n--- stdout\n{(out or '')[-4000:]}\n"
        f"--- stderr\n{(err or '')[-4000:]}\n--- /var/log/netkernel.log (tail)\n{log_tail()}\n"
    )


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[Any, Any]:
    """Stop a background process politely, then firmly; return (stdout, stderr)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=timeout)


def wait_line(proc: subprocess.Popen[Any], pattern: str, timeout: float = 20) -> str:
    """Read proc's stdout until a line matches ``pattern``; fail if it exits or times out.

    Reads the pipe's file descriptor directly (no Python-level buffering, which would hide
    lines from select); whatever follows stays unread in the pipe or is dropped."""
    import selectors

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            # Whole lines only: a read can end in the middle of one ("ERROR Connection").
            for line in buf.decode(errors="replace").split("\n")[:-1]:
                if re.search(pattern, line):
                    return line
    finally:
        sel.close()
    out, err = stop(proc)
    raise AssertionError(
        f"no line matching {pattern!r} within {timeout}s; stdout so far:\n"
        f"{buf.decode(errors='replace')}" + describe(proc, out, err)
    )


def retry(fn: Callable[[], bool], timeout: float = 10, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(interval)
    return False


def tenant_wait_port(tenant: Any, host: str, port: int, timeout: float = 15) -> None:
    """Poll from inside ``tenant`` (through NetKernel) until host:port accepts."""
    code = (
        "import socket,sys,time\n"
        f"h,p,t={host!r},{port},{timeout}\n"
        "fam=socket.AF_INET6 if ':' in h else socket.AF_INET\n"
        "end=time.monotonic()+t\n"
        "while time.monotonic()<end:\n"
        "    s=socket.socket(fam,socket.SOCK_STREAM); s.settimeout(1)\n"
        "    try:\n"
        "        s.connect((h,p)); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "    finally:\n"
        "        s.close()\n"
        "sys.exit(1)\n"
    )
    proc = tenant.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout + 30)
    assert proc.returncode == 0, f"{host}:{port} not accepting in tenant {tenant.name}" + describe(proc)


def run_checked(
    runner: Any, cmd: Sequence[str], timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """runner.run(cmd) with captured text output; assert exit 0 with a full description."""
    proc = runner.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, describe(proc)
    return proc


def wait_tenant_idle(daemon: Any, name: str, timeout: float = 15) -> None:
    """After a tenant's programs have exited, the engine must drop all their sockets and pids
    (no leaked proxy fds or NSM sockets). Polls `netkernel ps`."""
    info: dict[str, Any] = {}

    def idle() -> bool:
        nonlocal info
        info = daemon.tenant_info(name)
        return info["sockets"] == 0 and not info["pids"]

    assert retry(idle, timeout=timeout, interval=0.25), (
        f"tenant {name} not idle after {timeout}s: {info}\n{log_tail()}"
    )
