"""A dead engine is an error for the tenant's programs, never a hang (PEERS item 8).

The engine is killed with SIGKILL in the middle of a transfer: the sending program must fail
promptly (ECONNRESET/EPIPE), a program blocked in recv() must return, new sockets must fail
with a clear errno, and the daemon must notice. The test then brings NetKernel back up for
the tests that follow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import TENANT_PY, nk

HERE = Path(__file__).resolve().parent
SINK = HERE / "progs" / "sink.py"
SOURCE = HERE / "progs" / "source.py"

BLOCKED_RECV = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
try:
    data = s.recv(10)
    print("recv returned", len(data), flush=True)
except OSError as e:
    print("recv failed", e.errno, flush=True)
try:
    socket.socket()
    print("socket ok", flush=True)
except OSError as e:
    print("socket failed", e.errno, flush=True)
"""


def test_engine_killed_mid_transfer(nk_daemon: Any, tenant: Any, peer_ns: Any) -> None:
    t = tenant("orphan")
    peer = peer_ns()
    sink = peer.popen([TENANT_PY, str(SINK), "0.0.0.0", "7201"], stdout=subprocess.PIPE, text=True)
    idle = peer.popen([TENANT_PY, str(SINK), "0.0.0.0", "7202"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    src = t.popen(
        [TENANT_PY, str(SOURCE), peer.ipv4, "7201", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiter = t.popen(
        [TENANT_PY, "-c", BLOCKED_RECV, peer.ipv4, "7202"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiter.stdout is not None
    assert waiter.stdout.readline().strip() == "connected"
    time.sleep(1.5)
    engine_pid = int(Path("/run/netkernel/engine.pid").read_text())
    os.kill(engine_pid, signal.SIGKILL)
    try:
        # Both programs end on their own, promptly, with an error: no hang.
        _, err = src.communicate(timeout=20)
        assert src.returncode != 0, "the transfer cannot have completed"
        assert "Error" in err, err
        out, err = waiter.communicate(timeout=20)
        assert "recv" in out and "socket failed" in out, out + err
        sink.kill()
        idle.kill()
        # The daemon saw its engine die and stopped.
        deadline = time.monotonic() + 20
        while nk("status").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert nk("status").returncode != 0
    finally:
        nk("down")
        proc = nk("up")
        assert proc.returncode == 0, proc.stdout + proc.stderr
