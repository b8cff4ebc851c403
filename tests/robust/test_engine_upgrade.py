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


@pytest.mark.parametrize("direction", ["tenant-sends", "tenant-receives"])
def test_upgrade_during_1gib_transfer(direction: str, tenant: Any, peer_ns: Any) -> None:
    t = tenant(uname("upg"))
    peer = peer_ns()
    peer_dir, tenant_dir = ("recv", "send") if direction == "tenant-sends" else ("send", "recv")
    server = peer.popen(
        [PY, "-u", str(BULK), "listen", "0.0.0.0", "7501", peer_dir, str(GIB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = t.popen(
            [PY, str(BULK), "connect", peer.ipv4, "7501", tenant_dir, str(GIB)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        old = status()["engine_pid"]
        pauses = upgrades_during(client, 2)
        c_out, c_err = client.communicate(timeout=300)
        assert client.returncode == 0, describe(client, c_out, c_err)
        s_out, s_err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, s_out, s_err)
        assert done(c_out) == done(s_out.decode()) and done(c_out)[1] == GIB
        assert status()["engine_pid"] != old
        print(f"pauses: {pauses} ms")
    finally:
        stop(server)


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
    server = b.popen(
        [PY, "-u", str(BULK), "listen", b.ipv4, "7502", "recv", str(GIB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = a.popen(
            [PY, str(BULK), "connect", b.ipv4, "7502", "send", str(GIB)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        paths = {c["path"] for c in json.loads(nk("conns", "--tenant", a.name, "--json").stdout)["conns"]}
        assert "shm" in paths, paths
        upgrades_during(client, 2, every=0.3)
        c_out, c_err = client.communicate(timeout=300)
        assert client.returncode == 0, describe(client, c_out, c_err)
        s_out, s_err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, s_out, s_err)
        assert done(c_out) == done(s_out.decode()) and done(c_out)[1] == GIB
    finally:
        stop(server)


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
