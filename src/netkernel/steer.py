"""Steer a moving tenant's frames to the NSM namespace that owns each connection.

While a tenant moves from one NSM to another its addresses sit on ``eth0`` of both NSM
namespaces, so ARP/NDP cannot say where a frame for the tenant belongs: whichever namespace
answered last would get every frame, and the other one's connections would be reset. We decide
per frame instead, by rewriting the destination MAC on the host before the bridge looks it up
in its forwarding database:

- ``addr4``/``addr6``: tenant address -> MAC of the NSM that takes new connections;
- ``flows4``/``flows6``: (l4proto, remote addr, remote port, tenant addr, tenant port) -> MAC
  of the NSM where that connection already lives (the "pins").

The rules look up the address map, then the flow map; a map miss makes an nft rule not match,
so a pin overrides the address map only for its own flow. No conntrack is needed (the bridge
has none here): the pins are read from the old namespace's sockets with sock_diag.

Two tables named ``netkernel_<bridge>`` carry identical maps and rules:

- family ``bridge``, hook ``prerouting``: frames entering the bridge from a port (remote hosts,
  other NSMs). The forwarding lookup happens after this hook, so a rewritten MAC steers.
- family ``netdev``, hook ``egress`` on the bridge device: frames the host itself sends over the
  bridge. The bridge's own ``output`` hook is useless here: br_dev_xmit() has already chosen the
  port when it runs, so a rewritten MAC reaches the old port and is dropped as PACKET_OTHERHOST.

Neighbour discovery is never rewritten. An NSM solicits its neighbours from the tenant's
address (ndisc_solicit() uses the packet's source) and the answer comes back addressed to the
tenant; its MAC was taken from the solicitation's link-layer option, so it already names the
NSM that asked, and sending it to the other one would leave the asker unresolved. ARP is not IP
and is never touched; the daemon sets arp_announce=2 so that NSMs ask from their own address.

Every update reads the current maps from the kernel and writes them back whole in one ``nft -f``
transaction (atomic for the packet path), so the kernel is the only copy of the state and a
restarted daemon finds it as it was. Pins and address entries carry the namespace name as an
element comment, which is how pins of an old namespace are found after it is gone.

Callers are expected to serialise updates per bridge (the daemon holds its lock); a module lock
guards against concurrent threads of one process as well.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import netns
from .errors import NetKernelError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TABLE_PREFIX = "netkernel_"
NFT = "nft"

_lock = threading.Lock()


class SteerError(NetKernelError):
    """Steering a tenant between NSMs failed (nft missing or refused, bad address)."""


def table_name(bridge: str) -> str:
    return TABLE_PREFIX + bridge


# -- sockets of the old namespace (sock_diag) ------------------------------------------------


@dataclass(frozen=True, order=True)
class Flow:
    """A connection as the frames *to* the tenant see it: remote is their source."""

    proto: int
    remote: IPAddress
    remote_port: int
    local: IPAddress
    local_port: int


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes, zero).
_INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid: ports are big-endian.
_INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16s")

# include/net/tcp_states.h
TCP_ESTABLISHED, TCP_LISTEN, TCP_CLOSE, TCP_BOUND_INACTIVE = 1, 10, 7, 13
# Every state with a peer: SYN-SENT, SYN-RECV (request sockets are reported as SYN-RECV),
# the closing states and TIME-WAIT. Not LISTEN (its traffic is new connections, which belong
# to the new NSM), not CLOSE or BOUND-INACTIVE (6.4+ reports bound, unconnected sockets).
_TCP_FLOW_STATES = sum(1 << s for s in range(1, TCP_BOUND_INACTIVE) if s not in (TCP_LISTEN, TCP_CLOSE))
# A UDP socket is ESTABLISHED once connect()ed; unconnected ones serve any peer, like listeners.
_UDP_FLOW_STATES = 1 << TCP_ESTABLISHED


def _diag_dump(family: int, proto: int, states: int) -> list[tuple[bytes, int, bytes, int]]:
    """(local addr, local port, remote addr, remote port) of the sockets in the calling thread's
    namespace; addresses as 4 or 16 raw bytes."""
    request = _INET_DIAG_REQ_V2.pack(family, proto, 0, 0, states)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    addr_len = 4 if family == socket.AF_INET else 16
    found: list[tuple[bytes, int, bytes, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendall(header + request)
        while data := nl.recv(1 << 16):
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                body = offset + _NLMSGHDR.size
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, body)
                    name = "TCP" if proto == socket.IPPROTO_TCP else "UDP"
                    reason = errno.errorcode.get(-err, str(err))
                    raise SteerError(
                        f"cannot list {name} sockets (sock_diag: {reason}); the kernel "
                        "needs CONFIG_INET_DIAG with TCP and UDP (modprobe tcp_diag udp_diag)"
                    )
                _, _, _, _, sport, dport, src, dst = _INET_DIAG_MSG.unpack_from(data, body)
                found.append(
                    (
                        src[:addr_len],
                        int.from_bytes(sport, "big"),
                        dst[:addr_len],
                        int.from_bytes(dport, "big"),
                    )
                )
                offset += (length + 3) & ~3
    raise SteerError("sock_diag dump ended without NLMSG_DONE")


def _unmapped(raw: bytes) -> IPAddress:
    address = ipaddress.ip_address(raw)
    # A dual-stack AF_INET6 socket carrying IPv4 shows ::ffff:a.b.c.d; on the wire it is IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def tenant_flows(netns_name: str, addresses: Iterable[IPAddress]) -> set[Flow]:
    """TCP connections (every state but LISTEN) and connected UDP sockets in ``netns_name``
    whose local address is one of ``addresses``."""
    wanted = set(addresses)

    def dump() -> set[Flow]:
        flows: set[Flow] = set()
        for proto, states in ((socket.IPPROTO_TCP, _TCP_FLOW_STATES), (socket.IPPROTO_UDP, _UDP_FLOW_STATES)):
            for family in (socket.AF_INET, socket.AF_INET6):
                for src, sport, dst, dport in _diag_dump(family, proto, states):
                    local = _unmapped(src)
                    if local in wanted and dport != 0:
                        flows.add(Flow(proto, _unmapped(dst), dport, local, sport))
        return flows

    return netns.run_in_netns(netns_name, dump)


def nsm_mac(netns_name: str, ifname: str = "eth0") -> str:
    links = netns.ip_json("link", "show", "dev", ifname, netns=netns_name)
    if not links or "address" not in links[0]:
        raise SteerError(f"no link address on {ifname} in netns {netns_name}")
    return str(links[0]["address"]).lower()


# -- the maps, as the kernel holds them ------------------------------------------------------


@dataclass(frozen=True)
class Target:
    mac: str
    netns: str  # element comment: names the NSM without looking its MAC up


@dataclass
class SteerState:
    addresses: dict[IPAddress, Target] = field(default_factory=dict)
    pins: dict[Flow, Target] = field(default_factory=dict)

    def pins_of(self, addresses: set[IPAddress], netns_name: str | None = None) -> set[Flow]:
        return {
            flow
            for flow, target in self.pins.items()
            if flow.local in addresses and (netns_name is None or target.netns == netns_name)
        }

    def set_pins(self, addresses: set[IPAddress], target: Target, flows: set[Flow]) -> None:
        """Make ``flows`` exactly the pins of ``addresses`` to ``target.netns``: flows that have
        ended are dropped, since a peer reusing the 4-tuple must reach the new NSM."""
        for flow in self.pins_of(addresses, target.netns) - flows:
            del self.pins[flow]
        for flow in flows:
            self.pins[flow] = target

    def empty(self) -> bool:
        return not self.addresses and not self.pins


def _run_nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([NFT, *args], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise SteerError("nft not found: apt-get install nftables") from None


_PROTO_NAMES = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _parse_proto(value: Any) -> int:
    if isinstance(value, int):
        return value
    if str(value) in _PROTO_NAMES:
        return _PROTO_NAMES[str(value)]
    return socket.getprotobyname(str(value))


def _parse_element(raw: Any) -> tuple[Any, Any, str]:
    """(key, value, comment) of one map element from `nft -j`."""
    key, value = raw
    comment = ""
    if isinstance(key, dict) and "elem" in key:
        comment = str(key["elem"].get("comment", ""))
        key = key["elem"]["val"]
    return key, value, comment


def read_state(bridge: str) -> SteerState:
    proc = _run_nft(["-j", "list", "table", "bridge", table_name(bridge)])
    state = SteerState()
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return state
        raise SteerError(f"nft cannot list table bridge {table_name(bridge)}: {proc.stderr.strip()}")
    for obj in json.loads(proc.stdout).get("nftables", []):
        nft_map = obj.get("map")
        if not nft_map:
            continue
        for raw in nft_map.get("elem", []):
            key, mac, comment = _parse_element(raw)
            target = Target(str(mac).lower(), comment)
            if nft_map["name"] in ("addr4", "addr6"):
                state.addresses[ipaddress.ip_address(key)] = target
            elif nft_map["name"] in ("flows4", "flows6"):
                proto, remote, remote_port, local, local_port = key["concat"]
                flow = Flow(
                    _parse_proto(proto),
                    ipaddress.ip_address(remote),
                    int(remote_port),
                    ipaddress.ip_address(local),
                    int(local_port),
                )
                state.pins[flow] = target
    return state


_MAP_TYPES = {
    "addr4": "ipv4_addr : ether_addr",
    "addr6": "ipv6_addr : ether_addr",
    "flows4": "inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service : ether_addr",
    "flows6": "inet_proto . ipv6_addr . inet_service . ipv6_addr . inet_service : ether_addr",
}

_RULES = [
    # Solicited answers already carry the asking NSM's MAC (see the module docstring).
    "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit,"
    " nd-neighbor-advert, nd-redirect } accept",
    "ether daddr set ip daddr map @addr4",
    "ether daddr set meta l4proto . ip saddr . th sport . ip daddr . th dport map @flows4",
    "ether daddr set ip6 daddr map @addr6",
    "ether daddr set meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport map @flows6",
]


def _comment(target: Target) -> str:
    # Namespace names come from our config, but a quote would end the nft string early.
    return json.dumps(target.netns.replace('"', "'"))


def _elements(state: SteerState) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in _MAP_TYPES}
    for address, target in sorted(state.addresses.items(), key=lambda item: str(item[0])):
        name = "addr4" if address.version == 4 else "addr6"
        out[name].append(f"{address} comment {_comment(target)} : {target.mac}")
    for flow, target in sorted(state.pins.items(), key=lambda item: str(item[0])):
        name = "flows4" if flow.local.version == 4 else "flows6"
        key = f"{flow.proto} . {flow.remote} . {flow.remote_port} . {flow.local} . {flow.local_port}"
        out[name].append(f"{key} comment {_comment(target)} : {target.mac}")
    return out


def _table_script(family: str, table: str, chain: str, hook: str, state: SteerState) -> list[str]:
    # `add` is idempotent for tables, maps and chains; flushing and refilling the chain and the
    # maps inside the same transaction is what makes the update atomic for the packet path.
    lines = [f"add table {family} {table}"]
    for name, map_type in _MAP_TYPES.items():
        lines.append(f"add map {family} {table} {name} {{ type {map_type}; }}")
    lines.append(f"add chain {family} {table} {chain} {{ {hook}; policy accept; }}")
    lines.append(f"flush chain {family} {table} {chain}")
    lines += [f"add rule {family} {table} {chain} {rule}" for rule in _RULES]
    for name, elements in _elements(state).items():
        lines.append(f"flush map {family} {table} {name}")
        if elements:
            lines.append(f"add element {family} {table} {name} {{ {', '.join(elements)} }}")
    return lines


def _delete_tables_script(bridge: str) -> list[str]:
    table = table_name(bridge)
    # nft 1.0.6 has no `destroy`: declaring the table first makes the delete succeed when absent.
    return [
        f"add table bridge {table}",
        f"delete table bridge {table}",
        f"add table netdev {table}",
        f"delete table netdev {table}",
    ]


def write_state(bridge: str, state: SteerState) -> None:
    if state.empty():
        lines = _delete_tables_script(bridge)
    else:
        table = table_name(bridge)
        # Host-sent frames: dstnat priority would be meaningless on egress; filter is fine.
        lines = _table_script(
            "bridge", table, "prerouting", "type filter hook prerouting priority dstnat", state
        ) + _table_script(
            "netdev", table, "egress", f'type filter hook egress device "{bridge}" priority filter', state
        )
    proc = _run_nft(["-f", "-"], "\n".join(lines) + "\n")
    if proc.returncode != 0:
        raise SteerError(f"nft refused the steering update for bridge {bridge}: {proc.stderr.strip()}")


# -- the API the daemon calls ----------------------------------------------------------------


def tenant_addresses(ipv4: str, ipv6: str) -> set[IPAddress]:
    """The pair of tenant addresses the API takes, checked."""
    try:
        v4 = ipaddress.IPv4Address(ipv4)
    except ValueError:
        raise SteerError(f"tenant address {ipv4!r} is not an IPv4 address") from None
    try:
        v6 = ipaddress.IPv6Address(ipv6)
    except ValueError:
        raise SteerError(f"tenant address {ipv6!r} is not an IPv6 address") from None
    return {v4, v6}


FlowSource = Callable[[set[IPAddress]], set[Flow]]


def begin_move(
    bridge: str,
    ipv4: str,
    ipv6: str,
    old_netns: str,
    new_netns: str,
    *,
    old_mac: str | None = None,
    new_mac: str | None = None,
    old_flows: FlowSource | None = None,
) -> int:
    """Idempotent. Creates the table if needed; points all new traffic for ipv4/ipv6 at the MAC
    of new_netns's eth0; pins every flow of the tenant addresses that exists now in old_netns to
    old_netns's eth0 MAC. Returns the number of flows pinned. Calling it again later adds flows
    that appeared meanwhile (and unpins those that have ended).

    A connection the old NSM accepts between our socket listing and the commit would be steered
    to the new NSM (and reset there); listing once more right after the commit pins it within
    milliseconds, which shrinks that window to one `nft` run.

    A userspace NSM (lwIP) has no eth0 of its own for the tenant and no kernel sockets to list:
    the caller then names the MAC that receives the tenant's frames there (old_mac / new_mac)
    and where the old NSM's flows come from (old_flows)."""
    addresses = tenant_addresses(ipv4, ipv6)
    old = Target(old_mac or nsm_mac(old_netns), old_netns)
    new = Target(new_mac or nsm_mac(new_netns), new_netns)
    flows_of = old_flows or (lambda a: tenant_flows(old_netns, a))
    with _lock:
        state = read_state(bridge)
        flows = flows_of(addresses)
        state.set_pins(addresses, old, flows)
        for address in addresses:
            state.addresses[address] = new
        write_state(bridge, state)
        late = flows_of(addresses)
        if late != flows:
            state.set_pins(addresses, old, late)
            write_state(bridge, state)
        return len(late)


