"""sockperf ping-pong (TCP and UDP) with the tenant as client and as server: it must run to
the end and report a latency. No latency thresholds."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from apputil import describe, stop, uname, wait_line

PORT = 11111


def _server(runner, addr: str, proto: str) -> subprocess.Popen[str]:
    cmd = ["stdbuf", "-oL", "-eL", "sockperf", "server", "-i", addr, "-p", str(PORT)]
    if proto == "tcp":
        cmd.append("--tcp")
    return runner.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pingpong(runner, addr: str, proto: str) -> subprocess.CompletedProcess[str]:
    cmd = ["sockperf", "ping-pong", "-i", addr, "-p", str(PORT), "--time", "2"]
    if proto == "tcp":
        cmd.append("--tcp")
    return runner.run(cmd, capture_output=True, text=True, timeout=60)


def _check(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout + proc.stderr
    m = re.search(r"avg-latency=([0-9.]+)", out)
    assert m and float(m[1]) > 0, describe(proc)
    m = re.search(r"ReceivedMessages=(\d+)", out)
    assert m and int(m[1]) > 0, describe(proc)
    assert re.search(r"percentile 50\.000 =\s*[0-9.]+", out), describe(proc)
    m = re.search(
        r"# dropped messages = (\d+); # duplicated messages = (\d+); "
        r"# out-of-order messages = (\d+)",
        out,
    )
    assert m, describe(proc)
    if "--tcp" in proc.args:  # TCP never drops, duplicates or reorders
        assert m.groups() == ("0", "0", "0"), describe(proc)


@pytest.mark.parametrize("family", ["ipv4"])  # sockperf 3.7 (Debian 12) has no IPv6
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_sockperf_client_in_tenant(proto, family, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("sperf"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = _server(peer, addr, proto)
    try:
        wait_line(server, r"to block on socket")
        _check(_pingpong(t, addr, proto))
    finally:
        stop(server, signal.SIGINT)


@pytest.mark.parametrize("family", ["ipv4"])  # sockperf 3.7 (Debian 12) has no IPv6
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_sockperf_server_in_tenant(proto, family, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("sperf"))
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    server = _server(t, addr, proto)
    try:
        wait_line(server, r"to block on socket")
        _check(_pingpong(peer, addr, proto))
        assert server.poll() is None, describe(server, *stop(server, signal.SIGINT))
    finally:
        stop(server, signal.SIGINT)
