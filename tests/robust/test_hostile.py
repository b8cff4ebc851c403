"""A misbehaving tenant hurts only itself (DESIGN §D, PEERS item 8).

- Garbage written into a tenant's own shared memory (slot headers, ring indices, ring bytes,
  doorbells) and random control requests do not crash or stall the engine: another tenant's
  checksummed transfer, running at the same time, completes intact.
- A process killed with SIGKILL mid-transfer: its peer sees the connection end (reset or EOF,
  never a hang), and the engine and other tenants keep working.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import TENANT_PY, engine_never_died  # noqa: E402
from helpers_c import build_c

HERE = Path(__file__).resolve().parent
SINK = HERE / "progs" / "sink.py"
SOURCE = HERE / "progs" / "source.py"


def engine_alive() -> bool:
    return engine_never_died()  # a restarted engine would hide a crash


def transfer(src_tenant: Any, peer: Any, size_mb: int, port: int) -> None:
    """size_mb from a tenant to a sink in the peer namespace; sha256 checked on both ends."""
    sink = peer.popen([TENANT_PY, str(SINK), "0.0.0.0", str(port)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    src = src_tenant.run(
        [TENANT_PY, str(SOURCE), peer.ipv4, str(port), str(size_mb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert src.returncode == 0, src.stderr
    out, _ = sink.communicate(timeout=60)
    assert out.split()[0] == src.stdout.split()[0], (out, src.stdout)


def test_garbage_in_shared_memory(tenant: Any, peer_ns: Any, tmp_path: Path) -> None:
    exe = build_c(Path(__file__).resolve().parent.parent / "c" / "scribble.c", tmp_path)
    bad, good = tenant("hostile"), tenant("bystander")
    peer = peer_ns()
    echo = peer.popen([TENANT_PY, str(SINK), "0.0.0.0", "7001", "--forever"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    # The scribbler may wedge its own sockets (that is its business): bound it in time.
    hostile = bad.popen([str(exe), peer.ipv4, "7001", "8"], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    transfer(good, peer, 64, 7002)  # while the garbage flies
    try:
        hostile.wait(timeout=30)
    except subprocess.TimeoutExpired:
        hostile.kill()
        hostile.wait()
    assert engine_alive()
    transfer(good, peer, 16, 7003)  # and after
    # The hostile tenant itself can still open fresh connections once it stops scribbling.
    transfer(bad, peer, 4, 7004)
    echo.kill()


def test_kill9_mid_transfer(tenant: Any, peer_ns: Any) -> None:
    victim, other = tenant("victim"), tenant("other")
    peer = peer_ns()
    sink = peer.popen(
        [TENANT_PY, str(SINK), "0.0.0.0", "7101"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    src = victim.popen([TENANT_PY, str(SOURCE), peer.ipv4, "7101", "100000"])
    time.sleep(2)  # mid-transfer
    # Kill the program itself (the child of `netkernel run`), not the launcher.
    pids = subprocess.run(
        ["pgrep", "-f", f"{SOURCE} {peer.ipv4} 7101"], capture_output=True, text=True
    ).stdout.split()
    assert pids
    for pid in pids:
        subprocess.run(["kill", "-9", pid])
    src.wait(timeout=30)
    # The peer sees the end of the connection promptly (never a hang).
    out, err = sink.communicate(timeout=30)
    assert engine_alive()
    transfer(other, peer, 16, 7102)
    transfer(victim, peer, 4, 7103)  # the tenant itself recovers with new processes
    assert src.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 137)


def test_privileged_socket_options_refused(tenant: Any) -> None:
    t = tenant("opts")
    for host in (t.ipv4, t.ipv6):
        r = t.run(
            [TENANT_PY, str(HERE / "progs" / "options.py"), host], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
