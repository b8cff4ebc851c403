"""The lwIP NSM behind the external-NSM interface (issue 6).

Unmodified programs in a tenant whose stack is lwIP (a process of its own, on a TAP device):
nginx with two workers served to wrk from a peer namespace, curl and Python against native
servers, 256 MiB sha256-checked each way, the same nginx moved between the kernel NSM and the
lwIP NSM, and kill -9 of the lwIP process mid-transfer (clean errors, restart, service back,
the kernel NSM's tenant untouched).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from apputil import (  # noqa: E402
    PROGS,
    PY,
    describe,
    make_random_file,
    retry,
    run_checked,
    stop,
    tenant_wait_port,
    uname,
    url_host,
    wait_line,
)
from conftest import Daemon, Peer, Tenant, nk, wait_port  # noqa: E402
from test_nginx import Nginx, check_wrk, wrk  # noqa: E402

MIB = 1 << 20
PORT = 7400


def nsm_list() -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in json.loads(nk("nsm", "list", "--json", check=True).stdout)["nsms"]}


def conns(tenant: str) -> list[dict[str, Any]]:
    return list(json.loads(nk("conns", "--tenant", tenant, "--json", check=True).stdout)["conns"])


@pytest.fixture(scope="module")
def lwip(nk_daemon: Daemon) -> Iterator[str]:
    """An lwIP NSM for this module's tenants."""
    name = f"lw{uuid.uuid4().hex[:6]}"  # NSM names: letters and digits
    proc = nk("nsm", "add", name, "--type", "lwip")
    assert proc.returncode == 0, describe(proc)
    assert "lwip" in proc.stdout, proc.stdout
    yield name
    for t in nk_daemon.ps():
        if t["nsm"] == name or name in t.get("draining", []):
            nk("tenant", "delete", t["name"])
    proc = nk("nsm", "remove", name)
    assert proc.returncode == 0, describe(proc)


@pytest.fixture
def on_lwip(lwip: str, tenant: Callable[..., Tenant]) -> Tenant:
    return tenant(uname("lwt"), lwip)


def nsm_bytes(name: str) -> int:
    n = nsm_list()[name]
    return int(n["tx_bytes"] or 0) + int(n["rx_bytes"] or 0)


def test_nginx_on_lwip_served_to_wrk(
    lwip: str, on_lwip: Tenant, peer_ns: Callable[[], Peer], nk_tmpdir: Path
) -> None:
    """nginx (master + 2 workers), unmodified, on lwIP: wrk from a peer namespace over IPv4 and
    IPv6, keep-alive and Connection: close, 1 KiB and 1 MiB, without a single error."""
    peer, t = peer_ns(), on_lwip
    before = nsm_bytes(lwip)
    ng = Nginx(t, nk_tmpdir)
    ng.start()
    try:
        for addr in (t.ipv4, t.ipv6):
            wait_port(peer, addr, 80, timeout=20)
        counts = []
        for addr in (t.ipv4, t.ipv6):
            url = f"http://{url_host(addr)}"
            for extra in ([], ["-H", "Connection: close"]):
                counts.append(check_wrk(wrk(peer, f"{url}/1k.bin", *extra), ng))
            counts.append(check_wrk(wrk(peer, f"{url}/1m.bin", conns=8), ng))
        got = run_checked(
            peer, ["sh", "-c", f"curl -sS --fail http://{t.ipv4}/1m.bin | sha256sum"], timeout=60
        ).stdout.split()[0]
        assert got == ng.sha_1m
        print(f"wrk requests (v4 keep-alive, close, 1 MiB, then v6): {counts}")
    finally:
        print(ng.stop())
    # The bytes went through the lwIP NSM (the engine counts what each NSM moved).
    assert nsm_bytes(lwip) - before > 100 * MIB


NATIVE_HTTP = r"""
import http.server, functools, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
class Server(http.server.ThreadingHTTPServer):
    address_family = __import__("socket").AF_INET6 if ":" in sys.argv[1] else __import__("socket").AF_INET
srv = Server((sys.argv[1], int(sys.argv[2])), handler)
print("READY", flush=True)
srv.serve_forever()
"""

