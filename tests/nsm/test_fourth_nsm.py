"""A new kind of NSM is one file: the engine needs nothing but its endpoint interface.

tests/nsm/refuse_nsm.c defines "refuse:ERRNO", an NSM that refuses every connection with
ERRNO. It is linked into a test build of the engine beside csrc/engine and csrc/nsm, unchanged,
and registers itself. The engine runs outside the daemon on namespaces of its own (nkr-*),
with an unmodified program in a tenant: connects through the new NSM fail with its errno,
while the same socket calls on the tenant's loopback (the kernel kind) work, in one engine.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers_c import compiler, engine_admin, engine_sources, start_engine, stop_engine  # noqa: E402

from netkernel import config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
NSM_NS, TENANT_NS = "nkr-nsm", "nkr-t"
V4, V6 = "198.51.100.41", "fd00:5b::41"
CHOSEN = errno.EHOSTUNREACH  # what the refuse NSM answers: not anything Linux would say here


def teardown_namespaces() -> None:
    for ns in (NSM_NS, TENANT_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Engine:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.admin = tmp / "admin.sock"

    def request(self, line: str) -> str:
        return engine_admin(self.admin, line)

    def run(self, code: str) -> subprocess.CompletedProcess[str]:
        """Python code in the tenant, with GuestLib preloaded: its sockets are the engine's."""
        guest = config.libdir() / "libnetkernel.so"
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                TENANT_NS,
                "env",
                f"LD_PRELOAD={guest}",
                f"NETKERNEL_SOCKET={self.tmp / 'engine.sock'}",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    if not (config.libdir() / "libnetkernel.so").exists():
        pytest.skip("GuestLib is not built (pip install .)")
    tmp = tmp_path_factory.mktemp("fourth-nsm")
    binary = tmp / "netkernel-engine-refuse"
    subprocess.run(
        [
            compiler(),
            "-O1",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-D_GNU_SOURCE",
            f"-I{REPO / 'include'}",
            f"-I{REPO / 'csrc' / 'engine'}",
            "-o",
            str(binary),
            *engine_sources(),
            str(REPO / "tests" / "nsm" / "refuse_nsm.c"),
            "-lpthread",
        ],
        check=True,
    )
    teardown_namespaces()
    for ns in (NSM_NS, TENANT_NS):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    log = open(tmp / "engine.log", "w")
    proc = start_engine(binary, tmp, log)
    try:
        e = Engine(tmp)
        r = e.request(f"nsm-add refusing /run/netns/{NSM_NS} refuse:{CHOSEN}")
        assert r.startswith("ok"), r
        r = e.request(f"tenant-add t /run/netns/{TENANT_NS} refusing {V4} {V6}")
        assert r.startswith("ok"), r
        yield e
        assert proc.poll() is None, "engine died:\n" + (tmp / "engine.log").read_text()[-4000:]
    finally:
        stop_engine(proc)
        log.close()
        teardown_namespaces()


def test_the_new_kind_is_registered(engine: Engine) -> None:
    nsms = engine.request("stats")
    assert "nsm refusing type=refuse" in nsms, nsms


def test_an_unknown_kind_or_a_bad_argument_is_refused(engine: Engine) -> None:
    assert engine.request(f"nsm-add x /run/netns/{NSM_NS} refuse").startswith("err")
    assert engine.request(f"nsm-add x /run/netns/{NSM_NS} nosuchkind").startswith("err")
    assert "nsm x " not in engine.request("stats")


@pytest.mark.parametrize("dst", ["192.0.2.7", "2001:db8::7"])
def test_connect_gets_the_nsms_errno(engine: Engine, dst: str) -> None:
    code = f"""
import socket, sys
fam = socket.AF_INET6 if ":" in {dst!r} else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
try:
    s.connect(({dst!r}, 80))
except OSError as e:
    print("ERRNO", e.errno)
    sys.exit(0)
print("CONNECTED")
"""
    proc = engine.run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ERRNO", str(CHOSEN)], proc.stdout + proc.stderr


def test_listen_gets_the_nsms_errno_and_loopback_still_works(engine: Engine) -> None:
    """One program, two kinds of endpoint: a wildcard listener needs the NSM (which refuses),
    a loopback one only the kernel's loopback in the tenant, where a checksummed echo runs."""
    code = """
import hashlib, os, socket, threading
s = socket.socket()
s.bind(("0.0.0.0", 0))
try:
    s.listen()
    print("LISTENING")
except OSError as e:
    print("LISTEN", e.errno)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
data = os.urandom(1 << 20)
def serve():
    c, _ = srv.accept()
    got = b""
    while len(got) < len(data):
        got += c.recv(65536)
    c.sendall(hashlib.sha256(got).digest())
    c.close()
t = threading.Thread(target=serve)
t.start()
cl = socket.create_connection(("127.0.0.1", port))
cl.sendall(data)
digest = b""
while len(digest) < 32:
    digest += cl.recv(32)
t.join()
print("ECHO", digest == hashlib.sha256(data).digest())
"""
    proc = engine.run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["LISTEN", str(CHOSEN), "ECHO", "True"], proc.stdout + proc.stderr
