"""A Python asyncio echo server and client (tests/apps/progs) with the tenant in both roles:
several concurrent connections, many messages of mixed sizes, compared byte for byte and by
sha256, clean half-close."""

from __future__ import annotations

import re
import subprocess

import pytest
from apputil import PROGS, PY, describe, run_checked, stop, uname, wait_line, wait_tenant_idle
from conftest import wait_port

PORT = 7007
CONNS = "6"
MESSAGES = "400"


def _server(runner, host: str) -> subprocess.Popen[str]:
    return runner.popen(
        [PY, "-u", str(PROGS / "echo_server.py"), host, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_client(proc: subprocess.CompletedProcess[str]) -> None:
    lines = proc.stdout.splitlines()
    assert lines and lines[-1] == "OK", describe(proc)
    sent = [ln.split()[1:] for ln in lines if ln.startswith("SENT ")]
    recv = [ln.split()[1:] for ln in lines if ln.startswith("RECV ")]
    assert len(sent) == int(CONNS) and sorted(sent) == sorted(recv), describe(proc)


def _server_stats(server: subprocess.Popen[str]) -> tuple[int, int]:
    out, err = stop(server)
    m = re.search(r"STATS connections=(\d+) bytes=(\d+)", out or "")
    assert m, describe(server, out, err)
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_echo_client_in_tenant(family, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("echo"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = _server(peer, addr)
    try:
        wait_line(server, r"^READY")
        proc = run_checked(
            t, [PY, str(PROGS / "echo_client.py"), addr, str(PORT), CONNS, MESSAGES, "1"], timeout=180
        )
        _check_client(proc)
        conns, nbytes = _server_stats(server)
        assert conns == int(CONNS)
        assert nbytes == sum(int(ln.split()[2]) for ln in proc.stdout.splitlines() if ln.startswith("SENT "))
    finally:
        stop(server)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_echo_server_in_tenant(family, nk_daemon, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("echo"))
    bind = "0.0.0.0" if family == "ipv4" else "::"
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    server = _server(t, bind)
    try:
        wait_line(server, r"^READY")
        wait_port(peer, addr, PORT, timeout=20)  # one empty connection
        proc = run_checked(
            peer, [PY, str(PROGS / "echo_client.py"), addr, str(PORT), CONNS, MESSAGES, "2"], timeout=180
        )
        _check_client(proc)
        conns, nbytes = _server_stats(server)
        assert conns == int(CONNS) + 1
        assert nbytes == sum(int(ln.split()[2]) for ln in proc.stdout.splitlines() if ln.startswith("SENT "))
    finally:
        stop(server)
    wait_tenant_idle(nk_daemon, t.name)


def test_echo_both_in_tenants(tenant) -> None:
    """Server in one tenant, client in another: tenant to tenant through the NSM."""
    a = tenant(uname("echoa"))
    b = tenant(uname("echob"))
    server = _server(a, "0.0.0.0")
    try:
        wait_line(server, r"^READY")
        proc = run_checked(
            b, [PY, str(PROGS / "echo_client.py"), a.ipv4, str(PORT), CONNS, MESSAGES, "3"], timeout=180
        )
        _check_client(proc)
        conns, _ = _server_stats(server)
        assert conns == int(CONNS)
    finally:
        stop(server)
