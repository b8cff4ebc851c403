"""Rings sized by use: an open connection that moved bulk data gives its rings' pages back once
it is quiet, as TCP gives back the buffer memory of an idle connection, and moves data
correctly after that (the next bytes fault in fresh pages)."""

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

PORT = 7650
MIB = 1 << 20

# In the tenant: echo everything back, on one connection, until the client closes it.
ECHO_SERVER = """
import socket, sys
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(1)
print("READY", flush=True)
c, _ = ls.accept()
n = 0
while data := c.recv(1 << 16):
    c.sendall(data)
    n += len(data)
print(f"ECHOED {n}", flush=True)
"""

# In the peer: for each "N" read on stdin, send N random bytes and read N back; "OK N" when
# what came back is what went out (sha256 of each side).
ECHO_CLIENT = """
import hashlib, os, socket, sys, threading
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
print("CONNECTED", flush=True)
for line in sys.stdin:
    n = int(line)
    data = os.urandom(n)
    t = threading.Thread(target=c.sendall, args=(data,))
    t.start()
    got, h = 0, hashlib.sha256()
    while got < n:
        b = c.recv(min(1 << 16, n - got))
        if not b:
            print("CLOSED", flush=True)
            sys.exit(1)
        h.update(b)
        got += len(b)
    t.join()
    print("OK" if h.digest() == hashlib.sha256(data).digest() else "MISMATCH", n, flush=True)
c.close()
"""


def tenant_stats(name: str) -> dict[str, Any]:
    doc = json.loads(nk("ps", "--json", check=True).stdout)
    return next(t for t in doc["tenants"] if t["name"] == name)


def settle(name: str, below: int, timeout: float = 10.0) -> int:
    """The region's committed bytes once they fall to `below` (or after timeout)."""
    deadline = time.monotonic() + timeout
    held = tenant_stats(name)["region_bytes"]
    while held > below and time.monotonic() < deadline:
        time.sleep(0.25)
        held = tenant_stats(name)["region_bytes"]
    return held


def echo(client: subprocess.Popen[str], n: int) -> None:
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(f"{n}\n")
    client.stdin.flush()
    line = client.stdout.readline().split()
    assert line == ["OK", str(n)], f"{line}\n{log_tail()}"


def test_quiet_connection_gives_ring_pages_back(tenant: Any, peer_ns: Any) -> None:
    t = tenant("shrink")
    peer = peer_ns()
    server = t.popen([PY, "-c", ECHO_SERVER, str(PORT)], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        client = peer.popen(
            [PY, "-c", ECHO_CLIENT, t.ipv4, str(PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdout.readline().strip() == "CONNECTED"
        echo(client, 4096)  # the connection speaks: its first ring pages are in
        idle = settle(t.name, 0, timeout=1.0)
        shrunk0 = tenant_stats(t.name)["rings_shrunk"]
        # Bulk both ways: the tenant's receive ring and its transmit ring fill.
        echo(client, 64 * MIB)
        busy = tenant_stats(t.name)["region_bytes"]
        assert busy >= idle + MIB, (idle, busy)
        # Quiet: within two passes of the engine (one to two seconds each) the pages go back,
        # while the connection stays open.
        quiet = settle(t.name, idle + 64 * 1024)
        assert quiet <= idle + 64 * 1024, f"idle {idle}, after 64 MiB {busy}, quiet {quiet}"
        assert tenant_stats(t.name)["rings_shrunk"] > shrunk0
        # The rings work as before: every byte comes back, in order, through fresh pages.
        for n in (1, 8 * MIB, 3 * MIB + 17):
            echo(client, n)
        assert settle(t.name, idle + 64 * 1024) <= idle + 64 * 1024
        echo(client, MIB)
        assert client.stdin is not None
        client.stdin.close()
        assert client.wait(timeout=30) == 0
        out, _ = server.communicate(timeout=30)
        assert f"ECHOED {4096 + 64 * MIB + 1 + 8 * MIB + 3 * MIB + 17 + MIB}" in out, out
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                stop(p)
