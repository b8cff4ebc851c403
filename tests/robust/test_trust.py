"""The engine's trust boundary, one test per finding (docs/threat-model.md).

A hostile tenant process (progs/hostile.c) attacks the engine through what it may write: its
region, its control connection and the fds it passes, its proxy fds, its own sockets. Each
test judges from outside: the engine is alive, a neighbour tenant's ping-pong and fresh
connections through the engine never stall meanwhile (progs/pinger.py, the stall oracle),
and what the operator sees (`ps`, `conns`, the engine's counters) comes from engine state.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import TENANT_PY, engine_never_died, nk
from helpers_c import build_c

from netkernel.config import ENGINE_PID_FILE

HERE = Path(__file__).resolve().parent
PROGS = HERE / "progs"
PY = TENANT_PY
ECHO = HERE.parent / "apps" / "progs" / "echo_server.py"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(PROGS / "hostile.c", tmp_path_factory.mktemp("hostile"), ["-pthread"])


def engine_pid() -> int:
    return int(ENGINE_PID_FILE.read_text())


def engine_alive() -> bool:
    return engine_never_died()  # a restarted engine would hide a crash


def engine_cpu_seconds() -> float:
    fields = Path(f"/proc/{engine_pid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_kv(text: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", text))


class Neighbour:
    """A tenant beside the attacker, with an echo server on a peer host to talk to."""

    def __init__(self, tenant: Any, peer: Any, port: int) -> None:
        self.t, self.peer, self.port = tenant, peer, port
        self.echo = peer.popen([PY, str(ECHO), "0.0.0.0", str(port)], stdout=subprocess.PIPE, text=True)
        assert self.echo.stdout is not None
        assert self.echo.stdout.readline().startswith("READY"), "echo server did not start"

    @contextmanager
    def watching(self, seconds: float) -> Iterator[dict[str, Any]]:
        """Runs the pinger for `seconds` around the body; the dict gets its figures after."""
        result: dict[str, Any] = {}
        p = self.t.popen(
            [PY, str(PROGS / "pinger.py"), self.peer.ipv4, str(self.port), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        try:
            yield result
        finally:
            out, err = p.communicate(timeout=seconds + 60)
            figures = parse_kv(out)
            assert figures, f"pinger printed nothing: {out!r} {err!r}"
            result.update({k: float(v) for k, v in figures.items()})
            result["text"] = out.strip()

    def assert_unharmed(self, r: dict[str, Any]) -> None:
        """No round and no fresh connection took more than two seconds, none failed."""
        assert engine_alive(), "the engine died"
        assert r["errors"] == 0 and r["max_ms"] < 2000 and r["connect_max_ms"] < 2000, r["text"]
        assert r["rounds"] > 100 and r["connects"] > 5, r["text"]


@pytest.fixture
def neighbour(tenant: Any, peer_ns: Any) -> Neighbour:
    return Neighbour(tenant("bystand"), peer_ns(), 7300)


def run_hostile(t: Any, exe: Path, *args: str, timeout: float = 90) -> dict[str, str]:
    r = t.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"hostile {args} exited {r.returncode}: {r.stdout} {r.stderr}"
    return parse_kv(r.stdout)


def test_region_memfd_is_sealed(tenant: Any, hostile: Path, neighbour: Neighbour) -> None:
    """Shrinking the region would make the engine's next access SIGBUS for every tenant."""
    t = tenant("sealed")
    with neighbour.watching(4) as r:
        got = run_hostile(t, hostile, "seal")
        time.sleep(1)
    assert got == {"shrink": "EPERM", "grow": "EPERM"}, got
    neighbour.assert_unharmed(r)