URLLIB = r"""
import hashlib, sys, urllib.request
data = urllib.request.urlopen(sys.argv[1], timeout=30).read()
print(hashlib.sha256(data).hexdigest(), len(data))
"""


def test_clients_on_lwip_against_native_servers(
    on_lwip: Tenant, peer_ns: Callable[[], Peer], nk_tmpdir: Path
) -> None:
    """curl and Python's urllib in an lwIP tenant fetch from servers in a peer namespace (the
    Linux stack), IPv4 and IPv6; a name resolves through NetKernel's resolver too."""
    peer, t = peer_ns(), on_lwip
    www = nk_tmpdir / "native"
    www.mkdir()
    www.chmod(0o755)
    sha = make_random_file(www / "f.bin", 3 * MIB + 17)
    servers = []
    try:
        for addr, port in ((peer.ipv4, PORT), (peer.ipv6, PORT + 1)):
            srv = peer.popen(
                [PY, "-u", "-c", NATIVE_HTTP, addr, str(port), str(www)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            servers.append(srv)
            wait_line(srv, r"^READY")
        for addr, port in ((peer.ipv4, PORT), (peer.ipv6, PORT + 1)):
            url = f"http://{url_host(addr)}:{port}/f.bin"
            got = run_checked(
                t, ["sh", "-c", f"curl -sS --fail --max-time 30 {url} | sha256sum"], timeout=60
            ).stdout.split()[0]
            assert got == sha, url
            out = run_checked(t, [PY, "-c", URLLIB, url], timeout=60).stdout.split()
            assert out == [sha, str(3 * MIB + 17)], url
        # A name: the tenant's own, from NetKernel's resolver, then a connection to it from a
        # program in the tenant to itself (loopback stays in the tenant).
        host = f"{t.name}.tenant.netkernel"
        out = run_checked(t, ["getent", "hosts", host], timeout=30).stdout
        assert t.ipv6 in out or t.ipv4 in out, out
    finally:
        for srv in servers:
            stop(srv)


@pytest.mark.parametrize("direction", ["tenant-sends", "tenant-receives"])
def test_bulk_256mib_sha256(direction: str, on_lwip: Tenant, peer_ns: Callable[[], Peer]) -> None:
    peer, t = peer_ns(), on_lwip
    size = 256 * MIB
    peer_dir, tenant_dir = ("recv", "send") if direction == "tenant-sends" else ("send", "recv")
    server = peer.popen(
        [PY, "-u", str(PROGS / "bulk.py"), "listen", peer.ipv4, str(PORT), peer_dir, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_line(server, r"^READY")
        t0 = time.monotonic()
        client = t.run(
            [PY, str(PROGS / "bulk.py"), "connect", peer.ipv4, str(PORT), tenant_dir, str(size)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.monotonic() - t0
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
    assert done[0][1] == done[1][1] and int(done[0][2]) == int(done[1][2]) == size
    print(f"{direction}: 256 MiB in {seconds:.2f} s ({size * 8 / seconds / 1e9:.2f} Gbit/s)")


def held_connection(peer: Peer, t: Tenant) -> subprocess.Popen[str]:
    """A keep-alive connection from the peer to nginx in t, open until stdin closes."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({t.ipv4!r},80))\n"
        "s.sendall(b'GET /1k.bin HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "print('OPEN', s.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = peer.popen(
        [PY, "-u", "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(p, r"^OPEN")
    return p


def test_nginx_moves_between_kernel_and_lwip(
    lwip: str, tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer], nk_tmpdir: Path
) -> None:
    """The same nginx, with the same config, moves from the kernel NSM to lwIP and back: a
    download running across each move finishes intact, wrk sees no error, and connections
    opened after a move use the new NSM."""
    peer = peer_ns()
    t = tenant(uname("mv"))
    kernel = t_nsm = next(n for n in nsm_list().values() if n["kind"] == "kernel")["name"]
    ng = Nginx(t, nk_tmpdir)
    sha_big = make_random_file(nk_tmpdir / "www" / "big.bin", 64 * MIB)
    ng.start()
    try:
        wait_port(peer, t.ipv4, 80, timeout=20)
        check_wrk(wrk(peer, f"http://{t.ipv4}/1k.bin"), ng)
        for target in (lwip, kernel):
            # 64 MiB at 16 MB/s: about 4 s, so the move happens in the middle of it.
            download = peer.popen(
                ["sh", "-c", f"curl -sS --fail --limit-rate 16M http://{t.ipv4}/big.bin | sha256sum"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.7)
            proc = nk("tenant", "move", t.name, "--nsm", target)
            assert proc.returncode == 0, describe(proc)
            held = held_connection(peer, t)
            try:
                mine = [c for c in conns(t.name) if c["kind"] == "stream"]
                assert {c["nsm"] for c in mine} == {t_nsm, target}, mine
            finally:
                held.stdin.close()  # type: ignore[union-attr]
                held.wait(timeout=10)
            check_wrk(wrk(peer, f"http://{t.ipv4}/1k.bin"), ng)
            check_wrk(wrk(peer, f"http://{url_host(t.ipv6)}/1k.bin", "-H", "Connection: close"), ng)
            out, err = download.communicate(timeout=60)
            assert download.returncode == 0 and out.split()[0] == sha_big, describe(download, out, err)
            t_nsm = target
        got = run_checked(peer, ["curl", "-sS", "--fail", f"http://{t.ipv4}/version"]).stdout
        assert got.strip() == "v1"  # the same nginx, never restarted or reconfigured
    finally:
        print(ng.stop())


UDP = r"""
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if mode == "echo":
    s.bind((host, port))
    print("READY", flush=True)
    while True:
        d, a = s.recvfrom(65536)
        s.sendto(d, a)
s.settimeout(5)
# Up to 12,000 bytes: lwIP reassembles at most IP_REASS_MAX_PBUFS (10) fragments.
for size in (1, 100, 1472, 1473, 8000, 12000):
    msg = bytes([size % 251]) * size
    if mode == "connected":
        s.connect((host, port))
        s.send(msg)
        d, a = s.recv(65536), (host, port)
    else:
        s.sendto(msg, (host, port))
        d, a = s.recvfrom(65536)
    assert d == msg and a[:2] == (host, port), (size, len(d), a)
print("OK", s.getsockname()[1], flush=True)
"""


def test_udp_on_lwip(on_lwip: Tenant, peer_ns: Callable[[], Peer]) -> None:
    """UDP both ways through lwIP: sendto/recvfrom and connected sockets from the tenant to a
    peer's echo server (v4 and v6, fragments included), and a peer's client against an echo
    server in the tenant."""
    peer, t = peer_ns(), on_lwip
    procs = []
    try:
        for addr, port in ((peer.ipv4, PORT + 10), (peer.ipv6, PORT + 11)):
            p = peer.popen(
                [PY, "-u", "-c", UDP, "echo", addr, str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            wait_line(p, r"^READY")
            for mode in ("sendto", "connected"):
                out = run_checked(t, [PY, "-c", UDP, mode, addr, str(port)], timeout=60).stdout
                assert out.startswith("OK "), out
        srv = t.popen(
            [PY, "-u", "-c", UDP, "echo", "0.0.0.0", str(PORT + 12)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(srv)
        wait_line(srv, r"^READY")
        out = run_checked(peer, [PY, "-c", UDP, "sendto", t.ipv4, str(PORT + 12)], timeout=60).stdout
        assert out.startswith("OK "), out
    finally:
        for p in procs:
            stop(p)


SOURCE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
block = bytes(range(256)) * 256
print("SENDING", flush=True)
try:
    while True:
        s.sendall(block)
except OSError as e:
    print("ERROR", type(e).__name__, e.errno, flush=True)
"""

SINK = r"""
import socket, sys
l = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    c, _ = l.accept()
    try:
        while c.recv(1 << 16):
            pass
    except OSError:
        pass
    c.close()
"""

ECHO_SERVER = r"""
import socket, sys
l = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    c, _ = l.accept()
    c.sendall(c.recv(100))
    c.close()
"""


def test_lwip_killed_mid_transfer(
    lwip: str, on_lwip: Tenant, tenant: Callable[..., Tenant], peer_ns: Callable[[], Peer]
) -> None:
    """kill -9 of the lwIP process: the tenant's transfer fails at once with Linux's errors
    (no hang), the daemon restarts the NSM, the tenant's listener is back and new connections
    work both ways; a tenant on the kernel NSM finishes its checksummed transfer meanwhile."""
    peer, t = peer_ns(), on_lwip
    bystander = tenant(uname("kb"))
    sink = peer.popen(
        [PY, "-u", "-c", SINK, peer.ipv4, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(sink, r"^READY")
    echo = t.popen(
        [PY, "-u", "-c", ECHO_SERVER, "0.0.0.0", str(PORT + 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(echo, r"^READY")
    wait_port(peer, t.ipv4, PORT + 2)
    size = 192 * MIB
    bulk_srv = peer.popen(
        [PY, "-u", str(PROGS / "bulk.py"), "listen", peer.ipv4, str(PORT + 1), "recv", str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    source = t.popen(
        [PY, "-u", "-c", SOURCE, peer.ipv4, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_line(bulk_srv, r"^READY")
        bulk = bystander.popen(
            [PY, str(PROGS / "bulk.py"), "connect", peer.ipv4, str(PORT + 1), "send", str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_line(source, r"^SENDING")
        time.sleep(1.0)
        before = nsm_list()[lwip]
        pid = before["pid"]
        assert pid and before["up"], before
        subprocess.run(["kill", "-9", str(pid)], check=True)
        t_kill = time.monotonic()
        line = wait_line(source, r"^ERROR", timeout=10)
        failed_after = time.monotonic() - t_kill
        assert re.search(r"ERROR (ConnectionResetError|BrokenPipeError) ", line), line
        # The daemon brings a new process up; the engine gives it the tenant and the listener.
        assert retry(
            lambda: (n := nsm_list()[lwip])["up"] and n["pid"] != pid and n["restarts"] >= 1, timeout=15
        ), nsm_list()[lwip]
        wait_port(peer, t.ipv4, PORT + 2, timeout=15)
        probe = (
            "import socket,sys\n"
            f"s=socket.create_connection(({t.ipv4!r},{PORT + 2}))\n"
            "s.sendall(b'ping'); print(s.recv(100).decode())\n"
        )
        assert run_checked(peer, [PY, "-c", probe]).stdout.strip() == "ping"
        tenant_wait_port(t, peer.ipv4, PORT)  # and out of the tenant, through the new process
        out, err = bulk.communicate(timeout=120)
        assert bulk.returncode == 0, describe(bulk, out, err)
        srv_out, srv_err = bulk_srv.communicate(timeout=60)
        sums = [
            re.search(r"^DONE ([0-9a-f]{64}) (\d+)$", text, re.M)
            for text in (out, srv_out.decode(errors="replace"))
        ]
        assert all(sums) and sums[0][1] == sums[1][1], describe(bulk, out, err)
        print(f"the sender failed {failed_after * 1000:.0f} ms after the kill: {line}")
    finally:
        for p in (source, sink, echo, bulk_srv):
            stop(p)


def test_nsm_add_refuses_what_lwip_cannot_do(nk_daemon: Daemon, nk_tmpdir: Path) -> None:
    """An unknown type, or kernel-only settings on an lwIP NSM: a clear error, nothing added."""
    before = set(nsm_list())
    for args, message in (
        (["--type", "quic"], "invalid choice"),
        (["--type", "lwip", "--congestion-control", "reno"], "lwip NSM has no congestion_control"),
        (["--type", "lwip", "--sysctl", "net.ipv4.tcp_ecn=1"], "lwip NSM has no congestion_control"),
    ):
        proc = nk("nsm", "add", f"bad{uuid.uuid4().hex[:6]}", *args)
        assert proc.returncode != 0 and message in proc.stderr, describe(proc)
    conf = nk_tmpdir / "bad.toml"
    conf.write_text('[[nsm]]\nname = "a"\nkind = "lwip"\ncongestion_control = "reno"\n')
    proc = nk("up", "--config", str(conf))
    assert proc.returncode != 0 and "kind" in proc.stderr and "lwip" in proc.stderr, describe(proc)
    assert set(nsm_list()) == before
