"""Programs GuestLib cannot reach — statically linked (musl, busybox-static) and Go
(CGO_ENABLED=0) — get their network through NetKernel, by the tenant's relay
(csrc/relay/relay.c): both roles, IPv4 and IPv6, peers in namespaces the test makes, every
transfer checked byte for byte or by sha256.

The programs are Debian's (busybox-static) or built here with Debian's compilers (musl-gcc,
golang-go), as a user would build theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apputil import PROGS, PY, describe, make_random_file, run_checked, stop, uname, url_host, wait_line
from conftest import nk, wait_port

HERE = Path(__file__).parent / "progs" / "static"
BUSYBOX = "/bin/busybox"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def static_bin() -> Iterator[Path]:
    """The static programs, built where tenants may run them."""
    d = Path(tempfile.mkdtemp(prefix="netkernel-static-"))
    d.chmod(0o755)
    for tool, pkg in (("musl-gcc", "musl-tools"), ("go", "golang-go")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install {pkg}); .ci/run installs it")
    subprocess.run(
        ["musl-gcc", "-static", "-O2", "-o", str(d / "net"), str(HERE / "net.c")],
        check=True,
        capture_output=True,
    )
    env = dict(
        os.environ, CGO_ENABLED="0", GO111MODULE="off", GOCACHE=str(d / ".gocache"), GOPATH=str(d / ".gopath")
    )
    subprocess.run(
        ["go", "build", "-o", str(d / "nkgo"), str(HERE / "nkgo.go")],
        check=True,
        capture_output=True,
        env=env,
    )
    for exe in ("net", "nkgo"):
        out = subprocess.run(["file", "-b", str(d / exe)], capture_output=True, text=True).stdout
        assert "statically linked" in out, f"{exe}: {out}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_busybox_is_static() -> None:
    out = subprocess.run(["file", "-bL", BUSYBOX], capture_output=True, text=True).stdout
    assert "statically linked" in out, f"{BUSYBOX}: {out} (apt-get install busybox-static)"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_musl_static_tcp_both_ways(family, static_bin, tenant, peer_ns) -> None:
    t, peer = tenant(uname("smusl")), peer_ns()
    paddr, taddr = (peer.ipv4, t.ipv4) if family == "ipv4" else (peer.ipv6, t.ipv6)
    tcp = str(static_bin / "net")
    # The tenant's program connects out to the peer's server...
    server = peer.popen([tcp, "server", "7301"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_line(server, r"^READY")
        proc = run_checked(t, [tcp, "client", paddr, "7301", str(32 * MiB)], timeout=120)
        assert proc.stdout.split() == ["OK", taddr, str(32 * MiB)], describe(proc)
    finally:
        stop(server)
    # ...and serves the peer's.
    server = t.popen([tcp, "server", "7302"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_line(server, r"^READY")
        wait_port(peer, taddr, 7302, timeout=20)
        proc = peer.run([tcp, "client", taddr, "7302", str(32 * MiB)], capture_output=True, text=True)
        assert proc.stdout.split() == ["OK", paddr, str(32 * MiB)], describe(proc)
    finally:
        stop(server)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_musl_static_udp_both_ways(family, static_bin, tenant, peer_ns) -> None:
    t, peer = tenant(uname("smuslu")), peer_ns()
    paddr, taddr = (peer.ipv4, t.ipv4) if family == "ipv4" else (peer.ipv6, t.ipv6)
    net = str(static_bin / "net")
    server = peer.popen(
        [net, "udp-server", "7304"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_line(server, r"^READY")
        proc = run_checked(t, [net, "udp-client", paddr, "7304", "300"], timeout=120)
        assert proc.stdout.split() == ["OK", "300"], describe(proc)
    finally:
        stop(server)
    server = t.popen([net, "udp-server", "7305"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_line(server, r"^READY")
        time.sleep(0.5)  # the relay finds a new UDP socket within 200 ms
        proc = peer.run([net, "udp-client", taddr, "7305", "300"], capture_output=True, text=True)
        assert proc.stdout.split() == ["OK", "300"], describe(proc)
    finally:
        stop(server)


def test_a_preloaded_program_that_execs_a_static_one(static_bin, tenant, peer_ns) -> None:
    """GuestLib is in the first program and gone after execve: the static one still connects,
    through the relay."""
    t, peer = tenant(uname("sexec")), peer_ns()
    tcp = str(static_bin / "net")
    server = peer.popen([tcp, "server", "7303"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_line(server, r"^READY")
        code = f"import os; os.execv({tcp!r}, ['net', 'client', {peer.ipv4!r}, '7303', str(1 << 20)])"
        proc = run_checked(t, [PY, "-c", code])
        assert proc.stdout.split() == ["OK", t.ipv4, str(1 << 20)], describe(proc)
    finally:
        stop(server)


def test_busybox_wget_nc_and_httpd(tenant, peer_ns, nk_tmpdir) -> None:
    t, peer = tenant(uname("sbbox")), peer_ns()
    blob = nk_tmpdir / "blob"
    want = make_random_file(blob, 16 * MiB)
    (nk_tmpdir / "out").mkdir()
    out = t.grant(nk_tmpdir / "out")
    # wget from a peer's web server.
    web = peer.popen(
        [PY, "-m", "http.server", "7311", "--bind", "::", "--directory", str(nk_tmpdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(peer, peer.ipv4, 7311, timeout=20)
        for addr in (peer.ipv4, peer.ipv6):
            dest = out / "wget.bin"
            run_checked(t, [BUSYBOX, "wget", "-q", "-O", str(dest), f"http://{url_host(addr)}:7311/blob"])
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == want, addr
    finally:
        stop(web)
    # nc, the tenant sending: the peer's listener writes what it gets.
    got = nk_tmpdir / "from_tenant.bin"
    listener = peer.popen(
        [PY, "-c", NC_SINK, peer.ipv4, "7312", str(got)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_line(listener, r"^READY")
        run_checked(t, ["sh", "-c", f"{BUSYBOX} nc {peer.ipv4} 7312 < {blob}"])
        assert listener.wait(timeout=60) == 0, describe(listener)
        assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    finally:
        stop(listener)
    # nc listening in the tenant: the peer sends.
    dest = out / "nc.bin"
    nc = t.popen(["sh", "-c", f"{BUSYBOX} nc -l -p 7313 > {dest}"], stderr=subprocess.PIPE, text=True)
    try:
        # nc takes one connection: no probe first; the sender retries until it is listening.
        proc = peer.run([PY, "-c", NC_SOURCE, t.ipv4, "7313", str(blob)], capture_output=True, text=True)
        assert proc.returncode == 0, describe(proc)
        assert nc.wait(timeout=60) == 0, describe(nc)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == want
    finally:
        stop(nc)
    # httpd in the tenant serving the peer.
    httpd = t.popen(
        [BUSYBOX, "httpd", "-f", "-p", "7314", "-h", str(nk_tmpdir)], stderr=subprocess.PIPE, text=True
    )
    try:
        for addr in (t.ipv4, t.ipv6):
            wait_port(peer, addr, 7314, timeout=20)
            proc = peer.run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "--max-time",
                    "60",
                    "-o",
                    "-",
                    f"http://{url_host(addr)}:7314/blob",
                ],
                capture_output=True,
            )
            assert proc.returncode == 0, proc.stderr
            assert hashlib.sha256(proc.stdout).hexdigest() == want, addr
    finally:
        stop(httpd)


NC_SINK = """
import socket, sys
l = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
c, _ = l.accept()
with open(sys.argv[3], "wb") as f:
    while data := c.recv(1 << 16):
        f.write(data)
