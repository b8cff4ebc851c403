"""Build and run the C test programs (tests/c, tests/semantics) from pytest.

A C program reports through its exit status: 0 pass, 77 skip (liburing's runner convention),
anything else fail. Builds are cached by source mtime and flags, so one session compiles each
program once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parent.parent
INCLUDE = REPO / "include"
SKIP_EXIT = 77

BASE_FLAGS = (
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-D_GNU_SOURCE",
    f"-I{INCLUDE}",
    "-pthread",
)


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    return cc


def make_reachable(path: Path) -> Path:
    """Let a tenant's users (unprivileged on the host) reach ``path``: every directory on the
    way may be searched by others, and ``path`` itself read (and entered, if a directory).
    pytest makes its temp directories 0700; tenants see host files as any other user does."""
    path = Path(path).resolve()
    for d in reversed(path.parents):
        _add_mode(d, 0o001)
    st = path.stat()
    _add_mode(path, 0o005 if path.is_dir() or st.st_mode & 0o100 else 0o004)
    return path


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode & 0o7777
    if mode | bits != mode:
        os.chmod(path, mode | bits)


def build_c(src: Path, out_dir: Path, extra_flags: Sequence[str] = ()) -> Path:
    """Compile src into out_dir, reusing an earlier build when nothing changed; tenants may run
    the result (make_reachable).

    The output name carries a hash of the flags, so the same source built with and without
    sanitizers yields two executables side by side.
    """
    src = Path(src).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_reachable(out_dir)
    cc = compiler()
    flags = [*BASE_FLAGS, *extra_flags]
    tag = hashlib.sha1(" ".join([cc, *flags]).encode()).hexdigest()[:10]
    exe = out_dir / f"{src.stem}-{tag}"
    deps = [src, *INCLUDE.rglob("*.h")]
    newest = max(p.stat().st_mtime for p in deps)
    if exe.exists() and exe.stat().st_mtime >= newest:
        return make_reachable(exe)
    cmd = [cc, *flags, "-o", str(exe), str(src)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"compile failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return make_reachable(exe)


def cc_supports(flags: Sequence[str], out_dir: Path) -> bool:
    """True when the compiler can build and run a trivial program with these flags."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = out_dir / ("probe-" + hashlib.sha1(" ".join(flags).encode()).hexdigest()[:10])
    try:
        if (
            subprocess.run(
                [compiler(), *flags, "-o", str(exe), str(src)], check=False, capture_output=True
            ).returncode
            != 0
        ):
            return False
        return subprocess.run([str(exe)], check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_c(
    exe: Path | Sequence[str],
    args: Sequence[str] = (),
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a test program; exit 77 becomes pytest.skip, a timeout a failure.

    exe may be a command prefix (a list) so callers can wrap the program, e.g. in a tenant.
    Returns the completed process; the caller asserts on returncode and output.
    """
    cmd = [str(exe)] if isinstance(exe, (str, Path)) else [str(a) for a in exe]
    cmd += [str(a) for a in args]
    # Own session, so a timeout kills the program's forked children too (they would
    # otherwise hold the output pipes open and hang communicate()).
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p.pid)
        out, err = p.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    finally:
        _kill_group(p.pid)
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if proc.returncode == SKIP_EXIT:
        pytest.skip(f"{' '.join(cmd)}: {(proc.stdout + proc.stderr).strip()}")
    return proc


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    args = proc.args if isinstance(proc.args, list) else [proc.args]
    return (
        f"{' '.join(map(str, args))} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The per-session build cache: one folder under pytest's base temp dir."""
    d = tmp_path_factory.getbasetemp() / "cbuild"
    d.mkdir(parents=True, exist_ok=True)
    return d


SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")


def engine_sources() -> list[str]:
    """The engine's C sources: csrc/engine and every NSM kind in csrc/nsm (each registers
    itself, so a test build may add one more file)."""
    return sorted(map(str, (REPO / "csrc" / "engine").glob("*.c"))) + sorted(
        map(str, (REPO / "csrc" / "nsm").glob("*.c"))
    )


def start_engine(
    engine: Path, tmp: Path, log: IO[str], env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.Popen[bytes]:
    """Start an engine binary on its own control and admin sockets in tmp (engine.sock,
    admin.sock), outside any daemon; returns once it answers."""
    proc = subprocess.Popen(
        [str(engine), "--control", str(tmp / "engine.sock"), "--admin", str(tmp / "admin.sock")],
        stderr=log,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while not (tmp / "admin.sock").exists():
        if proc.poll() is not None:
            raise AssertionError(f"engine exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("engine did not start")
        time.sleep(0.1)
    return proc


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def engine_admin(path: Path, line: str) -> str:
    """One request on an engine's admin socket; its reply up to the "ok"/"err" line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        data = b""
        while not any(x.startswith((b"ok", b"err")) for x in data.splitlines()):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode()
