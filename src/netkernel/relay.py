"""The path for programs GuestLib does not reach (static binaries, Go, musl): their kernel
sockets in the tenant's namespace, redirected to the tenant's relay (``csrc/relay/relay.c``),
which carries them through NetKernel with GuestLib like any tenant program.

What the daemon sets up in each tenant namespace for it (root does this; the tenant, with no
capability over its namespace, cannot undo it — and undoing it would only cut its own static
programs off, since the namespace still has nothing but ``lo``):

- routes: every address is local (``local default dev lo``), from the tenant's own address,
  so a program's connect() to any peer is routed, leaves from the tenant's address, and never
  leaves the namespace;
- an nftables table that redirects each new TCP connection to an address other than loopback
  or the tenant's own to the relay's port on loopback (conntrack NAT; the relay reads the
  original destination with SO_ORIGINAL_DST), and each such UDP datagram to the relay's
  transparent UDP sockets (TPROXY, with IP_ORIGDSTADDR), which are made here, as root, since
  IP_TRANSPARENT needs a privilege the relay does not have (``transparent_udp_sockets``,
  passed to it when the holder starts). The connections tracked are capped per tenant,
  so that one tenant cannot fill the host's conntrack table (``nf_conntrack_max``, shared by
  all namespaces); pure loopback traffic is not tracked at all;
- ``ip_unprivileged_port_start=0``: a static server may listen on port 80 of its own
  namespace, as root in a container may (GuestLib programs get low ports through the engine);
  ``tcp_tw_reuse=1``, for the relay's connections to a program's listener (below).
"""

from __future__ import annotations

import socket
import subprocess
from typing import TYPE_CHECKING

from . import netns
from .config import RELAY_PORT
from .errors import TenantError

if TYPE_CHECKING:
    from .records import Tenant

# Connections one tenant's namespace may have tracked at once (the host's table holds
# nf_conntrack_max, 262144 by default, for every namespace).
CONNTRACK_LIMIT = 16384
TABLE = "netkernel_relay"


def ruleset(ipv4: str, ipv6: str) -> str:
    return f"""table inet {TABLE} {{
  chain raw_out {{
    type filter hook output priority raw; policy accept;
    ip saddr 127.0.0.0/8 ip daddr 127.0.0.0/8 notrack
    ip6 saddr ::1 ip6 daddr ::1 notrack
  }}
  chain limit_out {{
    type filter hook output priority filter; policy accept;
    ct state new ct count over {CONNTRACK_LIMIT} meta l4proto tcp reject with tcp reset
    ct state new ct count over {CONNTRACK_LIMIT} reject
  }}
  chain udp_pre {{
    type filter hook prerouting priority mangle; policy accept;
    iif "lo" meta l4proto udp ip daddr != {{ 127.0.0.0/8, {ipv4} }} tproxy ip to 127.0.0.1:{RELAY_PORT}
    iif "lo" meta l4proto udp ip6 daddr != {{ ::1, {ipv6} }} tproxy ip6 to [::1]:{RELAY_PORT}
  }}
  chain nat_out {{
    type nat hook output priority -100; policy accept;
    meta l4proto tcp ip daddr != {{ 127.0.0.0/8, {ipv4} }} redirect to :{RELAY_PORT}
    meta l4proto tcp ip6 daddr != {{ ::1, {ipv6} }} redirect to :{RELAY_PORT}
  }}
}}
"""


def setup(t: Tenant) -> None:
    """Routes, redirection and sysctls of tenant ``t``'s namespace for its relay."""
    ns = t.netns
    netns.ip("route", "add", "local", "default", "dev", "lo", "src", t.ipv4, netns=ns)
    netns.ip("-6", "route", "add", "local", "default", "dev", "lo", "src", t.ipv6, netns=ns)
    netns.sysctl("net.ipv4.ip_unprivileged_port_start", "0", netns=ns)
    # The relay connects to a program's listener from each client's address and port; when
    # a client reuses a port, the relay's last connection from it may still be in TIME_WAIT.
    netns.sysctl("net.ipv4.tcp_tw_reuse", "1", netns=ns)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=ruleset(t.ipv4, t.ipv6),
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise TenantError("nft (nftables) is not installed: apt-get install nftables") from None
    if proc.returncode != 0:
        raise TenantError(
            f"tenant {t.name!r}: cannot set up the redirection for programs GuestLib does not "
            f"reach (nftables with conntrack NAT in its namespace): {proc.stderr.strip()}"
        )


IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75


def transparent_udp_sockets() -> tuple[socket.socket, socket.socket]:
    """The relay's TPROXY targets, in the calling thread's network namespace (the caller
    enters the tenant's): UDP on 127.0.0.1 and [::1], port RELAY_PORT."""
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s4.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s4.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        s4.bind(("127.0.0.1", RELAY_PORT))
        s6.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.bind(("::1", RELAY_PORT))
    except OSError:
        s4.close()
        s6.close()
        raise
    return s4, s6
