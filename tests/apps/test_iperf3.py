"""iperf3 with the tenant as client and as server: TCP, 4 parallel streams, reverse, UDP.
Checks the JSON report (bytes moved, no error); no throughput thresholds."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from apputil import describe, stop, uname

PORT = 5201
MODES = {
    "tcp": [],
    "tcp-P4": ["-P", "4"],
    "tcp-R": ["-R"],
    "udp": ["-u", "-b", "100M"],
    "udp-R": ["-u", "-b", "100M", "-R"],
}


def _server(runner, bind: str) -> subprocess.Popen[str]:
    # -1: serve one test then exit
    return runner.popen(
        ["iperf3", "-s", "-1", "-p", str(PORT), "-B", bind, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _client(runner, host: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    return runner.run(
        ["iperf3", "-c", host, "-p", str(PORT), "-t", "2", "--json", "--connect-timeout", "10000", *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )


def _check_report(text: str, udp: bool, what: str, client: bool = True) -> dict:
    rep = json.loads(text)
    assert "error" not in rep, f"{what}: {rep.get('error')}"
    end = rep["end"]
    if not client:
        # The server's report counts only its own direction (and its "sum" stays 0 for UDP).
        assert end["sum_sent"]["bytes"] + end["sum_received"]["bytes"] > 0, what
    elif udp:
        assert end["sum"]["bytes"] > 0, what
        assert end["sum"]["packets"] > 0, what
    else:
        assert end["sum_sent"]["bytes"] > 0, what
        assert end["sum_received"]["bytes"] > 0, what
    return rep


def _run(
    server_side, client_side, server_bind: str, target: str, mode: str, client_addr: str | None = None
) -> None:
    extra = MODES[mode]
    udp = "-u" in extra
    server = _server(server_side, server_bind)
    try:
        # iperf3's control connection counts as its one test if we probe it: wait by retrying
        # the client instead (it fails fast with "connection refused" while the server starts).
        for _ in range(40):
            proc = _client(client_side, target, extra)
            # (iperf3 3.12 --json exits 0 even when it reports an error)
            if "Connection refused" not in proc.stdout + proc.stderr:
                break
            time.sleep(0.25)
        assert proc.returncode == 0, describe(proc)
        rep = _check_report(proc.stdout, udp, describe(proc))
        if "-P" in extra:
            assert len(rep["start"]["connected"]) == 4, describe(proc)
        if client_addr is not None:  # connections leave with the tenant's own address
            for c in rep["start"]["connected"]:
                assert c["local_host"] == client_addr, describe(proc)
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, describe(server, out, err)
        srep = _check_report(out, udp, describe(server, out, err), client=False)
        if client_addr is not None:  # ...and the peer sees that address
            for c in srep["start"]["connected"]:
                assert c["remote_host"] == client_addr, describe(server, out, err)
    finally:
        stop(server)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", list(MODES))
def test_iperf3_client_in_tenant(mode, family, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("iperf"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    _run(peer, t, addr, addr, mode, client_addr=t.ipv4 if family == "ipv4" else t.ipv6)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", list(MODES))
def test_iperf3_server_in_tenant(mode, family, tenant, peer_ns) -> None:
    peer = peer_ns()
    t = tenant(uname("iperf"))
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    _run(t, peer, addr, addr, mode)
