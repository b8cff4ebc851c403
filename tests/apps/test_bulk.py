"""1 GiB TCP transfers each way between a tenant and a peer, IPv4 and IPv6, with the tenant
as the connecting side and as the listening side; sha256 and byte counts must match."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from apputil import PROGS, PY, describe, stop, uname, wait_line, wait_tenant_idle

SIZE = 1 << 30
PORT = 9099
TIMEOUT = 300


def _done(text: str, what: str) -> tuple[str, int]:
    m = re.search(r"^DONE ([0-9a-f]{64}) (\d+)$", text or "", re.M)
    assert m, what
    return m[1], int(m[2])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("tenant_role", ["connect", "listen"])
@pytest.mark.parametrize("direction", ["tenant-to-peer", "peer-to-tenant"])
def test_bulk_1gib(direction, tenant_role, family, nk_daemon, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("bulk"))
    tenant_sends = direction == "tenant-to-peer"
    listener, connector = (t, peer) if tenant_role == "listen" else (peer, t)
    listen_addr = t if tenant_role == "listen" else peer
    addr = listen_addr.ipv4 if family == "ipv4" else listen_addr.ipv6
    listener_sends = tenant_sends == (tenant_role == "listen")
    l_dir, c_dir = ("send", "recv") if listener_sends else ("recv", "send")

    server = listener.popen(
        [PY, "-u", str(PROGS / "bulk.py"), "listen", addr, str(PORT), l_dir, str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = connector.run(
            [PY, str(PROGS / "bulk.py"), "connect", addr, str(PORT), c_dir, str(SIZE)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert client.returncode == 0, describe(client)
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, out, err)
    finally:
        stop(server)
    s_digest, s_n = _done(out.decode(errors="replace"), describe(server, out, err))
    c_digest, c_n = _done(client.stdout, describe(client))
    assert s_n == c_n == SIZE, describe(client) + describe(server, out, err)
    assert s_digest == c_digest, describe(client) + describe(server, out, err)
    wait_tenant_idle(nk_daemon, t.name)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_bulk_1gib_tenant_to_tenant(family, nk_daemon, tenant) -> None:
    a = tenant(uname("bulka"))
    b = tenant(uname("bulkb"))
    addr = a.ipv4 if family == "ipv4" else a.ipv6
    server = a.popen(
        [PY, "-u", str(PROGS / "bulk.py"), "listen", addr, str(PORT), "recv", str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = b.run(
            [PY, str(PROGS / "bulk.py"), "connect", addr, str(PORT), "send", str(SIZE)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert client.returncode == 0, describe(client)
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, out, err)
    finally:
        stop(server)
    s_digest, s_n = _done(out.decode(errors="replace"), describe(server, out, err))
    c_digest, c_n = _done(client.stdout, describe(client))
    assert (s_digest, s_n) == (c_digest, c_n) and s_n == SIZE, describe(client) + describe(server, out, err)
    wait_tenant_idle(nk_daemon, a.name)
    wait_tenant_idle(nk_daemon, b.name)


# The tenant writes N connections' worth and exits at once: every close() finds unsent bytes
# in the rings and the NSM sockets full, so the engine has many sockets to flush, queued for
# service, while their proxies hang up. Linux delivers everything after close(); so must we,
# and then drop every socket. (This found sockets stranded on a cut active list.)
CLOSER = r"""
import socket, sys
addr, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.create_connection((addr, port)) for _ in range(n)]
for i, s in enumerate(socks):
    s.setblocking(False)
sent = [0] * n
while min(sent) < size:
    for i, s in enumerate(socks):
        if sent[i] < size:
            chunk = bytes([i % 251]) * min(65536, size - sent[i])
            try:
                sent[i] += s.send(chunk)
            except BlockingIOError:
                pass
print("SENT", flush=True)
"""

SLOW_SINK = r"""
import json, selectors, socket, sys, time
ls = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=128)
n = int(sys.argv[3])
print("READY", flush=True)
sel = selectors.DefaultSelector()
got = {}
for _ in range(n):
    c, _ = ls.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.setblocking(False)
    sel.register(c, selectors.EVENT_READ)
    got[c] = [0, None]
time.sleep(1)  # let the sender exit with its bytes in flight
left = n
while left:
    for key, _ in sel.select():
        c = key.fileobj
        data = c.recv(16384)
        if not data:
            sel.unregister(c)
            left -= 1
            continue
        st = got[c]
        if st[1] is None:
            st[1] = data[0]
        assert data == bytes([st[1]]) * len(data), "bytes mixed between connections"
        st[0] += len(data)
        time.sleep(0.0002)  # slow reader
print("DONE", json.dumps([sorted(v[0] for v in got.values()), sorted(v[1] for v in got.values())]),
      flush=True)
"""


def test_close_with_unsent_bytes_on_many_sockets(nk_daemon, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("closer"))
    n, size = 40, 1 << 21
    sink = peer.popen(
        [PY, "-u", "-c", SLOW_SINK, peer.ipv4, str(PORT), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(sink, r"^READY")
        sender = t.run(
            [PY, "-c", CLOSER, peer.ipv4, str(PORT), str(n), str(size)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sender.returncode == 0 and "SENT" in sender.stdout, describe(sender)
        out, err = sink.communicate(timeout=120)
        assert sink.returncode == 0, describe(sink, out, err)
    finally:
        stop(sink)
    m = re.search(r"^DONE (.*)$", out.decode(), re.M)
    assert m, describe(sink, out, err)
    sizes, marks = json.loads(m[1])
    assert sizes == [size] * n  # every byte of every connection arrived
    assert marks == sorted(i % 251 for i in range(n))  # each its own
    wait_tenant_idle(nk_daemon, t.name)
