"""`netkernel upgrade`: a new engine takes every socket over from the running one, live.

During a 1 GiB transfer each way (sha256 on both ends), under wrk against nginx in a tenant
(zero socket errors) and on the shared-memory path between two tenants: the old engine hands
each socket's state and descriptors, the control connections and the counters to the daemon
and ends; the new one goes on. No byte is lost, duplicated or reordered, no connection drops,
and it is not a crash (no restart counted). A binary that keeps another socket state layout is
refused before anything stops; SIGHUP to the daemon upgrades too. The pause of the data path
is printed (`netkernel upgrade` reports it), not asserted: timing goals are benchmarks'.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import PROGS, PY, describe, stop, uname, wait_line  # noqa: E402
from conftest import nk, wait_port  # noqa: E402

GIB = 1 << 30
PROGS_HERE = Path(__file__).resolve().parent / "progs"
BULK = PROGS / "bulk.py"


def status() -> dict[str, Any]:
    return dict(json.loads(nk("status", "--json", check=True).stdout))


def upgrade(*args: str) -> float:
    """`netkernel upgrade`; the data path's pause it reports, in ms."""
    proc = nk("upgrade", *args, check=True)
    m = re.search(r"paused ([\d.]+) ms", proc.stdout)
    assert m, proc.stdout
    print(f"\n{proc.stdout.strip()}")
    return float(m[1])


@pytest.fixture(autouse=True)
def no_crash_counted(nk_daemon: Any) -> Iterator[None]:
    before = status()
    yield
    after = status()
    assert after["engine_restarts"] == before["engine_restarts"], "an upgrade is not a crash"
    assert not after["engine_failed"], after


def done(text: str) -> tuple[str, int]:
    m = re.search(r"^DONE ([0-9a-f]{64}) (\d+)$", text, re.M)
    assert m, text
    return m[1], int(m[2])


def upgrades_during(proc: subprocess.Popen[Any], times: int, every: float = 0.4) -> list[float]:
    """Upgrades while proc runs (a transfer here takes a second or two), at least one."""
    pauses: list[float] = []
    for _ in range(times):
        time.sleep(every)
        if proc.poll() is not None:
            break
        pauses.append(upgrade())
    assert pauses, "the transfer ended before the first upgrade"
    return pauses


