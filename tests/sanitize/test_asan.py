"""The engine and GuestLib built with AddressSanitizer and UBSan, under the semantics probes
and a hostile tenant.

This runs on a private fabric of its own (bridge nks0, TEST-NET-2 addresses, namespaces
nks-*), with the sanitized engine started directly and configured over its admin socket, so
it does not need (or disturb) the daemon. Any sanitizer report in the engine's log fails it.
ASan cannot see another process write shared memory, which is why the engine validates every
index and record it reads from a region explicitly (tests/c/scribble.c drives that).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "semantics"))
from helpers_c import (  # noqa: E402
    build_c,
    cc_supports,
    compiler,
    engine_admin,
    engine_sources,
    start_engine,
    stop_engine,
)
from test_native import PROGRAMS, build_program, run_program  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
KNOWN_GAPS = {"udp_basic"}  # see tests/semantics/test_tenant.py
BRIDGE, NSM, TEN = "nks0", "nks-nsm", "nks-t"
V4, V6 = "198.51.100.11", "fd00:5a::11"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def teardown_fabric() -> None:
    for ns in (NSM, TEN):
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    subprocess.run(["ip", "link", "del", "nksv"], capture_output=True)


def build_sanitized(out: Path) -> tuple[Path, Path]:
    inc = [f"-I{REPO / 'include'}", "-D_GNU_SOURCE"]
    engine = out / "netkernel-engine-asan"
    subprocess.run(
        [compiler(), *SAN, *inc, f"-I{REPO / 'csrc' / 'engine'}", "-o", str(engine), *engine_sources()],
        check=True,
    )
    guest = out / "libnetkernel-asan.so"
    gsrcs = sorted(map(str, (REPO / "csrc" / "guest").glob("*.c")))
    subprocess.run(
        [
            compiler(),
            *SAN,
            *inc,
            f"-I{REPO / 'csrc' / 'guest'}",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-o",
            str(guest),
            *gsrcs,
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    return engine, guest


class Fabric:
    def __init__(self, tmp: Path, guest: Path) -> None:
        self.tmp = tmp
        self.ctl = tmp / "engine.sock"
        asan = subprocess.run(
            [compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True
        ).stdout.strip()
        self.env = [
            "env",
            f"LD_PRELOAD={asan}:{guest}",
            f"NETKERNEL_SOCKET={self.ctl}",
            "ASAN_OPTIONS=detect_leaks=0",
        ]

    def wrapper(self) -> list[str]:
        return ["ip", "netns", "exec", TEN, *self.env]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    tmp = tmp_path_factory.mktemp("asan")
    if not cc_supports(SAN, tmp):
        pytest.skip("compiler cannot build with ASan/UBSan here")
    engine, guest = build_sanitized(tmp)
    teardown_fabric()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", "198.51.100.1/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    sh("ip", "netns", "add", NSM)
    sh("ip", "link", "add", "nksv", "type", "veth", "peer", "name", "eth0", "netns", NSM)
    sh("ip", "link", "set", "nksv", "master", BRIDGE, "up")
    sh("ip", "-n", NSM, "addr", "add", "198.51.100.2/24", "dev", "eth0")
    sh("ip", "-n", NSM, "addr", "add", f"{V4}/32", "dev", "eth0")
    sh("ip", "-n", NSM, "addr", "add", f"{V6}/128", "dev", "eth0", "nodad")
    sh("ip", "-n", NSM, "link", "set", "eth0", "up")
    sh("ip", "-n", NSM, "link", "set", "lo", "up")
    sh("ip", "netns", "add", TEN)
    sh("ip", "-n", TEN, "link", "set", "lo", "up")
    log = open(tmp / "engine.log", "w")
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
    )
    proc = start_engine(engine, tmp, log, env)
    try:
        assert engine_admin(tmp / "admin.sock", f"nsm-add kernel /run/netns/{NSM}").startswith("ok")
        r = engine_admin(tmp / "admin.sock", f"tenant-add t /run/netns/{TEN} kernel {V4} {V6}")
        assert r.startswith("ok"), r
        f = Fabric(tmp, guest)
        f.proc = proc  # type: ignore[attr-defined]
        yield f
        assert proc.poll() is None, "sanitized engine died:\n" + (tmp / "engine.log").read_text()[-4000:]
    finally:
        stop_engine(proc)
        log.close()
        teardown_fabric()
    text = (tmp / "engine.log").read_text()
    assert "ERROR: AddressSanitizer" not in text and "runtime error:" not in text, text[-6000:]


@pytest.mark.parametrize("host", ["127.0.0.1", V4, "::1", V6])
@pytest.mark.parametrize("name", [p for p in PROGRAMS if p not in KNOWN_GAPS])
def test_probe_sanitized(
    fabric: Fabric, name: str, host: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    exe = build_program(name, tmp_path_factory.getbasetemp() / "asan-progs")
    proc = run_program(exe, host, wrapper=fabric.wrapper())
    assert "AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, proc.stderr


def test_scribble_sanitized(fabric: Fabric, tmp_path: Path) -> None:
    exe = build_c(REPO / "tests" / "c" / "scribble.c", tmp_path)
    # A sink on the bridge address for the scribbler's connections.
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("198.51.100.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    try:
        p = subprocess.Popen(
            [*fabric.wrapper(), str(exe), "198.51.100.1", str(port), "4"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()  # it may wedge its own sockets: that is allowed
            p.wait()
    finally:
        srv.close()
    assert fabric.proc.poll() is None  # type: ignore[attr-defined]
    # The engine still serves the tenant after the garbage.
    exe2 = build_program("sendfile_socket", tmp_path)
    run_program(exe2, V4, wrapper=fabric.wrapper())
