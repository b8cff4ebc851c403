"""An external NSM is untrusted too (issue 6; DESIGN §D).

A fake NSM speaks ServiceLib to the engine from this test process: it answers the engine's
requests well enough for a tenant's connect() to get going, then writes garbage into its event
queue (socket ids out of range, unknown opcodes, byte counts beyond the credit the engine
gave, FREED for sockets never closed, connections on listeners that do not exist, datagrams
out of step with their area). Each time the engine must drop that NSM with a protocol error,
fail the tenant's connection the way Linux fails it (ECONNREFUSED while connecting), keep
running, and let another tenant on the kernel NSM finish a checksummed transfer meanwhile.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import PY, describe, uname  # noqa: E402
from conftest import Daemon, Peer, Tenant  # noqa: E402
from test_hostile import transfer  # noqa: E402

from netkernel.config import ADMIN_SOCKET, RUN_DIR  # noqa: E402
from netkernel.engine import EngineClient  # noqa: E402

# include/netkernel/servicelib.h
NQE = struct.Struct("<HHIIiIIQHHI16sII")
CTL = struct.Struct("<IIIIQ24s24s64s")
QUEUE_LEN = 4096
QUEUE_BYTES = 3 * 64 + QUEUE_LEN * NQE.size
REQ, REP, EVT = 64, 64 + QUEUE_BYTES, 64 + 2 * QUEUE_BYTES
SLQ_SOCKET, SLQ_BIND, SLQ_LISTEN, SLQ_CONNECT = 1, 2, 3, 4
SLR_DONE = 32
SLE_CONNECTED, SLE_ACCEPTED, SLE_SENT, SLE_RECVD, SLE_FREED, SLE_DGRAM = 64, 65, 66, 67, 70, 71
SOCK = 7  # the id the fake NSM gives the tenant's socket


# The engine serves an external NSM only to root in that NSM's namespace: a helper process
# there connects (and waits until the engine has taken it) and hands the socket over.
CONNECT_IN_NETNS = """import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.recv(1, socket.MSG_PEEK)
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"x"], [s.fileno()])
"""


def connect_in_netns(netns: str, path: str) -> socket.socket:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with mine, theirs:
        subprocess.run(
            ["ip", "netns", "exec", netns, PY, "-c", CONNECT_IN_NETNS, path, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            check=True,
            timeout=30,
        )
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    return socket.socket(fileno=fds[0])


class FakeNSM:
    """One connection to the engine, as an NSM process would make it."""

    def __init__(self, path: str, netns: str = "nk-nsm-kernel") -> None:
        self.ctl = connect_in_netns(netns, path)
        self.ctl.settimeout(5)
        msg, fds, _, _ = socket.recv_fds(self.ctl, CTL.size, 3)
        op, version, _, _, size, _, _, _ = CTL.unpack(msg)
        assert op == 1 and version == 1 and len(fds) == 3, (op, version, fds)
        self.mem = mmap.mmap(fds[0], size)
        os.close(fds[0])
        self.nsm_bell, self.engine_bell = fds[1], fds[2]

    def close(self) -> None:
        self.ctl.close()
        self.mem.close()
        os.close(self.nsm_bell)
        os.close(self.engine_bell)

    def _index(self, q: int, which: int) -> int:
        return int(struct.unpack_from("<I", self.mem, q + 64 * which)[0])

    def pop(self, q: int) -> tuple[Any, ...] | None:
        head, tail = self._index(q, 0), self._index(q, 1)
        if head == tail:
            return None
        e = NQE.unpack_from(self.mem, q + 192 + (tail % QUEUE_LEN) * NQE.size)
        struct.pack_into("<I", self.mem, q + 64, tail + 1)
        return e

    def push(
        self,
        q: int,
        op: int,
        tag: int = 0,
        sock: int = 0,
        arg: int = 0,
        length: int = 0,
        off: int = 0,
        family: int = 0,
    ) -> None:
        head = self._index(q, 0)
        NQE.pack_into(
            self.mem,
            q + 192 + (head % QUEUE_LEN) * NQE.size,
            op,
            0,
            tag,
            sock,
            arg,
            length,
            0,
            off,
            family,
            0,
            0,
            b"\0" * 16,
            0,
            0,
        )
        struct.pack_into("<I", self.mem, q, head + 1)
        os.write(self.engine_bell, (1).to_bytes(8, "little"))

    def requests(self, timeout: float) -> Iterator[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.pop(REQ)
            if e is not None:
                yield e
                continue
            select.select([self.nsm_bell], [], [], 0.05)
            try:
                os.read(self.nsm_bell, 8)
            except BlockingIOError:
                pass

    def gone(self, timeout: float = 5) -> bool:
        """The engine closed our control connection."""
        self.ctl.settimeout(timeout)
        try:
            while self.ctl.recv(4096):  # control messages (TENANT_ADD) before the hang-up
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def serve_until_connect(fake: FakeNSM) -> None:
    """Answer SOCKET, BIND and CONNECT for one outgoing connection."""
    for e in fake.requests(timeout=15):
        op, tag = e[0], e[2]
        if op == SLQ_SOCKET:
            fake.push(REP, SLR_DONE, tag=tag, sock=SOCK)
        elif op in (SLQ_BIND, SLQ_LISTEN):
            fake.push(REP, SLR_DONE, tag=tag, sock=SOCK)
        elif op == SLQ_CONNECT:
            fake.push(REP, SLR_DONE, tag=tag, sock=SOCK)
            return
    raise AssertionError("the engine never asked the fake NSM to connect")


# Garbage, each after the tenant's connect() reached the fake NSM. (name, events to post)
GARBAGE: list[tuple[str, list[dict[str, int]]]] = [
    ("socket_id", [{"op": SLE_CONNECTED, "sock": 1 << 20}]),
    ("opcode", [{"op": 999, "sock": SOCK}]),
    ("unknown_socket", [{"op": SLE_SENT, "sock": SOCK + 1, "length": 10}]),
    ("freed_unknown", [{"op": SLE_FREED, "sock": SOCK}]),
    ("accepted_listener", [{"op": SLE_ACCEPTED, "sock": SOCK + 2, "arg": SOCK + 3}]),
    ("sent_len", [{"op": SLE_CONNECTED, "sock": SOCK}, {"op": SLE_SENT, "sock": SOCK, "length": 1 << 30}]),
    ("recvd_len", [{"op": SLE_CONNECTED, "sock": SOCK}, {"op": SLE_RECVD, "sock": SOCK, "length": 1 << 30}]),
    ("dgram_area", [{"op": SLE_DGRAM, "sock": SOCK, "off": 12345, "length": 100}]),
]

CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 80), timeout=20)
    print("CONNECTED", flush=True)
    s.recv(10)
    print("EOF", flush=True)
except OSError as e:
    print("ERROR", type(e).__name__, flush=True)
"""


