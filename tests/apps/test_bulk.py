"""1 GiB TCP transfers each way between a tenant and a peer, IPv4 and IPv6, with the tenant
as the connecting side and as the listening side; sha256 and byte counts must match."""

from __future__ import annotations

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
    listen_addr = (t if tenant_role == "listen" else peer)
    addr = listen_addr.ipv4 if family == "ipv4" else listen_addr.ipv6
    listener_sends = tenant_sends == (tenant_role == "listen")
    l_dir, c_dir = ("send", "recv") if listener_sends else ("recv", "send")

    server = listener.popen([PY, "-u", str(PROGS / "bulk.py"), "listen", addr, str(PORT), l_dir, str(SIZE)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_line(server, r"^READY")
        client = connector.run([PY, str(PROGS / "bulk.py"), "connect", addr, str(PORT), c_dir, str(SIZE)],
                               capture_output=True, text=True, timeout=TIMEOUT)
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
    server = a.popen([PY, "-u", str(PROGS / "bulk.py"), "listen", addr, str(PORT), "recv", str(SIZE)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_line(server, r"^READY")
        client = b.run([PY, str(PROGS / "bulk.py"), "connect", addr, str(PORT), "send", str(SIZE)],
                       capture_output=True, text=True, timeout=TIMEOUT)
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
