"""The shared-memory path between colocated tenants (issue 4).

Real programs in two tenants (nginx/wrk, redis, iperf3, checksummed bulk transfers), socket
semantics compared with native Linux TCP, back-pressure, kill -9 on either end, isolation
(reachability is the network's), the per-tenant switch, and which path `conns` reports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import (  # noqa: E402
    PROGS,
    PY,
    describe,
    retry,
    run_checked,
    stop,
    uname,
    url_host,
    wait_line,
    wait_tenant_idle,
)
from conftest import Daemon, nk  # noqa: E402
from test_nginx import Nginx, check_wrk, wrk  # noqa: E402

PAIR = Path(__file__).resolve().parent / "progs" / "pair.py"
PORT = 7300
GIB = 1 << 30
# The transcripts of progs/pair.py, compared with Linux on each path.
SCENARIOS = [
    "halfclose",
    "reset",
    "resetsend",
    "unread",
    "peerclosed",
    "names",
    "nonblock",
    "slow",
    "backlog",
]


def conns(tenant: str) -> list[dict]:
    proc = nk("conns", "--tenant", tenant, "--json", check=True)
    return json.loads(proc.stdout)["conns"]


def streams(tenant: str) -> list[dict]:
    return [c for c in conns(tenant) if c["kind"] == "stream"]


@pytest.fixture
def two(tenant):
    """Two tenants on the same NSM: a (client side) and b (server side)."""
    return tenant(uname("shma")), tenant(uname("shmb"))


# -- semantics: the same as Linux TCP ------------------------------------------------------------


def run_pair(server_runner, client_runner, scenario: str, addr: str) -> list[str]:
    server = server_runner.popen(
        [PY, "-u", str(PAIR), "server", scenario, addr, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_line(server, r"^READY")
        client = client_runner.run(
            [PY, "-u", str(PAIR), "client", scenario, addr, str(PORT)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = server.communicate(timeout=60)
    finally:
        stop(server)
    what = describe(client) + describe(server, out, err)
    assert client.returncode == 0 and server.returncode == 0, what
    lines = [ln for ln in (out + client.stdout).splitlines() if ln.startswith("R ")]
    assert lines, what
    return lines


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_semantics_match_linux(scenario, two, peer_ns) -> None:
    """Each scenario natively (both ends in one namespace, kernel TCP) and then between two
    tenants over shared memory: every line each end prints must be the same."""
    peer = peer_ns()
    native = run_pair(peer, peer, scenario, peer.ipv4)
    a, b = two
    shm = run_pair(b, a, scenario, b.ipv4)
    assert shm == native


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_semantics_match_linux_through_the_nsm(scenario, tenant, peer_ns) -> None:
    """The same transcripts with a tenant talking to a native peer through its NSM, each end in
    turn the client: the kernel path must keep Linux's semantics as well (this caught a
    reset after the peer's FIN that never reached the tenant's next send)."""
    peer = peer_ns()
    native = run_pair(peer, peer, scenario, peer.ipv4)
    t = tenant(uname("nsmsem"))
    assert run_pair(peer, t, scenario, peer.ipv4) == native, "tenant client"
    assert run_pair(t, peer, scenario, t.ipv4) == native, "tenant server"


def test_ipv6_and_getpeername(two) -> None:
    a, b = two
    lines = run_pair(b, a, "names", b.ipv6)
    assert all(ln.endswith("True") for ln in lines if "matches" in ln), lines
    assert "R client peer port 7300 family AF_INET6" in lines


# -- real programs ------------------------------------------------------------------------------


def _held_connection(a, b, addr: str, port: int = PORT):
    """A server in b and a client in a that keep one connection open until stopped."""
    srv = b.popen(
        [
            PY,
            "-u",
            "-c",
            "import socket,sys,time\n"
            f"l=socket.create_server(({addr!r},{port}),family=socket.AF_INET6 if ':' in {addr!r} "
            "else socket.AF_INET)\nprint('READY',flush=True)\nc,_=l.accept()\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(srv, r"^READY")
    cli = a.popen(
        [
            PY,
            "-u",
            "-c",
            "import socket,time\n"
            f"s=socket.create_connection(({addr!r},{port}))\nprint('CONNECTED',flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(cli, r"^CONNECTED")
    return srv, cli


def test_conns_shows_the_path_and_the_switch(two) -> None:
    a, b = two
    srv, cli = _held_connection(a, b, b.ipv4)
    try:
        (ca,) = streams(a.name)
        assert (ca["path"], ca["nsm"], ca["peer_tenant"]) == ("shm", "shm", b.name)
        assert ca["peer"] == f"{b.ipv4}:{PORT}"
        (cb,) = streams(b.name)
        assert (cb["path"], cb["peer_tenant"], cb["local"], cb["peer"]) == (
            "shm",
            a.name,
            f"{b.ipv4}:{PORT}",
            ca["local"],
        )
    finally:
        stop(cli)
        stop(srv)
    # Switched off for one tenant: new connections between the two go through the NSM.
    nk("tenant", "set", a.name, "--shm", "off", check=True)
    srv, cli = _held_connection(a, b, b.ipv4, PORT + 1)
    try:
        (ca,) = streams(a.name)
        assert ca["path"] == "nsm" and ca["peer_tenant"] is None
        assert ca["tcp_state"] == "established"  # TCP_INFO from the NSM's kernel socket
    finally:
        stop(cli)
        stop(srv)


def test_loopback_and_own_address_inside_a_tenant(tenant) -> None:
    t = tenant(uname("shmself"))
    for addr in ("127.0.0.1", "::1", t.ipv4):
        srv = t.popen(
            [
                PY,
                "-u",
                "-c",
                "import socket,time\n"
                "l=socket.create_server(('::',7310),family=socket.AF_INET6,dualstack_ipv6=True)\n"
                "print('READY',flush=True)\nc,_=l.accept()\nc.sendall(c.recv(5)*2)\ntime.sleep(2)",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_line(srv, r"^READY")
            cli = t.popen(
                [
                    PY,
                    "-u",
                    "-c",
                    "import socket,time\n"
                    f"s=socket.create_connection(({addr!r},7310))\ns.sendall(b'hello')\n"
                    "print(s.recv(10).decode(),flush=True)\ntime.sleep(2)",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_line(cli, r"^hellohello")
            paths = {c["path"] for c in streams(t.name)}
            assert paths == {"shm"}, (addr, streams(t.name))
        finally:
            stop(srv)
            if "cli" in locals():
                stop(cli)


def test_nginx_in_b_wrk_in_a(two, nk_tmpdir) -> None:
    a, b = two
    ng = Nginx(b, nk_tmpdir)
    ng.start()
    try:
        assert retry(
            lambda: (
                a.run(
                    ["curl", "-sS", "-o", "/dev/null", f"http://{b.ipv4}/1k.bin"],
                    capture_output=True,
                    timeout=10,
                ).returncode
                == 0
            ),
            timeout=20,
        )
        for addr in (b.ipv4, b.ipv6):
            for extra in ([], ["-H", "Connection: close"]):
                check_wrk(wrk(a, f"http://{url_host(addr)}/1k.bin", *extra), ng)
            check_wrk(wrk(a, f"http://{url_host(addr)}/1m.bin", conns=8), ng)
        got = run_checked(
            a, ["sh", "-c", f"curl -sS --fail http://{b.ipv4}/1m.bin | sha256sum"], timeout=60
        ).stdout.split()[0]
        assert got == ng.sha_1m
    finally:
        print(ng.stop())
    wait_tenant_idle_both(a, b)


def wait_tenant_idle_both(a, b) -> None:
    wait_tenant_idle(Daemon(), a.name)
    wait_tenant_idle(Daemon(), b.name)


def test_redis_in_b_benchmark_in_a(two, nk_tmpdir) -> None:
    a, b = two
    server = b.popen(
        [
            "redis-server",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            b.ipv4,
            "--protected-mode",
            "no",
            "--dir",
            str(nk_tmpdir),
            "--logfile",
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_line(server, r"Ready to accept connections")
        for extra in ([], ["-P", "16"]):
            proc = a.run(
                ["redis-benchmark", "-h", b.ipv4, "-p", "6379", "-t", "set,get", "-n", "20000", "-q", *extra],
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert proc.returncode == 0, describe(proc)
            rates = re.findall(r"(SET|GET): ([0-9.]+) requests per second", proc.stdout)
            assert {r[0] for r in rates} == {"SET", "GET"}, describe(proc)
            assert "error" not in (proc.stdout + proc.stderr).lower(), describe(proc)
        cli = run_checked(a, ["redis-cli", "-h", b.ipv4, "set", "k", "v"], timeout=30)
        assert cli.stdout.strip() == "OK"
        assert run_checked(a, ["redis-cli", "-h", b.ipv4, "get", "k"], timeout=30).stdout.strip() == "v"
    finally:
        stop(server)
    wait_tenant_idle_both(a, b)


@pytest.mark.parametrize("reverse", [False, True], ids=["a-to-b", "b-to-a"])
def test_iperf3_both_directions(reverse, two) -> None:
    a, b = two
    server = b.popen(
        ["iperf3", "-s", "-1", "-B", b.ipv4, "-p", "5301", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Probing the port would use up iperf3's one test: retry the client instead.
        for _ in range(40):
            proc = a.run(
                ["iperf3", "-c", b.ipv4, "-p", "5301", "-t", "3", "--json", *(["-R"] if reverse else [])],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if "Connection refused" not in proc.stdout + proc.stderr:
                break
            time.sleep(0.25)
        assert proc.returncode == 0, describe(proc)
        rep = json.loads(proc.stdout)
        assert "error" not in rep, describe(proc)
        end = rep["end"]
        sent, got = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
        assert 0 < got <= sent, describe(proc)
        assert all(c["local_host"] == a.ipv4 for c in rep["start"]["connected"]), describe(proc)
        print(
            f"iperf3 {'b->a' if reverse else 'a->b'}: "
            f"{end['sum_received']['bits_per_second'] / 1e9:.1f} Gbit/s"
        )
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, describe(server, out, err)
    finally:
        stop(server)


@pytest.mark.parametrize("direction", ["a-to-b", "b-to-a"])
def test_bulk_1gib_sha256(direction, two) -> None:
    a, b = two
    server_dir, client_dir = ("recv", "send") if direction == "a-to-b" else ("send", "recv")
    server = b.popen(
        [PY, "-u", str(PROGS / "bulk.py"), "listen", b.ipv4, str(PORT), server_dir, str(GIB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        client = a.run(
            [PY, str(PROGS / "bulk.py"), "connect", b.ipv4, str(PORT), client_dir, str(GIB)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert client.returncode == 0, describe(client)
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, describe(server, out, err)
    finally:
        stop(server)
    done = [
        re.search(r"^DONE ([0-9a-f]{64}) (\d+)$", text, re.M)
        for text in (out.decode(errors="replace"), client.stdout)
    ]
    assert all(done), describe(client) + describe(server, out, err)
    assert done[0][1] == done[1][1] and int(done[0][2]) == int(done[1][2]) == GIB
    wait_tenant_idle_both(a, b)


# -- kill -9 mid-transfer ------------------------------------------------------------------------

SOURCE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
block = bytes(range(256)) * 256
print("SENDING", flush=True)
while True:
    s.sendall(block)
"""

