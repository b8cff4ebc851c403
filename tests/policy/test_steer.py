"""Steering a moving tenant's frames between two NSM namespaces (netkernel.steer).

A private fabric, no daemon: bridge nkst0 (it also stands for the host, with an address of its
own), namespaces nkst-a (the old NSM), nkst-b (the new NSM) and nkst-p (a remote host), all in
the documentation ranges 198.51.100.0/24 and 2001:db8:5::/64. The tenant address T starts on
nkst-a; three connections of T live there (a peer downloading from T, T downloading from the
peer, the host downloading from T) and keep sending while T is added to nkst-b and the move
begins. They must finish intact in nkst-a while new connections to and from T land in nkst-b.

The peer and the host are made to resolve T to the old or to the new NSM's MAC, so that each
of the two maps has to do the steering on its own in one of the variants.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from conftest import requires_root

from netkernel import netns, steer

pytestmark = requires_root

BRIDGE = "nkst0"
OLD, NEW, PEER = "nkst-a", "nkst-b", "nkst-p"
HOST = None  # the root namespace, through the bridge's own address
NAMESPACES = (OLD, NEW, PEER)


@dataclass(frozen=True)
class Plan:
    family: socket.AddressFamily
    plen: int
    old: str
    new: str
    peer: str
    host: str
    tenant: str
    tenant_v4: str
    tenant_v6: str

    def cidr(self, address: str) -> str:
        return f"{address}/{self.plen}"


T4, T6 = "198.51.100.50", "2001:db8:5::50"
PLANS = {
    4: Plan(
        socket.AF_INET, 24, "198.51.100.1", "198.51.100.2", "198.51.100.100", "198.51.100.254", T4, T4, T6
    ),
    6: Plan(
        socket.AF_INET6,
        64,
        "2001:db8:5::1",
        "2001:db8:5::2",
        "2001:db8:5::100",
        "2001:db8:5::254",
        T6,
        T4,
        T6,
    ),
}

TOTAL = 8 << 20
CHUNK = bytes(range(256)) * 64  # 16 KiB; the stream is CHUNK repeated, cut at TOTAL
EXPECTED = hashlib.sha256((CHUNK * (TOTAL // len(CHUNK) + 1))[:TOTAL]).hexdigest()
TIMEOUT = 10.0


def ip(address: str) -> steer.IPAddress:
    return ipaddress.ip_address(address)


def ss_endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def established(ns: str | None) -> str:
    cmd = ["ss", "-Htn", "state", "established"]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def has_connection(ns: str | None, local: tuple[str, int], remote: tuple[str, int]) -> bool:
    want = {ss_endpoint(*local), ss_endpoint(*remote)}
    return any(want <= set(line.split()) for line in established(ns).splitlines())


def veth_name(ns: str) -> str:
    return f"nkst-v{ns.removeprefix('nkst-')}"


def cleanup() -> None:
    steer.remove_all(BRIDGE)
    netns.kill_netns_processes(NAMESPACES)
    for ns in NAMESPACES:
        # Deleting our end takes the pair down at once; a deleted namespace is torn down
        # asynchronously and would keep the name busy for the next test for a while.
        netns.link_del(veth_name(ns))
        netns.netns_del(ns)
    netns.link_del(BRIDGE)


@dataclass
class Fabric:
    plan: Plan
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def sock(self, ns: str | None) -> socket.socket:
        """A TCP socket living in namespace ``ns`` (None: the host), usable from any thread."""

        def make() -> socket.socket:
            return socket.socket(self.plan.family, socket.SOCK_STREAM)

        s = netns.run_in_netns(ns, make) if ns else make()
        s.settimeout(TIMEOUT)
        self.sockets.append(s)
        return s

    def listen(self, ns: str | None, address: str, port: int) -> socket.socket:
        s = self.sock(ns)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        s.listen(8)
        return s

    def connect(self, ns: str | None, remote: tuple[str, int], local: str | None = None) -> socket.socket:
        s = self.sock(ns)
        if local:
            s.bind((local, 0))
        s.connect(remote)
        return s

    def spawn(self, fn: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                fn()
            except BaseException as e:  # reported by the test, not lost in the thread
                self.errors.append(e)

        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def tag_server(self, ns: str | None, address: str, port: int, tag: bytes) -> None:
        """Answers each connection with ``tag`` and lets the client close first."""
        listener = self.listen(ns, address, port)
        listener.settimeout(None)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # the listener was closed at teardown
                self.sockets.append(conn)
                conn.sendall(tag)

        threading.Thread(target=serve, daemon=True).start()


def set_neighbour(ns: str | None, dev: str, address: str, mac: str) -> None:
    # A dynamic entry: NDP may still update it, as it would on a real peer.
    netns.ip("neigh", "replace", address, "lladdr", mac, "dev", dev, "nud", "reachable", netns=ns)


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def fabric(request: pytest.FixtureRequest) -> Iterator[Fabric]:
    plan = PLANS[request.param]
    cleanup()  # leftovers of an interrupted run
    fab = Fabric(plan)
    try:
        netns.bridge_add(BRIDGE)
        netns.addr_add(BRIDGE, plan.cidr(plan.host))
        for ns, address in ((OLD, plan.old), (NEW, plan.new), (PEER, plan.peer)):
            netns.netns_add(ns)
            # As the daemon does for NSMs: ask for neighbours from the link's own address, not
            # from the tenant's, which two namespaces hold during a move.
            netns.sysctl("net.ipv4.conf.all.arp_announce", "2", netns=ns)
            netns.veth_into(veth_name(ns), ns, "eth0", BRIDGE)
            netns.addr_add("eth0", plan.cidr(address), netns=ns)
        netns.addr_add("eth0", f"{T4}/32", netns=OLD)
        netns.addr_add("eth0", f"{T6}/128", netns=OLD)
        yield fab
    finally:
        for s in fab.sockets:
            # shutdown() wakes a thread blocked in accept() or recv(); close() alone would not,
            # and the blocked call would keep the socket (and its namespace) alive.
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        cleanup()
    assert not fab.errors, fab.errors


def send_stream(s: socket.socket, moved: threading.Event, close_first: bool) -> None:
    """TOTAL bytes, trickled until the move is done so that frames cross it, then at full speed."""
    sent = 0
    while sent < TOTAL:
        piece = CHUNK[: TOTAL - sent]
        s.sendall(piece)
        sent += len(piece)
        if not moved.is_set():
            moved.wait(0.002)
    finish(s, close_first)


def receive_stream(s: socket.socket, close_first: bool, digests: list[str]) -> None:
    h = hashlib.sha256()
    got = 0
    while got < TOTAL:
        data = s.recv(min(1 << 16, TOTAL - got))
        if not data:
            break
        h.update(data)
        got += len(data)
    digests.append(h.hexdigest() if got == TOTAL else f"{got} bytes")
    finish(s, close_first)


def finish(s: socket.socket, close_first: bool) -> None:
    # The remote side closes first, so the tenant's side ends in LAST-ACK -> CLOSED rather than
    # in a 60 s TIME-WAIT that would keep the old NSM from draining.
    if not close_first:
        while s.recv(1 << 16):
            pass
    s.close()


def wait_drained(plan: Plan, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steer.finish_if_drained(BRIDGE, plan.tenant_v4, plan.tenant_v6, OLD):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("resolved_to", ["old", "new"])
def test_move_keeps_old_flows_and_steers_new_ones(fabric: Fabric, resolved_to: str) -> None:
    plan, fab = fabric.plan, fabric
    T = plan.tenant

    # Connections of T that exist before the move, all still sending when it happens.
    old_listener = fab.listen(OLD, T, 5001)
    peer_source = fab.listen(PEER, plan.peer, 6001)
    peer_download = fab.connect(PEER, (T, 5001))
    tenant_upload_end, _ = old_listener.accept()
    host_download = fab.connect(HOST, (T, 5001))
    tenant_upload_end_host, _ = old_listener.accept()
    tenant_download = fab.connect(OLD, (plan.peer, 6001), local=T)
    peer_upload_end, _ = peer_source.accept()
    fab.sockets += [tenant_upload_end, tenant_upload_end_host, peer_upload_end]

    moved = threading.Event()
    digests: list[str] = []
    fab.spawn(lambda: send_stream(tenant_upload_end, moved, close_first=False))
    fab.spawn(lambda: receive_stream(peer_download, True, digests))
    fab.spawn(lambda: send_stream(tenant_upload_end_host, moved, close_first=False))
    fab.spawn(lambda: receive_stream(host_download, True, digests))
    fab.spawn(lambda: send_stream(peer_upload_end, moved, close_first=True))
    fab.spawn(lambda: receive_stream(tenant_download, False, digests))

    # The order the daemon must follow: steer first, then give T to the new NSM. Were T on both
    # NSMs before the steering, a neighbour cache turning to the new NSM would reset the old
    # flows (this test's "new" variant does exactly that to the caches, a moment later).
    fab.tag_server(OLD, T, 80, b"A")  # still listening: only the steering keeps it idle
    started = time.monotonic()
    pinned = steer.begin_move(BRIDGE, plan.tenant_v4, plan.tenant_v6, OLD, NEW)
    move_seconds = time.monotonic() - started
    assert pinned == 3
    netns.addr_add("eth0", f"{T4}/32", netns=NEW)
    netns.addr_add("eth0", f"{T6}/128", netns=NEW)
    fab.tag_server(NEW, T, 80, b"B")
    assert steer.begin_move(BRIDGE, plan.tenant_v4, plan.tenant_v6, OLD, NEW) == 3  # idempotent
    assert not steer.finish_if_drained(BRIDGE, plan.tenant_v4, plan.tenant_v6, OLD)

    fab.tag_server(PEER, plan.peer, 6002, b"P")
    mac = steer.nsm_mac(OLD if resolved_to == "old" else NEW)
    set_neighbour(PEER, "eth0", T, mac)
    set_neighbour(HOST, BRIDGE, T, mac)

    # New connections to T land in the new NSM, from a remote host and from the host itself.
    for ns in (PEER, HOST):
        client = fab.connect(ns, (T, 80))
        assert client.recv(1) == b"B"
        local = client.getsockname()[:2]
        assert has_connection(NEW, (T, 80), local)
        assert not has_connection(OLD, (T, 80), local)
        client.close()
    # A new connection from T in the new NSM gets its answers there.
    client = fab.connect(NEW, (plan.peer, 6002), local=T)
    assert client.recv(1) == b"P"
    assert has_connection(PEER, (plan.peer, 6002), client.getsockname()[:2])
    client.close()

    # The old NSM must resolve its neighbours again in the middle of its flows: over IPv6 it
    # asks from T, and the answer, addressed to T, must reach it rather than the new NSM.
    netns.ip("neigh", "flush", "dev", "eth0", netns=OLD)
    moved.set()
    for t in fab.threads:
        t.join(TIMEOUT)
    assert not fab.errors, fab.errors
    assert digests == [EXPECTED] * 3

    assert wait_drained(plan)
    state = steer.read_state(BRIDGE)
    assert not state.pins
    new_mac = steer.nsm_mac(NEW)
    assert {str(a): t.mac for a, t in state.addresses.items()} == {T4: new_mac, T6: new_mac}
    print(f"begin_move took {move_seconds * 1000:.0f} ms")

    steer.forget_tenant(BRIDGE, plan.tenant_v4, plan.tenant_v6)
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert steer.table_name(BRIDGE) not in listing  # the last tenant takes the tables with it


def test_pins_follow_the_sockets_of_the_old_nsm(fabric: Fabric) -> None:
    """What counts as a flow: connected UDP, TIME-WAIT, IPv4 seen through a dual-stack socket;
    not a listener, not an unconnected UDP socket."""
    plan, fab = fabric.plan, fabric
    T = plan.tenant
    addresses = steer.tenant_addresses(T4, T6)

    def udp(ns: str, family: socket.AddressFamily) -> socket.socket:
        s = netns.run_in_netns(ns, lambda: socket.socket(family, socket.SOCK_DGRAM))
        fab.sockets.append(s)
        return s

    fab.listen(OLD, T, 5001)
    udp(OLD, plan.family).bind((T, 5353))  # serves anyone: new datagrams go to the new NSM
    connected = udp(OLD, plan.family)
    connected.bind((T, 0))
    connected.connect((plan.peer, 53))
    expected = {steer.Flow(socket.IPPROTO_UDP, ip(plan.peer), 53, ip(T), connected.getsockname()[1])}
    if plan.family == socket.AF_INET:
        mapped = udp(OLD, socket.AF_INET6)
        mapped.bind((f"::ffff:{T}", 0))
        mapped.connect((f"::ffff:{plan.peer}", 53))
        expected.add(steer.Flow(socket.IPPROTO_UDP, ip(plan.peer), 53, ip(T), mapped.getsockname()[1]))
    assert steer.tenant_flows(OLD, addresses) == expected

    # The tenant closes first: its side lingers in TIME-WAIT, and the old NSM is not drained.
    peer_listener = fab.listen(PEER, plan.peer, 6001)
    closing = fab.connect(OLD, (plan.peer, 6001), local=T)
    port = closing.getsockname()[1]
    peer_end, _ = peer_listener.accept()
    fab.sockets.append(peer_end)
    closing.close()
    assert peer_end.recv(1) == b""
    peer_end.close()
    time_wait = steer.Flow(socket.IPPROTO_TCP, ip(plan.peer), 6001, ip(T), port)
    deadline = time.monotonic() + TIMEOUT
    while time_wait not in steer.tenant_flows(OLD, addresses) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert steer.tenant_flows(OLD, addresses) == expected | {time_wait}

    assert steer.begin_move(BRIDGE, T4, T6, OLD, NEW) == len(expected) + 1
    assert set(steer.read_state(BRIDGE).pins) == expected | {time_wait}
    assert not steer.finish_if_drained(BRIDGE, T4, T6, OLD)
    for s in fab.sockets:
        if s.type == socket.SOCK_DGRAM:
            s.close()
    # Only TIME-WAIT is left; pins of ended flows go so that their 4-tuples reach the new NSM.
    assert not steer.finish_if_drained(BRIDGE, T4, T6, OLD)
    assert set(steer.read_state(BRIDGE).pins) == {time_wait}
