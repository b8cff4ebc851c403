"""The fabric (DESIGN §F): a bridge ``nk0`` in the root namespace holding the first address of
each subnet; per NSM a namespace ``nk-nsm-<name>`` joined to the bridge by a veth pair and
holding the addresses of its tenants; per tenant a namespace ``nk-t-<name>`` with only ``lo``.
There is no default route, forwarding or NAT: an NSM reaches the bridge's L2 segment and
nothing else.

These functions build and remove it from what they are given and keep no state: the Daemon
calls them with its lock held where the NSMs and tenants they touch could change under them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

from . import cgroups, guard, netns, relay, sandbox, steer
from .config import (
    ADMIN_SOCKET,
    BRIDGE,
    DAEMON_SOCKET,
    ENGINE_PID_FILE,
    ENGINE_SOCKET,
    LOCK_FILE,
    NSM_NETNS_PREFIX,
    NSM_VETH_PREFIX,
    PID_FILE,
    RUN_DIR,
    TENANT_NETNS_PREFIX,
    TENANTS_DIR,
    Config,
    format_rate,
    lwip_binary,
)
from .daemon_log import log, log_event
from .errors import NetKernelError, NSMError, TenantError
from .records import NSM, Tenant

RESOLV_CONF = "nameserver 127.0.0.53\n"  # the engine's stub inside each tenant namespace

# The lwIP NSM's namespace: eth0 (the veth to the fabric) and the TAP that lwIP drives, joined
# by a bridge; the kernel there holds no address (lwIP holds the tenants').
LWIP_TAP = "tap0"
LWIP_BRIDGE = "br0"


def allow_congestion_control(name: str) -> None:
    """Let namespaces other than the host's pick ``name`` as their default.

    The kernel refuses (EPERM) a namespace's tcp_congestion_control unless the algorithm is
    in the host's tcp_allowed_congestion_control, a host-wide list that also says which
    algorithms unprivileged programs may choose with setsockopt(TCP_CONGESTION). We add it
    there; nothing else on the host changes, and it is left in place at `down`.
    """
    key = "net.ipv4.tcp_allowed_congestion_control"
    allowed = (netns.sysctl_get(key) or "").split()
    if name not in allowed:
        try:
            netns.sysctl(key, " ".join([*allowed, name]))
        except NetKernelError as e:
            # Only the host's own namespace may change it (a lab host's daemon cannot).
            raise NetKernelError(
                f"{e}: {name!r} is not in the host's {key} ({' '.join(allowed)}); add it from "
                f'the host\'s network namespace: sysctl -w {key}="{" ".join([*allowed, name])}"'
            ) from None
        log_event(
            "host_sysctl_changed",
            key=key,
            value=" ".join([*allowed, name]),
            reason=f"an NSM uses congestion control {name}",
        )


def build_bridge(c: Config) -> None:
    # The firewall first: no NSM ever reaches the host's services on the bridge address.
    guard.install(BRIDGE, c.bridge_ipv4, c.bridge_ipv6, c.routes, (c.ipv4_subnet, c.ipv6_prefix))
    netns.bridge_add(BRIDGE)
    netns.addr_add(BRIDGE, f"{c.bridge_ipv4}/{c.ipv4_subnet.prefixlen}")
    netns.addr_add(BRIDGE, f"{c.bridge_ipv6}/{c.ipv6_prefix.prefixlen}")


def create_nsm(c: Config, nsm: NSM) -> None:
    """The NSM's namespace, sysctls, veth and addresses; all undone if any step fails."""
    nsm_config = nsm.config
    ns = nsm.netns
    v4, v6 = c.nsm_ipv4(nsm.index), c.nsm_ipv6(nsm.index)
    netns.netns_add(ns)
    try:
        if nsm.external:
            _create_lwip_nsm(nsm)
        else:
            _create_kernel_nsm(c, nsm, str(v4), str(v6))
    except NetKernelError as e:
        remove_nsm(nsm)
        raise NSMError(f"NSM {nsm.name!r}: {e}") from None
    except BaseException:
        remove_nsm(nsm)
        raise
    log_event(
        "nsm_created",
        nsm=nsm.name,
        kind=nsm_config.kind,
        netns=ns,
        ipv4=None if nsm.external else v4,
        ipv6=None if nsm.external else v6,
        congestion_control=nsm_config.congestion_control,
        bandwidth=format_rate(nsm_config.bandwidth) if nsm_config.bandwidth else None,
        sysctls=len(nsm_config.sysctls),
    )