SINK = r"""
import socket, sys, time
l = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
c, _ = l.accept()
block = bytes(range(256)) * 256
n = 0
slow = len(sys.argv) > 4
try:
    while True:
        b = c.recv(65536)
        if not b:
            print("EOF", n, flush=True)
            break
        # The stream is the repeated block: every byte in its place, none lost or doubled.
        off = n % len(block)
        want = (block[off:] + block * (len(b) // len(block) + 2))[:len(b)]
        assert b == want, f"corrupt at {n}"
        n += len(b)
        if slow:
            time.sleep(0.001)
except ConnectionResetError:
    print("RESET", n, flush=True)
"""


def kill9(marker: str) -> None:
    """SIGKILL the program started with ``marker`` among its arguments (`netkernel run` runs it
    as its child: the launcher's own death would not close the program's sockets)."""
    pids = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert pids, marker
    for pid in pids:
        subprocess.run(["kill", "-9", pid], check=False)


def test_sender_killed_mid_transfer(two, tenant) -> None:
    """Linux closes a killed process's sockets: the receiver reads every byte that was sent,
    intact, then EOF. A bystander pair of tenants keeps transferring meanwhile."""
    a, b = two
    marker = uname("source")
    sink = b.popen(
        [PY, "-u", "-c", SINK, b.ipv4, str(PORT), uname("sink")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(sink, r"^READY")
    source = a.popen(
        [PY, "-u", "-c", SOURCE, b.ipv4, str(PORT), marker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with _bystanders(tenant) as check_bystanders:
        wait_line(source, r"^SENDING")
        time.sleep(1.0)
        kill9(marker)
        source.wait(timeout=30)
        out, err = sink.communicate(timeout=30)
        assert sink.returncode == 0, describe(sink, out, err)
        m = re.search(r"^EOF (\d+)$", out, re.M)
        assert m and int(m[1]) > 0, describe(sink, out, err)
        check_bystanders()
    wait_tenant_idle_both(a, b)


def test_receiver_killed_mid_transfer(two, tenant) -> None:
    """The receiver dies with unread bytes: Linux resets the connection, and the sender's
    next writes fail with ECONNRESET or EPIPE at once (no hang)."""
    a, b = two
    marker = uname("sink")
    sink = b.popen(
        [PY, "-u", "-c", SINK, b.ipv4, str(PORT), marker, "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(sink, r"^READY")
    source = a.popen(
        [PY, "-u", "-c", SOURCE, b.ipv4, str(PORT), uname("source")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with _bystanders(tenant) as check_bystanders:
        wait_line(source, r"^SENDING")
        time.sleep(1.0)
        kill9(marker)
        sink.wait(timeout=30)
        out, err = source.communicate(timeout=30)
        assert source.returncode == 1, describe(source, out, err)
        assert re.search(r"(ConnectionResetError|BrokenPipeError)", err), describe(source, out, err)
        check_bystanders()
    wait_tenant_idle_both(a, b)


class _bystanders:
    """A third and fourth tenant moving a checksummed stream over the shm path meanwhile."""

    def __init__(self, tenant) -> None:
        self.c, self.d = tenant(uname("shmc")), tenant(uname("shmd"))

    def __enter__(self):
        size = 256 << 20
        self.server = self.d.popen(
            [PY, "-u", str(PROGS / "bulk.py"), "listen", self.d.ipv4, str(PORT), "recv", str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_line(self.server, r"^READY")
        self.client = self.c.popen(
            [PY, str(PROGS / "bulk.py"), "connect", self.d.ipv4, str(PORT), "send", str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self.check

    def check(self) -> None:
        cout, cerr = self.client.communicate(timeout=120)
        sout, serr = self.server.communicate(timeout=60)
        assert self.client.returncode == 0 and self.server.returncode == 0, describe(
            self.client, cout, cerr
        ) + describe(self.server, sout, serr)
        digests = [re.search(r"^DONE ([0-9a-f]{64}) (\d+)$", t, re.M) for t in (cout, sout)]
        assert all(digests) and digests[0][0] == digests[1][0], cout + sout

    def __exit__(self, *exc) -> None:
        stop(self.client)
        stop(self.server)


# -- isolation: only where the network would deliver ----------------------------------------------

PROBE = r"""
import errno, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("CONNECTED", flush=True)
except OSError as e:
    print("ERR", errno.errorcode.get(e.errno, e.errno), flush=True)
"""


def probe(runner, addr: str, port: int) -> str:
    return run_checked(runner, [PY, "-c", PROBE, addr, str(port)], timeout=30).stdout.strip()


def test_reachability_is_the_networks(two, tenant) -> None:
    a, b = two
    c = tenant(uname("shmc"))
    # b listens on its loopback only, on 7320; on its IPv4 address only, on 7321.
    srv = b.popen(
        [
            PY,
            "-u",
            "-c",
            "import socket,time\n"
            "l1=socket.create_server(('127.0.0.1',7320))\n"
            f"l2=socket.create_server(({b.ipv4!r},7321))\n"
            "print('READY',flush=True)\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_line(srv, r"^READY")
        assert probe(a, b.ipv4, 7320) == "ERR ECONNREFUSED"  # b's loopback is b's own
        assert probe(a, "127.0.0.1", 7320) == "ERR ECONNREFUSED"  # a's loopback has nothing
        assert probe(a, b.ipv6, 7321) == "ERR ECONNREFUSED"  # bound to the IPv4 address only
        assert probe(a, c.ipv4, 7321) == "ERR ECONNREFUSED"  # c has no listener there
        assert probe(a, b.ipv4, 7321) == "CONNECTED"
        assert probe(b, "127.0.0.1", 7320) == "CONNECTED"
    finally:
        stop(srv)


def test_listener_in_a_tenant_with_shm_off_is_reached_through_the_nsm(two) -> None:
    a, b = two
    nk("tenant", "set", b.name, "--shm", "off", check=True)
    srv, cli = _held_connection(a, b, b.ipv4)
    try:
        assert [c["path"] for c in streams(a.name)] == ["nsm"]
    finally:
        stop(cli)
        stop(srv)


def test_udp_between_tenants_goes_through_the_nsm(two) -> None:
    """Datagrams between colocated tenants take the NSM (kernel UDP): see docs/shm.md."""
    a, b = two
    srv = b.popen(
        [
            PY,
            "-u",
            "-c",
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(({b.ipv4!r},7330))\nprint('READY',flush=True)\n"
            "for _ in range(3):\n    d,a=s.recvfrom(100)\n    s.sendto(d.upper(),a)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_line(srv, r"^READY")
        out = run_checked(
            a,
            [
                PY,
                "-c",
                "import socket\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(5)\n"
                "for w in (b'one',b'two',b'three'):\n"
                f"    s.sendto(w,({b.ipv4!r},7330))\n"
                "    d,src=s.recvfrom(100); print(d.decode(),src[0])",
            ],
            timeout=30,
        ).stdout.split("\n")
        assert out[:3] == [f"ONE {b.ipv4}", f"TWO {b.ipv4}", f"THREE {b.ipv4}"]
    finally:
        stop(srv)