@pytest.fixture
def fake_nsm(nk_daemon: Daemon, tenant: Callable[..., Tenant]) -> Iterator[tuple[str, Tenant, EngineClient]]:
    """A tenant moved (in the engine only) onto an external NSM that this test plays."""
    engine = EngineClient(ADMIN_SOCKET)
    name, path = "fakensm", str(RUN_DIR / "nsm-fakensm-test.sock")
    engine.nsm_add(name, "/run/netns/nk-nsm-kernel", path)  # where FakeNSM connects from
    t = tenant(uname("fk"))
    kernel = next(n.name for n in engine.stats().nsms if n.name != name)
    engine.tenant_move(t.name, name)
    try:
        yield path, t, engine
    finally:
        engine.tenant_move(t.name, kernel)
        engine.tenant_move_done(t.name)
        engine.nsm_del(name)


def test_engine_drops_an_nsm_that_writes_garbage(
    fake_nsm: tuple[str, Tenant, EngineClient], tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    path, t, engine = fake_nsm
    peer = peer_ns()
    bystander = tenant(uname("by"))
    errors: list[BaseException] = []

    def keep_transferring() -> None:
        try:
            for i in range(3):
                transfer(bystander, peer, 64, 7600 + i)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    background = threading.Thread(target=keep_transferring)
    background.start()
    try:
        for reason, events in GARBAGE:
            fake = FakeNSM(path)
            try:
                app = t.popen(
                    [PY, "-u", "-c", CONNECT, peer.ipv4],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                serve_until_connect(fake)
                for ev in events:
                    fake.push(EVT, **ev)
                assert fake.gone(), f"{reason}: the engine kept an NSM that wrote garbage"
                out, err = app.communicate(timeout=20)
                # Connecting when the NSM went: refused, as Linux refuses; once connected
                # (sent_len / recvd_len post CONNECTED first): reset.
                assert (
                    "ERROR ConnectionRefusedError" in out
                    or "ERROR ConnectionResetError" in out
                    or ("CONNECTED" in out and "EOF" in out)
                ), (reason, describe(app, out, err))
                assert any(n.name == "fakensm" and not n.up for n in engine.stats().nsms), reason
            finally:
                fake.close()
        log = subprocess.run(
            ["tail", "-n", "400", "/var/log/netkernel.log"], capture_output=True, text=True
        ).stdout
        for reason, _ in GARBAGE:
            assert f"reason={reason}" in log, reason
    finally:
        background.join(timeout=300)
    assert not errors, errors
    assert engine.stats().tenant(bystander.name) is not None  # the engine is alive


def test_reply_flood_does_not_hold_the_engine(
    fake_nsm: tuple[str, Tenant, EngineClient], tenant: Callable[..., Tenant]
) -> None:
    """The engine waits for the NSM's reply to a few calls (socket, bind, connect). An NSM that
    sets its reply queue's head far ahead (a queue 2^31 entries long, none of them the answer)
    must not keep the engine popping: after a queue's worth it is a protocol error, the NSM is
    dropped, and another tenant's program gets its sockets from the engine meanwhile."""
    path, t, engine = fake_nsm
    other = tenant(uname("nb"))
    fake = FakeNSM(path)
    try:
        app = t.popen(
            [PY, "-u", "-c", CONNECT, "198.19.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for e in fake.requests(timeout=15):
            if e[0] == SLQ_SOCKET:
                tail = fake._index(REP, 1)
                struct.pack_into("<I", fake.mem, REP, (tail + (1 << 31)) & 0xFFFFFFFF)
                os.write(fake.engine_bell, (1).to_bytes(8, "little"))
                break
        t0 = time.monotonic()
        r = other.run(
            [PY, "-c", "import socket; socket.socket().bind(('127.0.0.1', 0)); print('ok')"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert took < 5, f"a neighbour waited {took:.1f} s behind the flooding NSM"
        assert fake.gone(), "the engine kept an NSM that flooded its reply queue"
        out, err = app.communicate(timeout=30)
        assert "ERROR" in out, describe(app, out, err)
    finally:
        fake.close()
    log = subprocess.run(
        ["tail", "-n", "200", "/var/log/netkernel.log"], capture_output=True, text=True
    ).stdout
    assert "reason=reply_flood" in log