def _create_kernel_nsm(c: Config, nsm: NSM, v4: str, v6: str) -> None:
    ns, nsm_config = nsm.netns, nsm.config
    # Tenants bind only their own addresses; never let an NSM bind a foreign one.
    netns.sysctl("net.ipv4.ip_nonlocal_bind", "0", netns=ns)
    netns.sysctl("net.ipv6.conf.default.accept_dad", "0", netns=ns)
    # ARP requests must carry the NSM's own address, not a tenant's: after a tenant
    # move, a tenant address as ARP source would teach the peers' neighbour caches
    # the old NSM's MAC for it again.
    netns.sysctl("net.ipv4.conf.all.arp_announce", "2", netns=ns)
    netns.veth_into(NSM_VETH_PREFIX + nsm.name, ns, "eth0", BRIDGE)
    netns.addr_add("eth0", f"{v4}/{c.ipv4_subnet.prefixlen}", netns=ns)
    netns.addr_add("eth0", f"{v6}/{c.ipv6_prefix.prefixlen}", netns=ns)
    # Other hosts' subnets (config routes) through this host; nothing else.
    for r in c.routes:
        via = c.bridge_ipv4 if r.version == 4 else c.bridge_ipv6
        netns.ip("route", "add", str(r), "via", str(via), netns=ns)
    if nsm_config.congestion_control:
        allow_congestion_control(nsm_config.congestion_control)
        netns.sysctl("net.ipv4.tcp_congestion_control", nsm_config.congestion_control, netns=ns)
    # After the veth: a sysctl may name eth0.
    for key, value in nsm_config.sysctls:
        try:
            netns.sysctl(key, value, netns=ns)
        except NetKernelError as e:
            if netns.sysctl_get(key, ns) is None:
                raise NSMError(
                    f"{e} (this sysctl is host-wide: network namespaces do not "
                    "have it, so it cannot be set per NSM)"
                ) from None
            raise


def _create_lwip_nsm(nsm: NSM) -> None:
    ns = nsm.netns
    lwip_binary()  # fail now, with the install hint, not when the process is started
    # The kernel of this namespace only switches frames: no IPv6 (no DAD, RS or MLD noise).
    netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1", netns=ns)
    netns.sysctl("net.ipv6.conf.default.disable_ipv6", "1", netns=ns)
    netns.veth_into(NSM_VETH_PREFIX + nsm.name, ns, "eth0", BRIDGE)
    netns.ip("tuntap", "add", "dev", LWIP_TAP, "mode", "tap", netns=ns)
    # The NSM takes TCP segments of up to 64 KiB from the TAP (GSO); one lwIP pbuf holds at
    # most 65535 bytes, so the kernel splits anything of more than 40 segments first.
    netns.ip("link", "set", LWIP_TAP, "gso_max_segs", "40", netns=ns)
    netns.ip("link", "add", LWIP_BRIDGE, "type", "bridge", netns=ns)
    for dev in ("eth0", LWIP_TAP):
        netns.ip("link", "set", dev, "master", LWIP_BRIDGE, netns=ns)
    for dev in ("lo", LWIP_BRIDGE, LWIP_TAP, "eth0"):
        netns.ip("link", "set", dev, "up", netns=ns)
    # br0 only joins the TAP to eth0: no iptables on its frames, where br_netfilter is
    # loaded (it cost 10-20 % of the NSM's throughput).
    for table in ("iptables", "ip6tables", "arptables"):
        key = f"net.bridge.bridge-nf-call-{table}"
        if netns.sysctl_get(key, ns) is not None:
            netns.sysctl(key, "0", netns=ns)


def remove_nsm(nsm: NSM) -> None:
    netns.netns_del(nsm.netns)  # takes eth0 and so the veth pair with it
    netns.link_del(NSM_VETH_PREFIX + nsm.name)