def test_listening_socket_as_proxy_fd(tenant: Any, hostile: Path) -> None:
    """A listening SEQPACKET socket is not a proxy fd: refused, and no busy loop on it."""
    t = tenant("lproxy")
    p = t.popen([str(hostile), "listenproxy", "6"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    time.sleep(1)
    cpu0, t0 = engine_cpu_seconds(), time.monotonic()
    time.sleep(3)
    busy = (engine_cpu_seconds() - cpu0) / (time.monotonic() - t0)
    p.wait(timeout=30)
    assert line.strip() == "reply=EINVAL", line
    assert busy < 0.5, f"the engine was busy {busy:.0%} of a core with the socket open"


@pytest.mark.parametrize("mode", ["proxy", "extra", "onproxy", "passcred", "reenable"])
def test_lingering_socket_passed_to_the_engine(
    mode: str, tenant: Any, hostile: Path, neighbour: Neighbour
) -> None:
    """The last reference to a socket whose close() lingers 60 s, handed to the engine as a
    proxy fd, as an fd too many, or inside a record on a proxy fd (passcred: a full record on
    a proxy end asked to receive credentials and a pidfd too, which crowd out descriptors the
    kernel then closes in the reader's thread; reenable: queued on the engine's proxy end
    through a copy of it the tenant kept, with descriptors allowed again, then released by
    the engine's close of that end): the engine must not wait for it. The attack goes first,
    while the engine sleeps (so that its copy is the last one)."""
    t = tenant(f"ling{mode[:3]}")
    p = t.popen([str(hostile), "linger", mode, "6"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    with neighbour.watching(4) as r:
        pass
    p.kill()
    out, _ = p.communicate()
    print(out, r)
    neighbour.assert_unharmed(r)


def engine_fds() -> int:
    return len(os.listdir(f"/proc/{engine_pid()}/fd"))


def wait_engine_fds(at_most: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    n = engine_fds()
    while n > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
        n = engine_fds()
    return n


# Sockets (each a proxy end in the engine) and control connections, opened and closed.
CHURN = """import os, socket
for _ in range(300):
    socket.socket().close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(os.environ["NETKERNEL_SOCKET"])
    c.close()
print("ok")
"""


@pytest.mark.parametrize("mode", ["extra", "nested"])
def test_closer_is_not_stuck_by_a_lingering_socket(mode: str, tenant: Any, hostile: Path) -> None:
    """What the engine closes off its loop (descriptors passed in, proxy ends) is closed by a
    thread of its own: a lingering socket handed over (as an fd too many, or queued inside a
    UNIX socket handed over) must not hold that thread for its linger time, or every proxy
    end closed after it stays open in the engine (descriptors it no longer counts)."""
    t = tenant(f"closer{mode[:3]}")
    before = engine_fds()
    p = t.popen([str(hostile), "linger", mode, "30"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        r = t.run([PY, "-c", CHURN], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "ok", r.stderr
        # The attacker still holds its control connection and one socket.
        after = wait_engine_fds(before + 20, 10)
        assert after <= before + 20, f"engine fds {before} before, {after} after 300 sockets closed"
    finally:
        p.kill()
        p.communicate()


def test_control_connections_never_written_to_are_bounded(tenant: Any, hostile: Path) -> None:
    """Control connections over the tenant's share of descriptors are refused; those that
    never send a request must not be held without limit (each is a descriptor in the engine
    outside every budget)."""
    t = tenant("ctlhold")
    nk("tenant", "set", t.name, "--max-sockets", "1", check=True)
    before = engine_fds()
    p = t.popen([str(hostile), "ctlhold", "900", "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        held = parse_kv(p.stdout.readline())
        assert int(held["held"]) >= 600, held  # connect() succeeds: the engine's backlog
        time.sleep(2)
        grew = engine_fds() - before
        # Its share: four per socket and NK_CTL_FDS (256) control connections; a few over it
        # are held to be answered EMFILE.
        assert grew <= 4 + 256 + 16, f"the engine holds {grew} more descriptors for {held} connections"
    finally:
        p.kill()
        p.communicate()
    assert wait_engine_fds(before + 4, 10) <= before + 4


def test_loopback_datagram_flood(tenant: Any, hostile: Path, neighbour: Neighbour) -> None:
    """Datagrams to the tenant's loopback skip policy; the engine's pass over them must end."""
    t = tenant("dgflood")
    with neighbour.watching(6) as r:
        got = run_hostile(t, hostile, "dgramflood", "5")
    assert int(got["datagrams"]) > 0
    neighbour.assert_unharmed(r)


def test_closed_shm_connection_fed_forever(tenant: Any, hostile: Path, neighbour: Neighbour) -> None:
    """A closed connection on the shared-memory path is flushed into its peer by the engine;
    a tenant that keeps both rings moving must not keep the engine in that flush."""
    t = tenant("shmflood")
    with neighbour.watching(6) as r:
        run_hostile(t, hostile, "shmflood", t.ipv4, "7401", "5")
    neighbour.assert_unharmed(r)


def test_engine_fds_are_accounted_per_tenant(tenant: Any, hostile: Path, neighbour: Neighbour) -> None:
    """Control connections, then sockets (a dual-stack wildcard bind holds four engine fds),
    until the engine says no: the tenant gets EMFILE, as from Linux, and the neighbour keeps
    opening connections through the engine meanwhile."""
    t = tenant("fdflood")
    with neighbour.watching(14) as r:
        p = t.popen([str(hostile), "fdflood", "5"], stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=120)
    got = parse_kv(out)
    assert got.get("ctl_err") == "EMFILE" and got.get("sock_err") == "EMFILE", out
    neighbour.assert_unharmed(r)
    # Once it is gone, its fds are given back: the tenant itself works again.
    r2 = t.run(
        [PY, "-c", "import socket; socket.socket().bind(('0.0.0.0', 0)); print('ok')"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r2.stdout.strip() == "ok", r2.stderr


def udp_echo_once(sock: socket.socket) -> None:
    for _ in range(2):
        data, addr = sock.recvfrom(100)
        sock.sendto(data, addr)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_zero_length_datagrams_both_ways(family: str, tenant: Any, peer_ns: Any) -> None:
    """Linux delivers an empty datagram, then the next one. A peer's empty datagram to a
    server in a tenant, and a tenant's empty datagram to a peer, must not wedge either side."""
    t, peer = tenant(f"zero{family[-1]}"), peer_ns()
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    paddr = peer.ipv4 if family == "ipv4" else peer.ipv6
    server = t.popen(
        [PY, str(PROGS / "udp_zero.py"), "serve", "::" if family == "ipv6" else "0.0.0.0", "7501"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "READY"
    r = peer.run(
        [PY, str(PROGS / "udp_zero.py"), "client", addr, "7501"], capture_output=True, text=True, timeout=30
    )
    assert r.stdout.split() == ["got=0", "got=3"], r.stdout + r.stderr
    server.wait(timeout=10)
    # The other way round: the tenant sends, the peer echoes.
    echo = peer.popen(
        [PY, str(PROGS / "udp_zero.py"), "serve", "::" if family == "ipv6" else "0.0.0.0", "7502"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "READY"
    r = t.run(
        [PY, str(PROGS / "udp_zero.py"), "client", paddr, "7502"], capture_output=True, text=True, timeout=30
    )
    assert r.stdout.split() == ["got=0", "got=3"], r.stdout + r.stderr
    echo.wait(timeout=10)


def test_conns_shows_engine_state_not_slot_contents(tenant: Any, hostile: Path, peer_ns: Any) -> None:
    """`netkernel conns` must not repeat what a tenant wrote into its slot headers."""
    t, peer = tenant("liar"), peer_ns()
    echo = peer.popen([PY, str(ECHO), "0.0.0.0", "7601"], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None and echo.stdout.readline().startswith("READY")
    p = t.popen([str(hostile), "lie", peer.ipv4, "7601", "5"], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    conns = json.loads(nk("conns", "--tenant", t.name, "--json", check=True).stdout)["conns"]
    p.wait(timeout=30)
    streams = [c for c in conns if c["kind"] == "stream"]
    assert streams, conns
    for c in streams:
        assert "10.66.66.66" not in f"{c['local']} {c['peer']}", c
    assert any(c["peer"] == f"{peer.ipv4}:7601" for c in streams), streams


def test_pending_connections_respect_the_backlog(tenant: Any, peer_ns: Any) -> None:
    """Connections nobody accepts wait in the kernel's queues, as in Linux: the engine holds
    no more of them than the listener's backlog (each would take a slot and fds)."""
    t, peer = tenant("backlog"), peer_ns()
    server = t.popen(
        [
            PY,
            "-c",
            "import socket,time,sys\n"
            "s=socket.socket(); s.bind(('0.0.0.0', 7701)); s.listen(16)\n"
            "print('READY', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "READY"
    clients = peer.popen(
        [
            PY,
            "-c",
            "import socket,time\n"
            "cs=[socket.socket() for _ in range(60)]\n"
            f"for c in cs: c.setblocking(False); c.connect_ex(('{t.ipv4}', 7701))\n"
            "time.sleep(20)",
        ]
    )
    try:
        time.sleep(4)
        sockets = next(
            x for x in json.loads(nk("ps", "--json", check=True).stdout)["tenants"] if x["name"] == t.name
        )["sockets"]
    finally:
        clients.kill()
        server.kill()
    # The listener, backlog + 1 waiting connections (as Linux queues), one held for delivery.
    assert sockets <= 1 + 17 + 1, f"{sockets} sockets held for a listen(16) nobody accepts on"


def region_bytes(tenant: str) -> int:
    """Pages the engine's memfd of this tenant's region holds (seen from the host)."""
    pid = engine_pid()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:netkernel-{tenant} "):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    raise AssertionError(f"no region memfd for {tenant}")


def test_region_memory_is_held_to_max_memory(tenant: Any, hostile: Path) -> None:
    """max_memory bounds the shared memory a tenant's sockets hold. A tenant that writes into
    the rings of slots it does not use gets those pages taken back."""
    t = tenant("tamper")
    nk("tenant", "set", t.name, "--max-memory", "32MiB", check=True)
    p = t.popen([str(hostile), "tamper", "8"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    touched = int(parse_kv(p.stdout.readline())["touched"])
    assert touched >= 128 << 20
    held = region_bytes(t.name)
    deadline = time.monotonic() + 6
    while held > 32 << 20 and time.monotonic() < deadline:
        time.sleep(0.2)
        held = region_bytes(t.name)
    p.wait(timeout=30)
    assert held <= 32 << 20, f"the region holds {held >> 20} MiB after the tenant wrote {touched >> 20} MiB"


def test_dns_relay_is_rate_limited(tenant: Any, hostile: Path) -> None:
    """A tenant flooding its DNS stub is held to a rate; a neighbour still resolves names."""
    t, other = tenant("dnsflood"), tenant("dnsok")
    p = t.popen([str(hostile), "dnsflood", "5"], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    slow = 0.0
    for _ in range(10):
        t0 = time.monotonic()
        lookup = f"import socket; print(socket.getaddrinfo('{t.name}.tenant.netkernel', 80)[0][4][0])"
        r = other.run([PY, "-c", lookup], capture_output=True, text=True, timeout=30)
        slow = max(slow, time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    out, _ = p.communicate(timeout=30)
    stats = {x["name"]: x for x in json.loads(nk("ps", "--json", check=True).stdout)["tenants"]}
    relayed = stats[t.name]["dns_relayed"]
    assert relayed is not None and relayed < 2000, f"{relayed} queries relayed of {out.strip()}"
    assert stats[t.name]["dns_dropped"] > 0
    assert slow < 5, f"a neighbour's lookup took {slow:.1f} s"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_privileged_options_answered_as_for_an_unprivileged_process(family: str, tenant: Any) -> None:
    """The engine sets a tenant's options as root; the tenant must still get the answer Linux
    gives a process without capabilities (EPERM for IPv6 hop-by-hop options, EACCES for
    SO_DEBUG, EINVAL for unknown IP options...), pinned here by running the same probe natively
    as nobody."""
    t = tenant(f"privopt{family[-1]}")
    host = "127.0.0.1" if family == "ipv4" else "::1"
    native = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            str(PROGS / "privopts.py"),
            host,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert native.returncode == 0, native.stderr
    expected = parse_kv(native.stdout)
    assert expected["SO_MARK"] == "EPERM"  # the probe really ran unprivileged
    addr = t.ipv4 if family == "ipv4" else t.ipv6
    got = parse_kv(
        t.run(
            [PY, str(PROGS / "privopts.py"), addr], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    )
    assert got == expected


def test_option_checks_stay_out_of_the_host_namespace(tenant: Any) -> None:
    """A socket with no kernel socket yet has its options checked on a scratch socket; made in
    the engine's namespace, a multicast join on it would reach the host's interfaces. Joined
    on an interface only the host has, it must fail as in the tenant's own view (ENODEV)."""
    t = tenant("mcast")
    host_only = {int(p.read_text()) for p in Path("/sys/class/net").glob("*/ifindex")}
    nsm_ifs = subprocess.run(
        ["ip", "-n", "nk-nsm-kernel", "-j", "link"], capture_output=True, text=True, check=True
    ).stdout
    host_only -= {link["ifindex"] for link in json.loads(nsm_ifs)}
    index = max(host_only)
    r = t.run(
        [
            PY,
            "-c",
            "import socket,struct,errno\n"
            "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"m=struct.pack('4s4si', socket.inet_aton('239.1.2.3'), bytes(4), {index})\n"
            "try:\n s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, m); print('joined')\n"
            "except OSError as e: print(errno.errorcode[e.errno])",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout.strip() == "ENODEV", r.stdout + r.stderr


# -- the control plane ---------------------------------------------------------------------

ASK_DAEMON = """import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("unreachable", e.strerror); sys.exit(0)
s.sendall(b'{"v": 1, "op": "status"}\\n')
reply = s.makefile().readline()
print("reply", json.loads(reply)["ok"] if reply else "closed", reply.strip())
"""


def test_daemon_api_refuses_a_tenant(tenant: Any) -> None:
    """The daemon's API (which sets policy, deletes tenants, shuts NetKernel down) answers
    only the host: a process in a tenant's namespace, even one running as root there, is
    refused by its credentials and namespace, whatever the socket file's mode lets through."""
    from netkernel.config import DAEMON_SOCKET

    t = tenant("askapi")
    # As a tenant program runs, and as a root process merely placed in its namespace.
    r = t.run([PY, "-c", ASK_DAEMON, str(DAEMON_SOCKET)], capture_output=True, text=True, timeout=30)
    inside = r.stdout.strip() + r.stderr.strip()
    r = subprocess.run(
        ["ip", "netns", "exec", t.netns, PY, "-c", ASK_DAEMON, str(DAEMON_SOCKET)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    raw = r.stdout.strip() + r.stderr.strip()
    for out in (inside, raw):
        assert out.startswith("unreachable") or out.startswith("reply False"), out
    assert "permission denied" in raw, raw


ASK_NSM = """import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(3)
try:
    s.connect(sys.argv[1])
    data = s.recv(4096)
    print("hello" if data else "closed")
except OSError as e:
    print("unreachable", e.strerror)
"""


def test_external_nsm_socket_refuses_a_tenant(tenant: Any, tmp_path: Path) -> None:
    """Whoever connects to an external NSM's socket is handed the regions of the tenants it
    serves. Only root in the NSM's own namespace may: not a root process in a tenant's."""
    from netkernel.config import ADMIN_SOCKET
    from netkernel.engine import EngineClient

    t = tenant("asknsm")
    ns = "nk-nsm-trust"
    path = f"/run/netkernel/nsm-trust-{os.getpid()}.sock"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    engine = EngineClient(ADMIN_SOCKET)
    try:
        engine.nsm_add("trust", f"/run/netns/{ns}", path)
        out = subprocess.run(
            ["ip", "netns", "exec", t.netns, PY, "-c", ASK_NSM, path],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        assert out in ("closed", "unreachable Permission denied") or out.startswith("unreachable"), out
        # Root in the NSM's namespace is what the daemon runs it as: that one is served.
        ok = subprocess.run(
            ["ip", "netns", "exec", ns, PY, "-c", ASK_NSM, path], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        assert ok == "hello", ok
    finally:
        engine.nsm_del("trust")
        engine.close()
        subprocess.run(["ip", "netns", "del", ns])


def test_host_services_on_the_bridge_are_unreachable(tenant: Any, nk_daemon: Any) -> None:
    """A service the host runs on all its addresses must not be reachable from a tenant over
    the fabric (its NSM sits on the bridge, which holds a host address). DNS, which NetKernel
    serves there, still works."""
    from netkernel.config import Config

    bridge = str(Config().bridge_ipv4)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7801))
    srv.listen(8)
    t = tenant("tohost")
    try:
        r = t.run(
            [
                PY,
                "-c",
                "import socket,sys\n"
                "s=socket.socket(); s.settimeout(3)\n"
                f"try: s.connect(('{bridge}', 7801)); print('connected')\n"
                "except OSError as e: print(type(e).__name__)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.stdout.strip() in ("TimeoutError", "ConnectionRefusedError"), r.stdout + r.stderr
        r = t.run(
            [PY, "-c", "import socket; print(socket.getaddrinfo('askapi.tenant.netkernel', 80)[0][0])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 or r.stdout.strip(), r.stderr  # the resolver answered (name or NXDOMAIN)
    finally:
        srv.close()
