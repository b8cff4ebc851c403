"""The host's own services are out of the NSMs' reach.

Every NSM sits on the bridge ``nk0``, which holds the host's address on the fabric (the first
of each subnet). A tenant's connection to that address would leave its NSM and land on
whatever the host serves on all its addresses (sshd, databases, the metrics endpoint if an
operator opened it wider). So the host accepts from the bridge only what NetKernel itself
serves there, the DNS responder (UDP 53 on the bridge addresses), neighbour discovery, and
the answers to connections the host opened (the tests' and an operator's probes); everything
else arriving over the bridge, and anything the host would route between the bridge and its
other interfaces, is dropped.

One nftables table, ``inet netkernel_guard_<bridge>``, written whole in one transaction and
removed whole at ``down``.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

from .errors import NetKernelError

NFT = "nft"
TABLE_PREFIX = "netkernel_guard_"


class GuardError(NetKernelError):
    """The host firewall for the fabric could not be set up."""


def table_name(bridge: str) -> str:
    return TABLE_PREFIX + bridge


Route = ipaddress.IPv4Network | ipaddress.IPv6Network


def _routed(bridge: str, routes: tuple[Route, ...], own: tuple[Route, ...]) -> tuple[str, str]:
    """Rules for the config's routes: NSMs may reach those prefixes through the host, and be
    reached from them, but what comes from there is kept off the host's own services as what
    comes over the bridge is. Only this host's own subnets may leave the bridge (no NSM can
    spoof today; this keeps it so). A host is kept from the prefixes it lists itself: routes
    between hosts must be listed on both."""
    fwd, inp = [], []
    if routes:
        for o in own:
            fam = "ip" if o.version == 4 else "ip6"
            fwd.append(
                f'    iifname "{bridge}" meta nfproto {"ipv4" if o.version == 4 else "ipv6"} '
                f'{fam} saddr != {o} counter drop comment "only this host\'s addresses leave it"'
            )
    for r in routes:
        fam = "ip" if r.version == 4 else "ip6"
        fwd.append(f'    iifname "{bridge}" {fam} daddr {r} accept')
        fwd.append(f'    oifname "{bridge}" {fam} saddr {r} accept')
        inp.append(f"    {fam} saddr {r} ct state established,related accept")
        inp.append(f'    {fam} saddr {r} counter drop comment "other hosts\' NSMs do not reach this host"')
    return "\n".join(fwd) + ("\n" if fwd else ""), "\n".join(inp) + ("\n" if inp else "")


def ruleset(
    bridge: str,
    v4: ipaddress.IPv4Address,
    v6: ipaddress.IPv6Address,
    routes: tuple[Route, ...] = (),
    own: tuple[Route, ...] = (),
) -> str:
    t = table_name(bridge)
    fwd, inp = _routed(bridge, routes, own)
    return f"""table inet {t} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{bridge}" ct state established,related accept
    iifname "{bridge}" ip daddr {v4} udp dport 53 accept
    iifname "{bridge}" ip6 daddr {v6} udp dport 53 accept
    iifname "{bridge}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    iifname "{bridge}" counter drop comment "NSMs do not reach the host's services"
{inp}  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
{fwd}    iifname "{bridge}" oifname != "{bridge}" counter drop comment "no route out of the fabric"
    oifname "{bridge}" iifname != "{bridge}" counter drop comment "nor into it"
  }}
}}
"""


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True)


def install(
    bridge: str,
    v4: ipaddress.IPv4Address,
    v6: ipaddress.IPv6Address,
    routes: tuple[Route, ...] = (),
    own: tuple[Route, ...] = (),
) -> None:
    """The table, replacing any earlier one of this bridge."""
    if shutil.which(NFT) is None:
        raise GuardError(
            "nft (nftables) is not installed: NetKernel needs it to keep tenants "
            "away from the host's own services (apt-get install nftables)"
        )
    remove(bridge)
    r = _nft(ruleset(bridge, v4, v6, routes, own))
    if r.returncode != 0:
        raise GuardError(f"cannot install the host firewall for {bridge}: {r.stderr.strip()}")


def remove(bridge: str) -> bool:
    """Remove the table; True if there was one."""
    if shutil.which(NFT) is None:
        return False
    r = _nft(f"delete table inet {table_name(bridge)}\n")
    return r.returncode == 0


def dropped(bridge: str) -> int:
    """Packets dropped so far by the input rule (what NSMs tried to send to the host)."""
    r = subprocess.run(
        [NFT, "list", "chain", "inet", table_name(bridge), "input"], capture_output=True, text=True
    )
    for line in r.stdout.splitlines():
        if "drop" in line and "counter packets" in line:
            return int(line.split("counter packets")[1].split()[0])
    return 0