def create_tenant(t: Tenant, nsm: NSM, tenant_cgroups: cgroups.Cgroups) -> None:
    """The tenant's namespace, its addresses on ``nsm``, its files and its cgroups. On failure
    the caller removes what was made with delete_tenant, which takes whatever exists."""
    netns.netns_add(t.netns)  # only `lo`: the tenant has no path around NetKernel
    # Its own addresses also sit on its `lo` (routes to nowhere else): glibc's
    # getaddrinfo(AI_ADDRCONFIG) asks the kernel over netlink, which LD_PRELOAD cannot
    # see, whether the namespace has an IPv4 / IPv6 address before it looks a name up.
    for cidr in t.cidrs:
        netns.addr_add("lo", cidr, netns=t.netns)
    relay.setup(t)  # programs GuestLib does not reach: through its relay
    add_tenant_addresses(t, nsm)
    tdir = TENANTS_DIR / t.name
    tdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    (tdir / "resolv.conf").write_text(RESOLV_CONF)
    # Its private /run, /var/tmp and /dev/shm: a tmpfs of its own, its pages charged to its
    # cgroup, which bounds it; the host's /run is not where a tenant can fill it up.
    t.fs.mkdir(mode=0o700, exist_ok=True)
    netns.mount_tmpfs(t.fs, t.policy.max_process_memory, t.uid_base, t.uid_base)
    sandbox.prepare_private_fs(t.fs, t.uid_base)
    try:
        t.cgroups = tenant_cgroups.create(
            t.name, t.policy.max_process_memory, t.policy.max_processes, t.policy.weight
        )
    except (cgroups.CgroupError, OSError) as e:
        raise TenantError(f"tenant {t.name!r}: cannot make its cgroups: {e}") from None


def add_tenant_addresses(t: Tenant, nsm: NSM) -> None:
    if nsm.external:
        return  # the engine hands them to the NSM's process with the tenant's region
    for cidr in t.cidrs:
        netns.addr_add("eth0", cidr, netns=nsm.netns)


def remove_tenant_addresses(t: Tenant, nsm: NSM) -> None:
    if not nsm.external:
        for cidr in t.cidrs:
            netns.addr_del("eth0", cidr, netns=nsm.netns)


def delete_tenant(t: Tenant, nsms: Iterable[NSM], tenant_cgroups: cgroups.Cgroups) -> None:
    """``nsms``: those that hold its addresses (its own, and those it is draining from)."""
    netns.kill_netns_processes([t.netns])
    for nsm in nsms:
        remove_tenant_addresses(t, nsm)
    netns.netns_del(t.netns)
    # Anything of it the namespace did not find (its cgroup holds every process it forked).
    tenant_cgroups.kill(t.name)
    netns.umount_all(TENANTS_DIR / t.name)
    shutil.rmtree(TENANTS_DIR / t.name, ignore_errors=True)
    tenant_cgroups.remove(t.name)


def cleanup_all(keep_lock: bool = False) -> list[str]:
    """Remove everything a daemon creates. Idempotent; returns what it removed.

    Works from names alone so that it also cleans up after a daemon that crashed.
    """
    removed: list[str] = []
    ours = [
        n for n in netns.netns_list() if n.startswith(TENANT_NETNS_PREFIX) or n.startswith(NSM_NETNS_PREFIX)
    ]
    netns.kill_netns_processes(n for n in ours if n.startswith(TENANT_NETNS_PREFIX))
    for name in ours:
        netns.netns_del(name)  # takes the NSM's eth0 and its veth peer with it
        removed.append(f"netns {name}")
    # Without nft no tenant was ever moved, so there is no steering table to remove.
    if shutil.which(steer.NFT):
        try:
            steer.remove_all(BRIDGE)
        except Exception as e:  # the rest must still go
            log.warning("removing the steering rules of %s failed: %s", BRIDGE, e)
    if guard.remove(BRIDGE):
        removed.append(f"nft table {guard.table_name(BRIDGE)}")
    for link in netns.link_names():
        if link == BRIDGE or link.startswith(NSM_VETH_PREFIX):
            netns.link_del(link)
            removed.append(f"link {link}")
    shutil.rmtree(sandbox.GUESTLIB_HOST_DIR, ignore_errors=True)
    files = [DAEMON_SOCKET, ENGINE_SOCKET, ADMIN_SOCKET, PID_FILE, ENGINE_PID_FILE]
    if not keep_lock:
        # A running daemon keeps its flock'd lock file: unlinking it would let a second
        # daemon lock a fresh file and believe it is alone.
        files.append(LOCK_FILE)
    for path in files:
        if path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if TENANTS_DIR.exists():
        # Tenants' private tmpfs first: rmtree would empty them and leave them mounted.
        removed += [f"mount {p}" for p in netns.umount_all(TENANTS_DIR)]
        shutil.rmtree(TENANTS_DIR, ignore_errors=True)
        removed.append(str(TENANTS_DIR))
    try:
        removed += [f"cgroup {d}" for d in cgroups.Cgroups().remove_all()]
    except OSError as e:
        log.warning("removing tenant cgroups failed: %s", e)
    try:
        RUN_DIR.rmdir()  # only if empty: leave anything we did not put there
    except OSError:
        pass
    return removed