def bulk_across_upgrades(
    server_at: Any, host: str, server_dir: str, client_at: Any, port: int, size: int, every: float = 0.4
) -> list[float]:
    """size bytes between bulk.py listening in server_at (on host) and connecting from
    client_at, the engine upgraded while it runs; both ends' sha256 must agree."""
    client_dir = "send" if server_dir == "recv" else "recv"
    server = server_at.popen(
        [PY, "-u", str(BULK), "listen", host, str(port), server_dir, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = client_at.popen(
            [PY, str(BULK), "connect", server_at.ipv4, str(port), client_dir, str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pauses = upgrades_during(client, 2, every)
        c_out, c_err = client.communicate(timeout=300)
        assert client.returncode == 0, describe(client, c_out, c_err)
        s_out, s_err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, s_out, s_err)
        assert done(c_out) == done(s_out.decode()) and done(c_out)[1] == size
        return pauses
    finally:
        stop(server)


@pytest.mark.parametrize("direction", ["tenant-sends", "tenant-receives"])
def test_upgrade_during_1gib_transfer(direction: str, tenant: Any, peer_ns: Any) -> None:
    t = tenant(uname("upg"))
    peer = peer_ns()
    old = status()["engine_pid"]
    pauses = bulk_across_upgrades(
        peer, "0.0.0.0", "recv" if direction == "tenant-sends" else "send", t, 7501, GIB
    )
    assert status()["engine_pid"] != old
    print(f"pauses: {pauses} ms")


def test_upgrade_under_wrk_against_nginx(tenant: Any, peer_ns: Any, nk_tmpdir: Path) -> None:
    from test_nginx import Nginx, check_wrk, wrk  # noqa: PLC0415

    peer = peer_ns()
    t = tenant(uname("upgngx"))
    ng = Nginx(t, nk_tmpdir)
    ng.start()
    try:
        wait_port(peer, t.ipv4, 80, timeout=20)
        result: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: result.update(proc=wrk(peer, f"http://{t.ipv4}/1k.bin", duration=5, conns=64))
        )
        load.start()
        time.sleep(1.5)
        pause = upgrade()
        time.sleep(1.0)
        pause2 = upgrade()
        load.join(90)
        n = check_wrk(result["proc"], ng)  # zero socket errors, all 2xx
        print(f"wrk: {n} requests across two upgrades (pauses {pause}, {pause2} ms)")
    finally:
        ng.stop()


def test_upgrade_on_the_shared_memory_path(tenant: Any) -> None:
    a, b = tenant(uname("upsa")), tenant(uname("upsb"))
    seen: set[str] = set()

    def paths() -> None:  # once the connection is up: it must be on the shm path
        for _ in range(20):
            time.sleep(0.1)
            r = nk("conns", "--tenant", a.name, "--json")
            if r.returncode == 0:  # (not while an upgrade holds the engine)
                seen.update(c["path"] for c in json.loads(r.stdout)["conns"])
            if "shm" in seen:
                return

    probe = threading.Thread(target=paths)
    probe.start()
    bulk_across_upgrades(b, b.ipv4, "recv", a, 7502, GIB, every=0.3)
    probe.join()
    assert "shm" in seen, seen


@pytest.mark.parametrize("direction", ["tenant-sends", "tenant-receives"])
def test_upgrade_with_a_tenant_on_lwip(direction: str, tenant: Any, peer_ns: Any) -> None:
    """The lwIP process stays connected through the upgrade (the daemon holds its connection,
    queues and doorbells for the next engine): its connections carry on, it is not restarted."""
    name = f"lw{uname('x')[-6:]}"
    r = nk("nsm", "add", name, "--type", "lwip")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        t = tenant(uname("uplw"), name)
        peer = peer_ns()
        lwip = subprocess.run(
            ["pgrep", "-f", f"nsm-{name}.sock"], capture_output=True, text=True
        ).stdout.split()
        server_dir = "recv" if direction == "tenant-sends" else "send"
        pauses = bulk_across_upgrades(peer, "0.0.0.0", server_dir, t, 7521, 512 << 20, every=0.5)
        now = subprocess.run(
            ["pgrep", "-f", f"nsm-{name}.sock"], capture_output=True, text=True
        ).stdout.split()
        assert lwip and lwip == now, (lwip, now)
        print(f"lwIP transfer across upgrades, pauses {pauses} ms")
    finally:
        for tn in json.loads(nk("ps", "--json").stdout)["tenants"]:
            if tn["nsm"] == name:
                nk("tenant", "delete", tn["name"])
        nk("nsm", "remove", name)


def test_connections_made_during_upgrades_succeed(tenant: Any, peer_ns: Any) -> None:
    """New connections both ways, back to back, while the engine is replaced twice: none
    fails (a connect waits in the kernel's backlog or the control socket's queue)."""
    t = tenant(uname("upgcx"))
    peer = peer_ns()
    echo_peer = peer.popen([PY, str(PROGS_HERE / "echo.py"), "7511"])
    echo_tenant = t.popen([PY, str(PROGS_HERE / "echo.py"), "7512"])
    try:
        wait_port(peer, peer.ipv4, 7511)
        wait_port(peer, t.ipv4, 7512)
        loops = [
            t.popen(
                [PY, str(PROGS_HERE / "connect_loop.py"), peer.ipv4, "7511", "4"],
                stdout=subprocess.PIPE,
                text=True,
            ),
            peer.popen(
                [PY, str(PROGS_HERE / "connect_loop.py"), t.ipv4, "7512", "4"],
                stdout=subprocess.PIPE,
                text=True,
            ),
        ]
        time.sleep(1.0)
        pauses = [upgrade()]
        time.sleep(1.0)
        pauses.append(upgrade())
        for p in loops:
            out, _ = p.communicate(timeout=120)
            res = json.loads(out)
            print(f"connect loop across upgrades (pauses {pauses} ms): {res}")
            assert res["ok"] > 0 and not res["errors"], res
    finally:
        for p in (echo_peer, echo_tenant):
            p.kill()
            p.wait()


def test_an_incompatible_engine_is_refused(tenant: Any, peer_ns: Any, tmp_path: Path) -> None:
    fake = tmp_path / "netkernel-engine"
    fake.write_text("#!/bin/sh\necho 999/1/1\n")
    fake.chmod(0o755)
    before = status()["engine_pid"]
    proc = nk("upgrade", "--engine", str(fake))
    assert proc.returncode != 0
    assert "socket state version 999/1/1" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
    assert status()["engine_pid"] == before
    # A binary that is not an engine at all, and a path that is not a binary.
    (tmp_path / "false").write_text("#!/bin/sh\nexit 3\n")
    (tmp_path / "false").chmod(0o755)
    proc = nk("upgrade", "--engine", str(tmp_path / "false"))
    assert proc.returncode != 0 and "--state-version" in proc.stderr, proc.stderr
    proc = nk("upgrade", "--engine", str(tmp_path / "nope"))
    assert proc.returncode != 0 and "not an executable file" in proc.stderr, proc.stderr
    assert status()["engine_pid"] == before
    # And the network still works.
    t = tenant(uname("upgno"))
    peer = peer_ns()
    server = peer.popen(
        [PY, "-u", str(BULK), "listen", "0.0.0.0", "7503", "recv", str(1 << 20)], stdout=subprocess.PIPE
    )
    try:
        wait_line(server, r"^READY")
        r = t.run(
            [PY, str(BULK), "connect", peer.ipv4, "7503", "send", str(1 << 20)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, describe(r)
    finally:
        stop(server)


def test_sighup_upgrades(nk_daemon: Any) -> None:
    before = status()
    os.kill(int(before["pid"]), signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = status()
        if st["engine_pid"] and st["engine_pid"] != before["engine_pid"]:
            break
        time.sleep(0.1)
    assert st["pid"] == before["pid"] and st["engine_pid"] != before["engine_pid"], (before, st)