"""

# A client's connect, tried again while refused (a listener not there yet).
CONNECT_RETRYING = """
import socket, sys, time
end = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        break
    except ConnectionRefusedError:
        if time.monotonic() > end:
            raise
        time.sleep(0.05)
"""

NC_SOURCE = (
    CONNECT_RETRYING
    + """
with open(sys.argv[3], "rb") as f:
    s.sendfile(f)
s.close()
"""
)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_go_http_server_serves_64mib(family, static_bin, tenant, peer_ns) -> None:
    t, peer = tenant(uname("sgohttp")), peer_ns()
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    server = t.popen(
        [str(static_bin / "nkgo"), "serve", ":7321", str(64 * MiB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        want = wait_line(server, r"^READY").split()[1]
        wait_port(peer, addr, 7321, timeout=20)
        proc = peer.run(
            ["curl", "-sS", "--fail", "--max-time", "120", "-o", "-", f"http://{url_host(addr)}:7321/blob"],
            capture_output=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout) == 64 * MiB
        assert hashlib.sha256(proc.stdout).hexdigest() == want
    finally:
        stop(server)


def test_go_echo_1000_concurrent_connections(static_bin, tenant, peer_ns) -> None:
    t, peer = tenant(uname("sgoecho")), peer_ns()
    nkgo = str(static_bin / "nkgo")
    server = peer.popen(
        [nkgo, "echoserve", f"[{peer.ipv6}]:7331"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    server4 = peer.popen(
        [nkgo, "echoserve", f"{peer.ipv4}:7332"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_line(server, r"^READY")
        wait_line(server4, r"^READY")
        proc = run_checked(t, [nkgo, "echoclient", f"{peer.ipv4}:7332", "1000", "16384"], timeout=300)
        assert proc.stdout.split()[:2] == ["OK", "1000"], describe(proc)
        assert proc.stdout.split()[2].startswith(f"{t.ipv4}:"), describe(proc)
        proc = run_checked(t, [nkgo, "echoclient", f"[{peer.ipv6}]:7331", "100", "65536"], timeout=300)
        assert proc.stdout.split()[2].startswith(f"[{t.ipv6}]:"), describe(proc)
    finally:
        stop(server)
        stop(server4)
    # And the other way: a Go echo server in the tenant, a Go client in the peer.
    server = t.popen([nkgo, "echoserve", ":7333"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_line(server, r"^READY")
        wait_port(peer, t.ipv4, 7333, timeout=20)
        proc = peer.run(
            [nkgo, "echoclient", f"{t.ipv4}:7333", "1000", "16384"], capture_output=True, text=True
        )
        assert proc.returncode == 0 and proc.stdout.split()[:2] == ["OK", "1000"], describe(proc)
    finally:
        stop(server)


def test_go_udp_both_ways(static_bin, tenant, peer_ns) -> None:
    t, peer = tenant(uname("sgoudp")), peer_ns()
    nkgo = str(static_bin / "nkgo")
    for paddr, taddr in ((peer.ipv4, t.ipv4), (f"[{peer.ipv6}]", f"[{t.ipv6}]")):
        server = peer.popen(
            [nkgo, "udpserve", f"{paddr}:7336"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            wait_line(server, r"^READY")
            proc = run_checked(t, [nkgo, "udpclient", f"{paddr}:7336", "200"], timeout=120)
            assert proc.stdout.split()[:2] == ["OK", "200"], describe(proc)
            assert proc.stdout.split()[2].startswith(f"{taddr}:"), describe(proc)  # the tenant's own
        finally:
            stop(server)
    server = t.popen([nkgo, "udpserve", ":7337"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_line(server, r"^READY")
        time.sleep(0.5)
        for taddr in (t.ipv4, f"[{t.ipv6}]"):
            proc = peer.run([nkgo, "udpclient", f"{taddr}:7337", "200"], capture_output=True, text=True)
            assert proc.stdout.split()[:2] == ["OK", "200"], describe(proc)
    finally:
        stop(server)


def test_go_client_fetches_from_a_peer_by_name(static_bin, nk_daemon, tenant, peer_ns, nk_tmpdir) -> None:
    """Go's own resolver (no cgo) reads the tenant's resolv.conf and asks the engine's stub,
    which answers from the config's `[dns] hosts`. The default daemon is restored afterwards."""
    conf = nk_tmpdir / "netkernel.toml"
    conf.write_text('[dns]\nhosts = { "gopeer.example" = "198.19.241.1" }\n')
    nk("down", check=True)
    try:
        nk("up", "--config", str(conf), check=True)
        peer = peer_ns()
        subprocess.run(
            ["ip", "-n", peer.name, "addr", "add", "198.19.241.1/15", "dev", "eth0"],
            check=True,
            capture_output=True,
        )
        nkgo = str(static_bin / "nkgo")
        server = peer.popen([nkgo, "serve", "198.19.241.1:7341", str(8 * MiB)], stdout=subprocess.PIPE)
        try:
            want = wait_line(server, r"^READY").split()[1]
            t = tenant(uname("sgoname"))
            proc = run_checked(t, [nkgo, "get", "http://gopeer.example:7341/blob"], timeout=120)
            assert proc.stdout.split() == ["OK", want, str(8 * MiB)], describe(proc)
        finally:
            stop(server)
    finally:
        nk("down")
        nk("up", check=True)


