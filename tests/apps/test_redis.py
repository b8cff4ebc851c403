"""redis: redis-server in a tenant loaded by redis-benchmark from a peer; redis-cli in a
tenant against redis-server in a peer."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from apputil import describe, run_checked, stop, uname, url_host
from conftest import wait_port

PORT = 6379


def _redis_server(runner, workdir: Path, bind: str) -> subprocess.Popen[str]:
    return runner.popen(
        [
            "redis-server",
            "--port",
            str(PORT),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            *bind.split(),
            "--protected-mode",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check_benchmark(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, describe(proc)
    # -q prints progress with \r and a final "SET: N requests per second, ..." line per test.
    final = [seg.strip() for seg in re.split(r"[\r\n]", proc.stdout) if "requests per second" in seg]
    tests = {ln.split(":")[0] for ln in final}
    assert {"SET", "GET"} <= tests, describe(proc)
    for ln in final:
        m = re.search(r":\s*([0-9.]+) requests per second", ln)
        assert m and float(m[1]) > 0, describe(proc)
    text = (proc.stdout + proc.stderr).lower()
    for bad in ("error", "err ", "connection refused", "reset by peer", "timeout"):
        assert bad not in text, describe(proc)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_redis_server_in_tenant_benchmark_from_peer(family, tenant, peer_ns, nk_tmpdir) -> None:
    peer = peer_ns()
    t = tenant(uname("redis"))
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    server = _redis_server(t, nk_tmpdir, "0.0.0.0 ::")
    try:
        wait_port(peer, addr, PORT, timeout=20)
        proc = peer.run(
            ["redis-benchmark", "-h", addr, "-p", str(PORT), "-t", "set,get", "-n", "20000", "-q"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        _check_benchmark(proc)
        # Pipelined, 50 clients: the server sees bursts of many commands per read.
        proc = peer.run(
            [
                "redis-benchmark",
                "-h",
                addr,
                "-p",
                str(PORT),
                "-t",
                "set,get",
                "-n",
                "20000",
                "-P",
                "16",
                "-c",
                "50",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        _check_benchmark(proc)
        proc = run_checked(peer, ["redis-cli", "-h", addr, "-p", str(PORT), "DBSIZE"], timeout=30)
        assert int(proc.stdout.strip()) >= 1, describe(proc)
        assert server.poll() is None, describe(server, *stop(server))
    finally:
        out, _ = stop(server)
    assert "# Server initialized" in (out or ""), out


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_redis_cli_in_tenant(family, tenant, peer_ns, nk_tmpdir) -> None:
    peer = peer_ns()
    t = tenant(uname("redis"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = _redis_server(peer, nk_tmpdir, addr)
    try:
        wait_port(peer, addr, PORT, timeout=20)
        cli = ["redis-cli", "-h", addr, "-p", str(PORT)]
        proc = run_checked(t, [*cli, "SET", "nk:key", "value-from-tenant"], timeout=30)
        assert proc.stdout.strip() == "OK", describe(proc)
        proc = run_checked(t, [*cli, "GET", "nk:key"], timeout=30)
        assert proc.stdout.strip() == "value-from-tenant", describe(proc)
        big = "x" * 300_000
        proc = run_checked(t, [*cli, "-x", "SET", "nk:big"], input=big, timeout=30)
        assert proc.stdout.strip() == "OK", describe(proc)
        proc = run_checked(t, [*cli, "STRLEN", "nk:big"], timeout=30)
        assert proc.stdout.strip() == str(len(big)), describe(proc)
        # Several commands over one connection (redis-cli reads them from stdin).
        proc = run_checked(t, cli, input="INCR nk:n\nINCR nk:n\nINCR nk:n\nGET nk:n\n", timeout=30)
        assert proc.stdout.split() == ["1", "2", "3", "3"], describe(proc)
        # The peer's server sees the connection coming from the tenant's own address.
        proc = run_checked(t, [*cli, "CLIENT", "INFO"], timeout=30)
        tenant_addr = t.ipv4 if family == "ipv4" else t.ipv6
        assert re.search(rf"\baddr={re.escape(url_host(tenant_addr))}:\d+ ", proc.stdout), describe(proc)
        proc = run_checked(peer, [*cli, "GET", "nk:key"], timeout=30)
        assert proc.stdout.strip() == "value-from-tenant", describe(proc)
    finally:
        stop(server)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_redis_benchmark_in_tenant(family, tenant, peer_ns, nk_tmpdir) -> None:
    """The other role for the load generator: redis-benchmark (50 clients, epoll) in the tenant."""
    peer = peer_ns()
    t = tenant(uname("redis"))
    addr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = _redis_server(peer, nk_tmpdir, addr)
    try:
        wait_port(peer, addr, PORT, timeout=20)
        for extra in ([], ["-P", "16"]):
            proc = t.run(
                [
                    "redis-benchmark",
                    "-h",
                    addr,
                    "-p",
                    str(PORT),
                    "-t",
                    "set,get,lpush,lpop",
                    "-n",
                    "20000",
                    "-q",
                    *extra,
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            _check_benchmark(proc)
    finally:
        stop(server)
