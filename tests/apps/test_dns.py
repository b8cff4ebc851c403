"""Name resolution inside tenants.

glibc's resolver (getaddrinfo, getent) in a tenant goes through the engine's stub resolver on
127.0.0.53 to the daemon's DNS responder: `<tenant>.tenant.netkernel`, /etc/hosts and the
config's `[dns] hosts`. The daemon cannot be pointed at another upstream, so a dnsmasq in a
peer namespace is queried directly by a tenant program (UDP and TCP, IPv4 and IPv6), which is
what a resolver library configured with that server would do.
"""

from __future__ import annotations

import subprocess

import pytest
from apputil import PROGS, PY, describe, run_checked, stop, uname
from conftest import nk, wait_port

GAI = r"""
import socket, sys
name = sys.argv[1]
try:
    infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
except socket.gaierror as e:
    print("GAIERROR", e.errno)
    sys.exit(0)
for fam, _, _, _, sa in infos:
    print({socket.AF_INET: "A", socket.AF_INET6: "AAAA"}[fam], sa[0])
"""


def gai(runner, name: str) -> set[tuple[str, str]]:
    proc = run_checked(runner, [PY, "-c", GAI, name], timeout=60)
    return {tuple(ln.split()) for ln in proc.stdout.splitlines()}


def test_tenant_names(tenant) -> None:
    a = tenant(uname("dnsa"))
    b = tenant(uname("dnsb"))
    assert gai(a, f"{a.name}.tenant.netkernel") == {("A", a.ipv4), ("AAAA", a.ipv6)}
    assert gai(a, f"{b.name}.tenant.netkernel") == {("A", b.ipv4), ("AAAA", b.ipv6)}
    # Case-insensitive, trailing dot.
    assert gai(b, f"{a.name.upper()}.TENANT.NETKERNEL.") == {("A", a.ipv4), ("AAAA", a.ipv6)}
    # glibc's own tool, no Python involved (AF_UNSPEC).
    proc = run_checked(a, ["getent", "ahosts", f"{b.name}.tenant.netkernel"], timeout=60)
    assert {b.ipv4, b.ipv6} <= set(proc.stdout.split()), describe(proc)
    # Unknown names fail cleanly (NXDOMAIN, nothing forwarded off the machine).
    (result,) = gai(a, "no-such-tenant.tenant.netkernel")
    assert result[0] == "GAIERROR", result
    (result,) = gai(a, "nonexistent.invalid")
    assert result[0] == "GAIERROR", result


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_family_specific_lookup_with_ai_addrconfig(family, tenant) -> None:
    """getaddrinfo(AF_INET or AF_INET6, AI_ADDRCONFIG) -- what `getent ahostsv4`, wget, ping
    and many other programs do -- must find the name: the tenant does have an address of that
    family (on its NSM), as a host with a configured interface would."""
    a = tenant(uname("dnsa"))
    b = tenant(uname("dnsb"))
    db, addr = ("ahostsv4", b.ipv4) if family == "ipv4" else ("ahostsv6", b.ipv6)
    proc = a.run(["getent", db, f"{b.name}.tenant.netkernel"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split()[:1] == [addr], describe(proc)
    fam = "socket.AF_INET" if family == "ipv4" else "socket.AF_INET6"
    code = (
        f"import socket; print(socket.getaddrinfo({b.name + '.tenant.netkernel'!r}, 80, {fam}, "
        "socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)[0][4][0])"
    )
    proc = a.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == addr, describe(proc)


def test_connect_by_tenant_name(tenant, nk_tmpdir) -> None:
    """curl in tenant A fetches from http.server in tenant B by B's name, over both families."""
    a = tenant(uname("dnsa"))
    b = tenant(uname("dnsb"))
    (nk_tmpdir / "hello.txt").write_text("hello by name\n")
    nk_tmpdir.chmod(0o755)
    server = b.popen(
        [PY, "-m", "http.server", "8080", "--bind", "::", "--directory", str(nk_tmpdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from apputil import tenant_wait_port

        tenant_wait_port(a, b.ipv4, 8080)
        for flag in ("-4", "-6"):
            proc = run_checked(
                a,
                [
                    "curl",
                    "-sS",
                    "--fail",
                    flag,
                    "--max-time",
                    "30",
                    f"http://{b.name}.tenant.netkernel:8080/hello.txt",
                ],
                timeout=60,
            )
            assert proc.stdout == "hello by name\n", describe(proc)
    finally:
        stop(server)


@pytest.fixture
def dnsmasq_peer(peer_ns, nk_tmpdir):
    peer = peer_ns()
    proc = peer.popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            f"--listen-address={peer.ipv4}",
            f"--listen-address={peer.ipv6}",
            "--bind-interfaces",
            "--log-facility=-",
            f"--host-record=svc.peer.test,{peer.ipv4},{peer.ipv6}",
            "--address=/wild.peer.test/198.19.250.250",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_port(peer, peer.ipv4, 53, timeout=20)
        yield peer
    finally:
        stop(proc)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dnsmasq_in_peer(transport, family, tenant, dnsmasq_peer) -> None:
    peer = dnsmasq_peer
    t = tenant(uname("dns"))
    server = peer.ipv4 if family == "ipv4" else peer.ipv6
    q = [PY, str(PROGS / "dns_query.py"), server]
    proc = run_checked(t, [*q, "svc.peer.test", "A", transport], timeout=60)
    assert proc.stdout.split("\n")[:2] == [f"A {peer.ipv4}", "RCODE 0"], describe(proc)
    proc = run_checked(t, [*q, "svc.peer.test", "AAAA", transport], timeout=60)
    assert proc.stdout.split("\n")[:2] == [f"AAAA {peer.ipv6}", "RCODE 0"], describe(proc)
    proc = run_checked(t, [*q, "x.wild.peer.test", "A", transport], timeout=60)
    assert proc.stdout.split("\n")[:2] == ["A 198.19.250.250", "RCODE 0"], describe(proc)


def test_config_dns_hosts(nk_daemon, tenant, peer_ns, nk_tmpdir) -> None:
    """Restart the daemon with `[dns] hosts` naming a peer; a tenant resolves it with
    getaddrinfo and fetches from it by name. The default daemon is restored afterwards."""
    conf = nk_tmpdir / "netkernel.toml"
    conf.write_text(
        '[dns]\nhosts = { "peerhost.example" = "198.19.240.1", "peerhost6.example" = "fd6e:6b00::ff:f0" }\n'
    )
    nk("down", check=True)
    try:
        nk("up", "--config", str(conf), check=True)
        peer = peer_ns()
        # Give this peer the addresses the config names (in the reserved peer range).
        for cmd in (
            ["ip", "-n", peer.name, "addr", "add", "198.19.240.1/15", "dev", "eth0"],
            ["ip", "-n", peer.name, "addr", "add", "fd6e:6b00::ff:f0/64", "dev", "eth0", "nodad"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        (nk_tmpdir / "hi.txt").write_text("hi from peerhost\n")
        nk_tmpdir.chmod(0o755)
        server = peer.popen(
            [PY, "-m", "http.server", "8081", "--bind", "::", "--directory", str(nk_tmpdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(peer, "198.19.240.1", 8081, timeout=20)
            t = tenant(uname("dnscfg"))
            assert gai(t, "peerhost.example") == {("A", "198.19.240.1")}
            assert gai(t, "peerhost6.example") == {("AAAA", "fd6e:6b00::ff:f0")}
            for name in ("peerhost.example", "peerhost6.example"):
                proc = run_checked(
                    t, ["curl", "-sS", "--fail", "--max-time", "30", f"http://{name}:8081/hi.txt"], timeout=60
                )
                assert proc.stdout == "hi from peerhost\n", describe(proc)
        finally:
            stop(server)
    finally:
        nk("down")
        nk("up", check=True)


# Queries straight to the tenant's stub, with chosen ids: two that share an id modulo 256
# (glibc's parallel A and AAAA do, one lookup in 256, and the stub once kept one of them per
# id % 256: the other's answer was dropped and glibc waited 5 s), and the same id from two
# sockets at once. Each must get its own answer, under its own id.
RAW_IDS = r"""
import socket, struct, sys

def make_query(name, qtype, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", qtype, 1)

def answers(r):
    pos = 12
    while r[pos]:
        pos += r[pos] + 1
    pos += 5
    out = []
    for _ in range(struct.unpack_from("!H", r, 6)[0]):
        rtype, _, _, n = struct.unpack_from("!HHIH", r, pos + 2)
        pos += 12
        if rtype == 1:
            out.append(socket.inet_ntoa(r[pos : pos + n]))
        pos += n
    return out

a, b = sys.argv[1], sys.argv[2]
s1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for s in (s1, s2):
    s.settimeout(3)
    s.connect(("127.0.0.53", 53))
s1.send(make_query(a, 1, 0x0105))
s1.send(make_query(b, 1, 0x0205))
s2.send(make_query(b, 1, 0x0105))
got = {}
for s, tag in ((s1, "s1"), (s1, "s1"), (s2, "s2")):
    r = s.recv(4096)
    qid = struct.unpack_from("!H", r)[0]
    got[(tag, hex(qid))] = answers(r)
print(sorted(got.items()))
"""


def test_stub_keeps_queries_that_share_an_id_apart(tenant) -> None:
    a = tenant(uname("dnsid"))
    b = tenant(uname("dnsidb"))
    proc = run_checked(
        a, [PY, "-c", RAW_IDS, f"{a.name}.tenant.netkernel", f"{b.name}.tenant.netkernel"], timeout=60
    )
    assert proc.stdout.strip() == str(
        sorted(
            {
                ("s1", "0x105"): [a.ipv4],
                ("s1", "0x205"): [b.ipv4],
                ("s2", "0x105"): [b.ipv4],
            }.items()
        )
    ), describe(proc)