def test_policy_applies_to_static_programs(static_bin, nk_daemon, tenant, peer_ns) -> None:
    """The relay's connections are the tenant's NetKernel sockets: max_sockets bounds them
    (the program sees the ones over the limit reset), and they show in `conns`."""
    t, peer = tenant(uname("spolicy")), peer_ns()
    nk("tenant", "set", t.name, "--max-sockets", "40", check=True)
    nkgo = str(static_bin / "nkgo")
    server = peer.popen(
        [nkgo, "echoserve", f"{peer.ipv4}:7351"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_line(server, r"^READY")
        # Within the limit (the relay's own listener-free idle state holds no socket).
        proc = run_checked(t, [nkgo, "echoclient", f"{peer.ipv4}:7351", "30", "4096"], timeout=120)
        assert proc.stdout.split()[:2] == ["OK", "30"], describe(proc)
        # Over it: some of the 60 are refused by NetKernel, and the program is told.
        proc = t.run(
            [nkgo, "echoclient", f"{peer.ipv4}:7351", "60", "4096"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0, describe(proc)
        assert "reset" in proc.stderr or "broken pipe" in proc.stderr or "EOF" in proc.stderr, describe(proc)
        log = run_checked(t, ["cat", "/run/netkernel/relay.log"]).stdout
        assert "refused by NetKernel: Too many open files" in log, log
    finally:
        stop(server)
    info = json.loads(nk("ps", "--json", check=True).stdout)
    assert any(x["name"] == t.name for x in info["tenants"])


def test_rate_limit_applies_to_static_programs(static_bin, tenant, peer_ns, nk_tmpdir) -> None:
    """The tenant's rate_tx holds a static program's upload too (its bytes are the relay's,
    through the engine). A loose bound: the limit, not a benchmark."""
    t, peer = tenant(uname("srate")), peer_ns()
    nk("tenant", "set", t.name, "--rate-tx", "40Mbit", check=True)
    got = nk_tmpdir / "sink.bin"
    sink = peer.popen(
        [PY, "-c", NC_SINK, peer.ipv4, "7391", str(got)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    blob = nk_tmpdir / "up.bin"
    want = make_random_file(blob, 8 * MiB)
    try:
        wait_line(sink, r"^READY")
        start = time.monotonic()
        run_checked(t, ["sh", "-c", f"{BUSYBOX} nc {peer.ipv4} 7391 < {blob}"], timeout=120)
        assert sink.wait(timeout=60) == 0, describe(sink)
        elapsed = time.monotonic() - start
    finally:
        stop(sink)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    mbit = 8 * MiB * 8 / elapsed / 1e6
    assert mbit < 40 * 1.5, f"{mbit:.1f} Mbit/s through a 40 Mbit/s limit"


def test_a_static_listener_takes_a_port_netkernel_frees(static_bin, tenant, peer_ns) -> None:
    """A static server whose port is held through NetKernel (here by a preloaded program on
    the tenant's address) is reachable as soon as that one goes: the relay keeps trying."""
    t, peer = tenant(uname("sretry")), peer_ns()
    net = str(static_bin / "net")
    holder = t.popen(
        [
            PY,
            "-u",
            "-c",
            f"import socket,time\ns=socket.create_server(({t.ipv4!r},7361))\n"
            "print('READY',flush=True)\ntime.sleep(3)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        wait_line(holder, r"^READY")
        server = t.popen([net, "server", "7361"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_line(server, r"^READY")
        assert holder.wait(timeout=30) == 0, describe(holder)
        wait_port(peer, t.ipv4, 7361, timeout=20)
        proc = peer.run([net, "client", t.ipv4, "7361", str(MiB)], capture_output=True, text=True)
        assert proc.stdout.split() == ["OK", peer.ipv4, str(MiB)], describe(proc)
        log = run_checked(t, ["cat", "/run/netkernel/relay.log"]).stdout
        assert f"cannot listen on {t.ipv4}:7361 through NetKernel" in log, log  # it was taken
    finally:
        stop(holder)
        if server is not None:
            stop(server)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("READY", flush=True)
while True:
    d, a = s.recvfrom(65536)
    s.sendto(d, a)
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_socket_behaviour_matches_native(family, tenant, peer_ns) -> None:
    """The same probe natively (in a second peer namespace) and in a tenant without GuestLib:
    the same lines, but for its own address and a refused connect (a documented difference:
    the relay accepts before it knows; docs/architecture.md)."""
    t, peer, native = tenant(uname("ssem")), peer_ns(), peer_ns()
    host = peer.ipv4 if family == "ipv4" else peer.ipv6
    servers = [
        peer.popen([PY, "-u", str(PROGS / "echo_server.py"), host, "7371"], stdout=subprocess.PIPE),
        peer.popen([PY, "-u", "-c", UDP_ECHO, "7372"], stdout=subprocess.PIPE),
    ]
    try:
        for s in servers:
            wait_line(s, r"^READY")
        probe = [PY, str(PROGS / "socket_probe.py"), host, "7371", "7379", "7372"]
        want = native.run(probe, capture_output=True, text=True)
        got = t.run(["env", "-u", "LD_PRELOAD", *probe], capture_output=True, text=True, timeout=120)
        assert want.returncode == 0, describe(want)
        assert got.returncode == 0, describe(got)
        mine = t.ipv4 if family == "ipv4" else t.ipv6
        theirs = native.ipv4 if family == "ipv4" else native.ipv6
        w, g = want.stdout.splitlines(), got.stdout.splitlines()
        assert [ln for ln in g if ln.startswith("own")] == [f"own {mine}", f"own udp {mine}"], got.stdout
        assert [ln for ln in w if ln.startswith("own")] == [f"own {theirs}", f"own udp {theirs}"], want.stdout
        same = [ln for ln in w if not ln.startswith(("own", "closed port"))]
        assert [ln for ln in g if not ln.startswith(("own", "closed port"))] == same, got.stdout
        assert w[-1] == "closed port: ECONNREFUSED", want.stdout
        assert g[-1] in ("closed port: ECONNREFUSED", "closed port: connected, then ECONNRESET"), got.stdout
    finally:
        for s in servers:
            stop(s)


def test_a_preloaded_programs_sockets_are_left_to_the_engine(tenant) -> None:
    """A preloaded program's wildcard listener and UDP socket also have a kernel half in the
    namespace (the engine's, for the tenant's loopback): the relay must not take them for a
    static program's and try to listen for them (it would fail, and try again and again)."""
    t = tenant(uname("sleave"))
    code = (
        "import socket,time\n"
        "s=socket.create_server(('0.0.0.0',7381))\n"
        "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.bind(('0.0.0.0',7382))\n"
        "time.sleep(1.5)\n"
    )
    run_checked(t, [PY, "-c", code])
    log = run_checked(t, ["cat", "/run/netkernel/relay.log"]).stdout
    assert ":7381" not in log and ":7382" not in log, log


ECHO_CLIENT_RETRY = (
    CONNECT_RETRYING
    + """
s.sendall(b"after the restart")
s.shutdown(socket.SHUT_WR)
got = b""
while data := s.recv(100):
    got += data
print(got.decode())
"""
)


def test_a_static_server_restarting_on_its_port_loses_no_client(static_bin, tenant, peer_ns) -> None:
    """A client that connects while the program is between two runs on the same port is
    either refused (and tries again) or held until the new one listens: never accepted and
    then reset."""
    t, peer = tenant(uname("srestart")), peer_ns()
    net = str(static_bin / "net")
    first = t.popen([net, "server", "7396"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_line(first, r"^READY")
    wait_port(peer, t.ipv4, 7396, timeout=20)
    stop(first)
    client = peer.popen(
        [PY, "-c", ECHO_CLIENT_RETRY, t.ipv4, "7396"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(0.3)
    second = t.popen([net, "server", "7396"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert out.decode().strip() == "after the restart"
    finally:
        stop(second)


HELD_CLIENT = """
import hashlib, os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"hello")
assert s.recv(5) == b"hello"
print("CONNECTED", s.getsockname()[1], flush=True)
sys.stdin.readline()
data = os.urandom(8 << 20)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
h, n = hashlib.sha256(), 0
while chunk := s.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
ok = n == len(data) and h.digest() == hashlib.sha256(data).digest()
print("OK" if ok else f"MISMATCH {n}", flush=True)
"""


def test_relayed_connections_are_carried_by_the_engine_and_outlive_the_relay(tenant, peer_ns) -> None:
    """Once a static program's connection is up both ways, the relay hands the program's end
    to the engine (`carrier` direct in `conns`), which moves its bytes from then on: the relay
    can die (and restart) under it, and 8 MiB each way still arrive intact. A preloaded
    program's connection stays GuestLib's."""
    t, peer = tenant(uname("scarry")), peer_ns()
    server = peer.popen([PY, "-u", str(PROGS / "echo_server.py"), peer.ipv4, "7398"], stdout=subprocess.PIPE)
    clients = []
    try:
        wait_line(server, r"^READY")
        for preload in (False, True):
            wrap = [] if preload else ["env", "-u", "LD_PRELOAD"]
            c = t.popen(
                [*wrap, PY, "-u", "-c", HELD_CLIENT, peer.ipv4, "7398"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            clients.append(c)
            wait_line(c, r"^CONNECTED")
        conns = json.loads(nk("conns", "--tenant", t.name, "--json", check=True).stdout)["conns"]
        carriers = sorted(c.get("carrier") for c in conns if c["peer"].endswith(":7398"))
        assert carriers == ["direct", "guest"], conns
        # The relay's worker (the newest of its two processes) dies; its parent restarts it.
        run_checked(t, ["sh", "-c", "kill -9 $(pgrep -n netkernel-relay)"])
        for c in clients:
            out, err = c.communicate("go\n", timeout=120)
            assert c.returncode == 0 and out.splitlines()[-1] == "OK", describe(c)
        log = run_checked(t, ["cat", "/run/netkernel/relay.log"]).stdout
        assert "restarting" in log, log
    finally:
        for c in clients:
            stop(c)
        stop(server)