def finish_if_drained(
    bridge: str,
    ipv4: str,
    ipv6: str,
    old_netns: str,
    *,
    old_mac: str | None = None,
    old_flows: FlowSource | None = None,
) -> bool:
    """True when no socket with a tenant address as local address remains in old_netns
    (listeners of the tenant should already be gone; LISTEN and unconnected UDP sockets are
    ignored anyway); then removes the pins pointing at old_netns for these addresses.

    While not drained it refreshes those pins, so ended flows stop capturing their 4-tuple.
    TIME-WAIT counts as not drained: a tenant that closed first keeps this False for up to 60 s.
    An old namespace that no longer exists counts as drained."""
    addresses = tenant_addresses(ipv4, ipv6)
    with _lock:
        if not netns.netns_exists(old_netns):
            flows: set[Flow] = set()
        else:
            flows = old_flows(addresses) if old_flows else tenant_flows(old_netns, addresses)
        state = read_state(bridge)
        pinned = state.pins_of(addresses, old_netns)
        if flows:
            if flows != pinned:
                state.set_pins(addresses, Target(old_mac or nsm_mac(old_netns), old_netns), flows)
                write_state(bridge, state)
            return False
        if pinned:
            state.set_pins(addresses, Target("", old_netns), set())
            write_state(bridge, state)
        return True


def forget_tenant(bridge: str, ipv4: str, ipv6: str) -> None:
    """Removes the address entries and all pins for these addresses (the tenant is deleted);
    the tables go away with the last tenant."""
    addresses = tenant_addresses(ipv4, ipv6)
    with _lock:
        state = read_state(bridge)
        if not state.addresses.keys() & addresses and not state.pins_of(addresses):
            return
        for address in addresses:
            state.addresses.pop(address, None)
        for flow in state.pins_of(addresses):
            del state.pins[flow]
        write_state(bridge, state)


def remove_all(bridge: str) -> None:
    """Deletes the tables; no error when absent."""
    with _lock:
        write_state(bridge, SteerState())
