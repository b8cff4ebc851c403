"""Isolation: a tenant has no path around NetKernel (decision E in DESIGN.md).

- a process without GuestLib (env -u LD_PRELOAD, as a static or Go program is) still reaches
  peers only through NetKernel: its TCP connections go through the tenant's relay, leave from
  the tenant's address, and show in `netkernel conns`; so does its UDP;
- a raw socket cannot reach the peer;
- tenant loopback is private: a server on 127.0.0.1 / ::1 in tenant A is reachable from A but
  refused from tenant B and from the NSM namespace's loopback.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from apputil import PROGS, PY, describe, run_checked, stop, uname, wait_line
from conftest import nk, wait_port

PORT = 7171


def probe(runner, host: str, port: int, kind: str = "tcp", no_preload: bool = False) -> str:
    cmd = [PY, str(PROGS / "connect_probe.py"), host, str(port), kind]
    if no_preload:
        cmd = ["env", "-u", "LD_PRELOAD", *cmd]
    proc = run_checked(runner, cmd, timeout=60)
    return proc.stdout.strip()


@pytest.fixture
def peer_with_server(peer_ns):
    peer = peer_ns()
    servers = []
    for addr in (peer.ipv4, peer.ipv6):
        s = peer.popen(
            [PY, "-u", str(PROGS / "echo_server.py"), addr, str(PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_line(s, r"^READY")
        servers.append(s)
    yield peer
    for s in servers:
        stop(s)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_without_guestlib_only_through_netkernel(family, tenant, peer_ns, nk_daemon) -> None:
    peer = peer_ns()
    t = tenant(uname("iso"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    mine = t.ipv4 if family == "ipv4" else t.ipv6
    fam = "AF_INET" if family == "ipv4" else "AF_INET6"
    # The peer says who connected and holds the connection until told, so that the engine's
    # view of it can be looked at meanwhile.
    server = peer.popen(
        [
            PY,
            "-u",
            "-c",
            "import socket,sys\n"
            f"l=socket.create_server(({addr!r},{PORT}),family=socket.{fam})\n"
            "print('READY',flush=True)\n"
            "c,p=l.accept(); print('FROM',p[0],flush=True); c.recv(1); c.close()\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_line(server, r"^READY")
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({addr!r},{PORT}),timeout=10)\n"
        "print('LOCAL',s.getsockname()[0],flush=True); sys.stdin.readline(); s.sendall(b'x')\n"
    )
    client = t.popen(
        ["env", "-u", "LD_PRELOAD", PY, "-u", "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_line(client, r"^LOCAL").split()[1] == mine
        assert wait_line(server, r"^FROM").split()[1] == mine
        conns = json.loads(nk("conns", "--json", check=True).stdout)["conns"]
        assert any(
            c["tenant"] == t.name and addr in (c["peer"] or "") and (c["peer"] or "").endswith(f":{PORT}")
            for c in conns
        ), conns
        client.stdin.write(b"\n")
        client.stdin.flush()
        assert client.wait(timeout=30) == 0, describe(client)
    finally:
        stop(client)
        stop(server)
    # UDP too: the peer sees the datagram come from the tenant's address.
    receiver = peer.popen(
        [
            PY,
            "-u",
            "-c",
            f"import socket\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n"
            f"s.bind(({addr!r},{PORT})); s.settimeout(10)\n"
            "print('READY',flush=True)\n"
            "try:\n    print('FROM',s.recvfrom(100)[1][0])\nexcept TimeoutError: print('NOTHING')\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(receiver, r"^READY")
    code = f"import socket\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\n"
    code += f"s.sendto(b'x',({addr!r},{PORT}))\n"
    run_checked(t, ["env", "-u", "LD_PRELOAD", PY, "-c", code], timeout=30)
    out, _ = receiver.communicate(timeout=30)
    assert out.strip().splitlines()[-1] == f"FROM {mine}", out


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_raw_socket_cannot_reach_peer(family, tenant, peer_with_server) -> None:
    peer = peer_with_server
    t = tenant(uname("iso"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    # Natively (and in the tenant namespace, which has only lo) sending fails with ENETUNREACH;
    # refusing the raw socket outright is also isolation. Never an answer from the peer.
    for no_preload in (False, True):
        result = probe(t, addr, 0, kind="raw", no_preload=no_preload)
        assert result in ("ERR ENETUNREACH", "ERR EPERM", "ERR EACCES", "ERR EAFNOSUPPORT"), (
            f"raw socket (no_preload={no_preload}): {result}"
        )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tenant_loopback_is_private(host, tenant, nk_daemon) -> None:
    a = tenant(uname("isoa"))
    b = tenant(uname("isob"))
    server = a.popen(
        [PY, "-u", str(PROGS / "echo_server.py"), host, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        # Control: reachable from inside A.
        assert probe(a, host, PORT) == "CONNECTED"
        # Not from tenant B's loopback...
        assert probe(b, host, PORT) == "ERR ECONNREFUSED"
        # ...nor from the NSM namespace's loopback.
        nsm_ns = f"nk-nsm-{nk_daemon.tenant_info(a.name)['nsm']}"
        proc = subprocess.run(
            ["ip", "netns", "exec", nsm_ns, PY, str(PROGS / "connect_probe.py"), host, str(PORT)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.stdout.strip() == "ERR ECONNREFUSED", describe(proc)
        # ...nor from the root namespace's.
        proc = subprocess.run(
            [PY, str(PROGS / "connect_probe.py"), host, str(PORT)], capture_output=True, text=True, timeout=30
        )
        assert proc.stdout.strip() == "ERR ECONNREFUSED", describe(proc)
        # And B can have its own server on the same loopback port.
        server_b = b.popen(
            [PY, "-u", str(PROGS / "echo_server.py"), host, str(PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_line(server_b, r"^READY")
            assert probe(b, host, PORT) == "CONNECTED"
        finally:
            stop(server_b)
        assert server.poll() is None
    finally:
        out, err = stop(server)
    # A's server saw only A's connection(s): the control probe.
    assert b"connections=1 " in out, describe(server, out, err)


def test_wildcard_listener_loopback_stays_in_tenant(tenant, peer_ns) -> None:
    """A listener on 0.0.0.0 in tenant A answers at A's address (from a peer) and on A's
    loopback, as on Linux, but not on tenant B's loopback."""
    peer = peer_ns()
    a = tenant(uname("isoa"))
    b = tenant(uname("isob"))
    server = a.popen(
        [PY, "-u", str(PROGS / "echo_server.py"), "0.0.0.0", str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        wait_port(peer, a.ipv4, PORT, timeout=20)
        assert probe(a, "127.0.0.1", PORT) == "CONNECTED"
        assert probe(b, "127.0.0.1", PORT) == "ERR ECONNREFUSED"
        assert probe(b, "127.0.0.1", PORT, no_preload=True) == "ERR ECONNREFUSED"
    finally:
        stop(server)
