"""Connections at scale: a server in a tenant holds thousands of TCP connections from clients
in peer namespaces, as a web server or a cache with many clients does.

This machine's hard descriptor limit (20,000 per process, and root lacks CAP_SYS_RESOURCE to
raise it) bounds one engine process near 10,000 connections (two descriptors each), so the
test holds 9,000 (HELD). The figures beside native are the bench's held_* metrics
(`netkernel bench --only held_connections,held_open_seconds,held_memory_kib,held_idle_cpu_percent`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import PY, log_tail, stop  # noqa: E402
from conftest import nk  # noqa: E402

from netkernel.bench import program  # the bench's held-connections server and client
from netkernel.bench.probes import private_bytes

HELD = 9000
CLIENTS = 3  # processes, one per peer namespace, each with ADDRS source addresses
ADDRS = 3
PORT = 7600


def tenant_stats(name: str) -> dict[str, Any]:
    doc = json.loads(nk("ps", "--json", check=True).stdout)
    return next(t for t in doc["tenants"] if t["name"] == name)


def engine_private() -> int:
    """The engine's private resident memory (the bench's probe: its mapping of tenant regions
    is shared memory, not counted)."""
    return private_bytes(json.loads(nk("status", "--json", check=True).stdout)["engine_pid"])


def add_sources(peer: Any) -> list[str]:
    """ADDRS source addresses of the peer: its own and more in the test-peer range."""
    addrs = [peer.ipv4]
    base = peer.ipv4.rsplit(".", 1)[0]
    for i in range(2, ADDRS + 1):
        addr = f"{base}.{i}"
        subprocess.run(["ip", "-n", peer.name, "addr", "add", f"{addr}/15", "dev", "eth0"], check=True)
        addrs.append(addr)
    return addrs


def wait_for(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return pred()


def test_thousands_of_connections_held(tenant: Any, peer_ns: Any) -> None:
    """9,000 concurrent connections to an epoll server in a tenant: each speaks as it opens and
    again once all are open; no error, none lost; the engine stays healthy and the tenant's
    shared memory goes back down once they close."""
    t = tenant("held")
    peers = [peer_ns() for _ in range(CLIENTS)]
    server = t.popen(
        [PY, "-c", program("hold_server.py"), str(PORT), str(HELD)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "READY", server.stderr.read() if server.stderr else ""
    before = tenant_stats(t.name)
    private_before = engine_private()
    per = HELD // CLIENTS
    clients = []
    for i, p in enumerate(peers):
        srcs = ",".join(add_sources(p))
        clients.append(
            p.popen(
                [PY, "-c", program("hold_client.py"), t.ipv4, str(PORT), str(per), srcs, str(i * per)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline().split()
            assert line[:2] == ["OPEN", str(per)], f"{line}\n{log_tail()}"
        held = tenant_stats(t.name)
        assert held["sockets"] >= HELD, held
        grown = held["region_bytes"] - before["region_bytes"]
        private_grown = engine_private() - private_before
        # NetKernel's memory per idle connection: the tenant region's committed pages and the
        # engine's private memory, at most 32 KiB (the region at most 16 KiB, the engine 2 KiB).
        per_conn = (grown + private_grown) / HELD
        print(
            f"held {HELD}: region +{grown >> 10} KiB, engine +{private_grown >> 10} KiB,"
            f" {per_conn:.0f} B each"
        )
        assert per_conn <= 32 << 10 and grown / HELD <= 16 << 10 and private_grown / HELD <= 2 << 10, per_conn
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        for c in clients:
            out, _ = c.communicate(timeout=300)
            assert c.returncode == 0 and f"DONE {per}" in out, out
        out, err = server.communicate(timeout=120)
        assert server.returncode == 0, out + err
        assert f"accepted={HELD} answered={2 * HELD} errors=0" in out, out + err
    finally:
        for c in clients:
            if c.poll() is None:
                stop(c)
        if server.poll() is None:
            stop(server)
    # All closed: the sockets are freed and the pages of all but a few warm slots given back.
    assert wait_for(lambda: tenant_stats(t.name)["sockets"] == 0, 30), tenant_stats(t.name)
    assert wait_for(lambda: tenant_stats(t.name)["region_bytes"] <= 16 << 20, 30), tenant_stats(t.name)
    # The engine still serves: a new connection to the tenant works.
    r = t.run([PY, "-c", "import socket; socket.create_connection(('127.0.0.1', 9), 2)"], capture_output=True)
    assert b"ConnectionRefused" in r.stderr, r.stderr
    assert json.loads(nk("status", "--json", check=True).stdout)["running"]
