"""The NetKernel daemon: builds the fabric, runs the engine and the DNS responder, and
serves the control API and the metrics endpoint until told to stop (or until the engine dies).

Fabric (DESIGN §F): a bridge ``nk0`` in the root namespace holding the first address of each
subnet; per NSM a namespace ``nk-nsm-<name>`` joined to the bridge by a veth pair and holding
the addresses of its tenants; per tenant a namespace ``nk-t-<name>`` with only ``lo``. There is
no default route, forwarding or NAT: an NSM reaches the bridge's L2 segment and nothing else.

Start-up is all or nothing: everything the config asks for (NSMs with their sysctls, tenants
with their policy, the metrics endpoint) is in place before the API socket appears, and any
failure tears everything down again.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import cgroups, guard, netns, sandbox, steer
from .api import ApiServer, Handler
from .config import (
    ADMIN_SOCKET,
    BRIDGE,
    DAEMON_SOCKET,
    ENGINE_PID_FILE,
    ENGINE_SOCKET,
    LOCK_FILE,
    MAX_NSMS,
    MAX_TENANTS,
    NSM_KINDS,
    NSM_NETNS_PREFIX,
    NSM_VETH_PREFIX,
    PID_FILE,
    RUN_DIR,
    TENANT_NETNS_PREFIX,
    TENANTS_DIR,
    Config,
    NSMConfig,
    Policy,
    check_congestion_control,
    check_nsm_kind_settings,
    check_nsm_name,
    check_sysctl,
    check_tenant_name,
    engine_binary,
    format_rate,
    load_config,
    lwip_binary,
    parse_rate,
    policy_with,
)
from .daemon_log import configure_logging, engine_log_relay, log, log_event
from .dns import TENANT_SUFFIX, Addrs, DNSServer, HostsFile
from .engine import EngineClient, EngineStats, wait_ready
from .errors import (
    ConfigError,
    DaemonAlreadyRunningError,
    DaemonError,
    EngineError,
    NetKernelError,
    NSMError,
    TenantError,
    UnknownNSMError,
)
from .metrics import MetricsServer, NSMSample, Snapshot, TenantSample
from .records import NSM, Tenant

RESOLV_CONF = "nameserver 127.0.0.53\n"  # the engine's stub inside each tenant namespace
SAMPLE_INTERVAL = 1.0  # engine stats for rates
DRAIN_INTERVAL = 2.0  # how often moved tenants' old NSMs are checked for remaining flows
# Between the two steer.begin_move calls of a move: a connect() the engine issued just
# before tenant-move may still be completing its handshake in the old NSM; the second call
# pins it there too.
MOVE_SETTLE = 0.2


def abi_version() -> int | None:
    """The shared-memory ABI version GuestLib and the engine were built with (generated from
    include/netkernel/abi.h at build time; absent in a source tree that was never built)."""
    try:
        abi = importlib.import_module("netkernel._abi")
    except ImportError:
        return None
    return int(abi.NK_ABI_VERSION)


def _split_hostport(text: str) -> tuple[steer.IPAddress, int]:
    """The engine's "a.b.c.d:port" / "[v6]:port" (ValueError otherwise)."""
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port)


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
        netns.sysctl(key, " ".join([*allowed, name]))
        log_event("host_sysctl_changed", key=key, value=" ".join([*allowed, name]),
                  reason=f"an NSM uses congestion control {name}")


# The lwIP NSM's namespace: eth0 (the veth to the fabric) and the TAP that lwIP drives, joined
# by a bridge; the kernel there holds no address (lwIP holds the tenants').
LWIP_TAP = "tap0"
LWIP_BRIDGE = "br0"


def cleanup_all(keep_lock: bool = False) -> list[str]:
    """Remove everything a daemon creates. Idempotent; returns what it removed.

    Works from names alone so that it also cleans up after a daemon that crashed.
    """
    removed: list[str] = []
    ours = [n for n in netns.netns_list()
            if n.startswith(TENANT_NETNS_PREFIX) or n.startswith(NSM_NETNS_PREFIX)]
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


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.nsms: dict[str, NSM] = {}  # in creation order: the first is the default
        self.tenants: dict[str, Tenant] = {}
        self.engine: subprocess.Popen[bytes] | None = None
        self.engine_client = EngineClient(ADMIN_SOCKET)
        self.dns: DNSServer | None = None
        self.api: ApiServer | None = None
        self.metrics: MetricsServer | None = None
        self.hosts = HostsFile()
        self.stop_event = threading.Event()
        self.stopping = False
        self.exit_code = 0
        # Serialises every change to NSMs and tenants, and the drain checks.
        self.lock = threading.Lock()
        self._lock_fd: int | None = None
        self.started = time.time()
        # NSM address indices handed out so far: a removed NSM's addresses are not reused
        # while others are free, so no neighbour cache still points them at its old MAC.
        self._nsm_indices_used: set[int] = set()
        # Rates: the previous sample (time, tx, rx) and the latest rates (bit/s) per name.
        self._samples: dict[str, tuple[float, int, int]] = {}
        self.rates: dict[str, tuple[float, float]] = {}
        self._nsm_samples: dict[str, tuple[float, int, int]] = {}
        self.nsm_rates: dict[str, tuple[float, float]] = {}
        self._refused: dict[str, tuple[int, int]] = {}
        # External NSMs' processes (lwIP), restarted by a watcher thread when they die.
        self.nsm_procs: dict[str, subprocess.Popen[bytes]] = {}
        # Tenants' cgroups go beneath the daemon's own (cgroups.py).
        self.cgroups = cgroups.Cgroups()

    # -- lifecycle ------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Tenant processes (e.g. nginx workers as www-data) must reach engine.sock in here.
        os.chmod(RUN_DIR, 0o755)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = None
            try:
                pid = int(PID_FILE.read_text())
            except (OSError, ValueError):
                pass
            raise DaemonAlreadyRunningError(pid) from None
        self._lock_fd = fd

    def start(self) -> None:
        self.acquire_lock()
        leftovers = [n for n in netns.netns_list()
                     if n.startswith((TENANT_NETNS_PREFIX, NSM_NETNS_PREFIX))]
        if leftovers or netns.link_exists(BRIDGE):
            log.warning("removing leftovers of a previous run: %s", ", ".join(leftovers) or BRIDGE)
            self._cleanup_keep_lock()
        PID_FILE.write_text(f"{os.getpid()}\n")
        TENANTS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        sandbox.bwrap()  # fail now, with the install hint, not at the first `netkernel run`
        sandbox.install_guestlib()
        self.build_fabric()
        self.start_engine()
        self.dns = DNSServer(str(self.config.bridge_ipv4), 53, self.resolve)
        self.dns.start()
        log.info("dns: answering on %s:53", self.config.bridge_ipv4)
        missing = self.cgroups.missing()
        if missing:
            log.warning("no %s cgroup controller on this host: tenants run without that limit",
                        ", ".join(missing))
        for tc in self.config.tenants:
            self.create_tenant(tc.name, tc.nsm, tc.policy, rw=tc.rw, ro=tc.ro)
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            self.metrics = MetricsServer(host, port, self.metrics_snapshot)
            self.metrics.start()
        for target, name in ((self._sample_loop, "stats-sampler"), (self._drain_loop, "move-drainer")):
            threading.Thread(target=target, name=name, daemon=True).start()
        # Last: `netkernel up` waits for this socket, so it sees a daemon that is complete.
        self.api = ApiServer(self.config.api_socket, self.api_handlers(), self.config.api_group)
        self.api.start()
        log_event("daemon_ready", pid=os.getpid(), api=self.config.api_socket,
                  api_group=self.config.api_group,
                  metrics=self.metrics.address if self.metrics else None,
                  nsms=",".join(self.nsms), tenants=len(self.tenants))

    def build_fabric(self) -> None:
        c = self.config
        # The firewall first: no NSM ever reaches the host's services on the bridge address.
        guard.install(BRIDGE, c.bridge_ipv4, c.bridge_ipv6)
        netns.bridge_add(BRIDGE)
        netns.addr_add(BRIDGE, f"{c.bridge_ipv4}/{c.ipv4_subnet.prefixlen}")
        netns.addr_add(BRIDGE, f"{c.bridge_ipv6}/{c.ipv6_prefix.prefixlen}")
        for nsm_config in c.nsms:
            self._create_nsm_fabric(nsm_config)

    def _free_nsm_index(self) -> int:
        live = {n.index for n in self.nsms.values()}
        for candidates in (self._nsm_indices_used | live, live):
            index = next((i for i in range(MAX_NSMS) if i not in candidates), None)
            if index is not None:
                return index
        raise NSMError(f"too many NSMs (limit {MAX_NSMS})")

    def _create_nsm_fabric(self, nsm_config: NSMConfig) -> NSM:
        """The NSM's namespace, sysctls, veth and addresses; all undone if any step fails."""
        c = self.config
        nsm = NSM(nsm_config, self._free_nsm_index())
        ns = nsm.netns
        v4, v6 = c.nsm_ipv4(nsm.index), c.nsm_ipv6(nsm.index)
        netns.netns_add(ns)
        try:
            if nsm.external:
                self._create_lwip_fabric(nsm)
            else:
                self._create_kernel_fabric(nsm, str(v4), str(v6))
        except NetKernelError as e:
            self._remove_nsm_fabric(nsm)
            raise NSMError(f"NSM {nsm.name!r}: {e}") from None
        except BaseException:
            self._remove_nsm_fabric(nsm)
            raise
        self.nsms[nsm.name] = nsm
        self._nsm_indices_used.add(nsm.index)
        log_event("nsm_created", nsm=nsm.name, kind=nsm_config.kind, netns=ns,
                  ipv4=None if nsm.external else v4, ipv6=None if nsm.external else v6,
                  congestion_control=nsm_config.congestion_control,
                  bandwidth=format_rate(nsm_config.bandwidth) if nsm_config.bandwidth else None,
                  sysctls=len(nsm_config.sysctls))
        return nsm

    def _create_kernel_fabric(self, nsm: NSM, v4: str, v6: str) -> None:
        c, ns, nsm_config = self.config, nsm.netns, nsm.config
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
        if nsm_config.congestion_control:
            allow_congestion_control(nsm_config.congestion_control)
            netns.sysctl("net.ipv4.tcp_congestion_control", nsm_config.congestion_control, netns=ns)
        # After the veth: a sysctl may name eth0.
        for key, value in nsm_config.sysctls:
            try:
                netns.sysctl(key, value, netns=ns)
            except NetKernelError as e:
                if netns.sysctl_get(key, ns) is None:
                    raise NSMError(f"{e} (this sysctl is host-wide: network namespaces do not "
                                   "have it, so it cannot be set per NSM)") from None
                raise

    @staticmethod
    def _create_lwip_fabric(nsm: NSM) -> None:
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

    def _start_nsm_process(self, nsm: NSM) -> None:
        c = self.config
        cmd = ["ip", "netns", "exec", nsm.netns, str(lwip_binary()), "--engine", str(nsm.socket),
               "--tap", LWIP_TAP, "--index", str(nsm.index + 1),
               "--prefix4", str(c.ipv4_subnet.prefixlen), "--prefix6", str(c.ipv6_prefix.prefixlen)]
        # Its log goes where the daemon's goes; its own session keeps terminal signals away.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        self.nsm_procs[nsm.name] = proc
        log_event("nsm_process_started", nsm=nsm.name, pid=proc.pid)
        threading.Thread(target=self._watch_nsm_process, args=(nsm, proc),
                         name=f"nsm-{nsm.name}", daemon=True).start()

    def _wait_nsm_up(self, nsm: NSM, connects: int, timeout: float = 10.0) -> None:
        """Until the engine has seen process number `connects` of the NSM connect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self._engine_stats()
            s = stats.nsm(nsm.name) if stats else None
            if s and s.up and (s.connects or 0) >= connects:
                return
            proc = self.nsm_procs.get(nsm.name)
            if proc is not None and proc.poll() is not None and connects <= 1:
                raise NSMError(f"NSM {nsm.name!r}: its process exited with status "
                               f"{proc.returncode} before it connected (see the daemon's log)")
            time.sleep(0.02)
        raise NSMError(f"NSM {nsm.name!r}: its process did not connect to the engine within "
                       f"{timeout:.0f} s (see the daemon's log)")

    def _watch_nsm_process(self, nsm: NSM, proc: subprocess.Popen[bytes]) -> None:
        """Restart an external NSM that died: the engine fails its connections, the new
        process gets the tenants' regions and the listeners back."""
        started = time.monotonic()
        status = proc.wait()
        if self.stopping or self.nsm_procs.get(nsm.name) is not proc:
            return
        # A process that dies at once (within 2 s) waits 1 s before the next try: not a loop.
        delay = 0.05 if time.monotonic() - started > 2 else 1.0
        log_event("nsm_process_exited", logging.WARNING, nsm=nsm.name, pid=proc.pid, status=status,
                  action=f"restarting in {delay:g} s")
        if self.stop_event.wait(delay):
            return
        with self.lock:
            if self.stopping or self.nsm_procs.get(nsm.name) is not proc:
                return
            self._start_nsm_process(nsm)

    def _stop_nsm_process(self, name: str) -> None:
        proc = self.nsm_procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @staticmethod
    def _remove_nsm_fabric(nsm: NSM) -> None:
        netns.netns_del(nsm.netns)  # takes eth0 and so the veth pair with it
        netns.link_del(NSM_VETH_PREFIX + nsm.name)

    def _register_nsm(self, nsm: NSM) -> None:
        path = str(netns.netns_path(nsm.netns))
        if nsm.external:
            stats = self._engine_stats()
            s = stats.nsm(nsm.name) if stats else None
            if s is None:
                self.engine_client.nsm_add(nsm.name, path, str(nsm.socket))
            self._start_nsm_process(nsm)
            self._wait_nsm_up(nsm, 1)
        else:
            self.engine_client.nsm_add(nsm.name, path)
        if nsm.config.bandwidth:
            try:
                self.engine_client.nsm_set(nsm.name, nsm.config.bandwidth)
            except EngineError as e:
                raise NSMError(f"NSM {nsm.name!r}: cannot set bandwidth "
                               f"{format_rate(nsm.config.bandwidth)}: {e}") from None

    def start_engine(self) -> None:
        binary = engine_binary()
        for path in (ENGINE_SOCKET, ADMIN_SOCKET):
            path.unlink(missing_ok=True)
        cmd = [str(binary), "--control", str(ENGINE_SOCKET), "--admin", str(ADMIN_SOCKET)]
        nice = self.config.engine_nice
        if nice:
            # nice(1) sets it before exec, so every engine thread inherits it (a later
            # setpriority reaches one thread only).
            cmd = ["nice", "-n", str(nice), *cmd]
        log.info("starting engine: %s", " ".join(cmd))
        relay = self.config.log_format == "json"
        # The engine logs to stderr, which is the daemon's log (relayed as JSON if asked).
        # Its own session gives it its own autogroup, whose weight we can set without
        # touching the shell the daemon was started from.
        self.engine = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                       stderr=subprocess.PIPE if relay else None)
        engine = self.engine
        if nice:
            try:
                netns.set_autogroup_nice(engine.pid, nice)
            except OSError as e:
                log.warning("cannot set the engine's autogroup nice to %d (%s); it competes "
                            "with tenant programs at equal weight", nice, e)
        if relay and engine.stderr is not None:
            threading.Thread(target=engine_log_relay, args=(engine.stderr,), name="engine-log",
                             daemon=True).start()
        # Recorded so that `netkernel down` can stop an engine orphaned by a killed daemon.
        ENGINE_PID_FILE.write_text(f"{engine.pid}\n")
        wait_ready(ADMIN_SOCKET, lambda: engine.poll() is None)
        if ENGINE_SOCKET.exists():
            # Tenant processes that dropped root (nginx workers) must still reach the engine;
            # it tells tenants apart by network namespace, not by file permissions.
            os.chmod(ENGINE_SOCKET, 0o666)
        threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True).start()
        for nsm in self.nsms.values():
            self._register_nsm(nsm)
        self.engine_client.dns_upstream(str(self.config.bridge_ipv4), 53)
        log.info("engine ready (pid %d)", engine.pid)

    def _watch_engine(self) -> None:
        assert self.engine is not None
        status = self.engine.wait()
        if not self.stopping:
            log_event("engine_exited", logging.ERROR, status=status, action="stopping the daemon")
            self.exit_code = 1
            self.stop_event.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stop_event.set())
        try:
            self.start()
        except NetKernelError as e:
            log.error("start-up failed: %s", e)
            self.teardown()
            return 1
        except BaseException:
            log.exception("start-up failed")
            self.teardown()
            return 1
        while not self.stop_event.wait(1.0):
            pass
        self.teardown()
        return self.exit_code

    def teardown(self) -> None:
        if self._lock_fd is None:
            return  # never got the lock: another daemon owns the fabric
        self.stopping = True
        self.stop_event.set()  # ends the sampler and drainer threads
        log.info("stopping")
        if self.api:
            self.api.stop()
        if self.metrics:
            self.metrics.stop()
        if self.dns:
            self.dns.stop()
        netns.kill_netns_processes(t.netns for t in self.tenants.values())
        for name in list(self.nsm_procs):
            self._stop_nsm_process(name)
        self.engine_client.close()
        if self.engine and self.engine.poll() is None:
            self.engine.terminate()
            try:
                self.engine.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("engine ignored SIGTERM; killing it")
                self.engine.kill()
                self.engine.wait()
        self._cleanup_keep_lock()
        os.close(self._lock_fd)
        self._lock_fd = None
        LOCK_FILE.unlink(missing_ok=True)
        try:
            RUN_DIR.rmdir()
        except OSError:
            pass
        log_event("daemon_stopped", pid=os.getpid())

    def _cleanup_keep_lock(self) -> None:
        for item in cleanup_all(keep_lock=True):
            log.debug("removed %s", item)

    # -- DNS ----------------------------------------------------------------------------
    def resolve(self, name: str) -> Addrs | None:
        if name.endswith(TENANT_SUFFIX):
            t = self.tenants.get(name[: -len(TENANT_SUFFIX)])
            if t is None:
                return None
            return [ipaddress.ip_address(t.ipv4), ipaddress.ip_address(t.ipv6)]
        configured = [ipaddress.ip_address(a) for n, a in self.config.dns_hosts if n == name]
        if configured:
            return configured
        return self.hosts.lookup(name)

    # -- NSMs -------------------------------------------------------------------------------
    def _nsm(self, name: str) -> NSM:
        nsm = self.nsms.get(name)
        if nsm is None:
            raise UnknownNSMError(f"unknown NSM {name!r} (configured: {', '.join(self.nsms) or 'none'})")
        return nsm

    def add_nsm(self, name: str, congestion_control: str | None, bandwidth: object,
                sysctls: dict[str, object], kind: str = "kernel") -> NSM:
        """An NSM at runtime, built as at start-up; nothing is left behind if a step fails."""
        check_nsm_name(name)
        if kind not in NSM_KINDS:
            raise NSMError(f"NSM {name!r}: unknown type {kind!r}; use one of: {', '.join(NSM_KINDS)}")
        try:
            cc = check_congestion_control(congestion_control) if congestion_control else None
            rate = parse_rate(bandwidth) if bandwidth is not None else 0
            checked = tuple(check_sysctl(k, v) for k, v in sysctls.items())
            check_nsm_kind_settings(kind, cc, checked)
        except ValueError as e:
            raise NSMError(f"NSM {name!r}: {e}") from None
        with self.lock:
            if name in self.nsms:
                raise NSMError(f"NSM {name!r} exists already (see: netkernel nsm list)")
            nsm = self._create_nsm_fabric(NSMConfig(name, kind, cc, rate, checked))
            try:
                self._register_nsm(nsm)
            except BaseException:
                self._stop_nsm_process(name)
                del self.nsms[name]
                try:
                    self.engine_client.nsm_del(name)
                except NetKernelError:
                    pass  # never registered
                self._remove_nsm_fabric(nsm)
                raise
            log_event("nsm_added", nsm=name)
            return nsm

    def remove_nsm(self, name: str) -> None:
        with self.lock:
            nsm = self._nsm(name)
            assigned = sorted(t.name for t in self.tenants.values() if t.nsm == name)
            if assigned:
                raise NSMError(f"NSM {name!r} still serves tenant(s) {', '.join(assigned)}; move them "
                               f"(netkernel tenant move NAME --nsm OTHER) or delete them first")
            draining = sorted(t.name for t in self.tenants.values() if name in t.draining)
            if draining:
                raise NSMError(f"NSM {name!r} still carries connections of tenant(s) {', '.join(draining)} "
                               "moved away from it; try again once they have closed "
                               "(netkernel conns shows them)")
            if len(self.nsms) == 1:
                raise NSMError(f"NSM {name!r} is the last one; tenants need at least one NSM")
            try:
                self.engine_client.nsm_del(name)
            except EngineError as e:
                if e.errno_name == "EBUSY":
                    raise NSMError(f"NSM {name!r} is busy: {e.engine_message}") from None
                raise NSMError(f"cannot remove NSM {name!r}: {e}") from None
            del self.nsms[name]
            self._stop_nsm_process(name)
            self._remove_nsm_fabric(nsm)
            log_event("nsm_removed", nsm=name)

    # -- tenants ------------------------------------------------------------------------
    def _tenant(self, name: str) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            raise TenantError(f"no tenant named {name!r} (see: netkernel ps)")
        return t

    def create_tenant(self, name: str, nsm_name: str | None, policy: Policy | None = None,
                      rw: tuple[Path, ...] = (), ro: tuple[Path, ...] = ()) -> tuple[Tenant, bool]:
        """The tenant, created if new (policy None: the config's defaults), and whether it
        was created."""
        check_tenant_name(name)
        with self.lock:
            if nsm_name is not None:
                self._nsm(nsm_name)
            existing = self.tenants.get(name)
            if existing is not None:
                if nsm_name is not None and nsm_name != existing.nsm:
                    raise TenantError(
                        f"tenant {name!r} is on NSM {existing.nsm!r}; move it with: "
                        f"netkernel tenant move {name} --nsm {nsm_name}")
                if policy is not None and policy != existing.policy:
                    raise TenantError(
                        f"tenant {name!r} exists with another policy ({existing.policy.describe()}); "
                        f"change it with: netkernel tenant set {name} ...")
                return existing, False
            if not self.nsms:
                raise TenantError("there is no NSM to put a tenant on (add one: netkernel nsm add NAME)")
            nsm = nsm_name or next(iter(self.nsms))
            used = {t.index for t in self.tenants.values()}
            index = next((n for n in range(1, MAX_TENANTS + 1) if n not in used), None)
            if index is None:
                raise TenantError(f"too many tenants (limit {MAX_TENANTS})")
            t = Tenant(name, nsm, index, -1, str(self.config.tenant_ipv4(index)),
                       str(self.config.tenant_ipv6(index)), policy or self.config.defaults,
                       rw=rw, ro=ro, uid_slot=sandbox.uid_slot(name))
            engine_added = False
            try:
                self._create_tenant_fabric(t)
                t.id = self.engine_client.tenant_add(
                    name, str(netns.netns_path(t.netns)), nsm, t.ipv4, t.ipv6)
                engine_added = True
                self._apply_policy(t, t.policy)
            except BaseException:
                if engine_added:
                    try:
                        self.engine_client.tenant_del(name)
                    except NetKernelError as e:
                        log.warning("tenant %s: %s", name, e)
                self._delete_tenant_fabric(t)
                raise
            self.tenants[name] = t
            log_event("tenant_created", tenant=name, nsm=nsm, id=t.id, ipv4=t.ipv4, ipv6=t.ipv6,
                      **self._policy_fields(t.policy))
            return t, True

    @staticmethod
    def _policy_fields(p: Policy) -> dict[str, int | bool]:
        return asdict(p)

    def _apply_policy(self, t: Tenant, policy: Policy) -> None:
        try:
            self.engine_client.tenant_set(t.name, policy.engine_args())
        except EngineError as e:
            raise TenantError(f"tenant {t.name!r}: the engine refused the policy: "
                              f"{e.engine_message}") from None

    def set_policy(self, name: str, changes: dict[str, object]) -> Tenant:
        with self.lock:
            t = self._tenant(name)
            try:
                policy = policy_with(t.policy, changes)
            except ValueError as e:
                raise TenantError(str(e)) from None
            self._apply_policy(t, policy)
            self._apply_cgroup_policy(t, policy)
            old = t.policy
            t.policy = policy
            changed = {k: v for k, v in self._policy_fields(policy).items()
                       if v != self._policy_fields(old)[k]}
            log_event("tenant_policy_set", tenant=name, nsm=t.nsm, **changed)
            return t

    def _apply_cgroup_policy(self, t: Tenant, policy: Policy) -> None:
        try:
            self.cgroups.limit(t.name, policy.max_process_memory, policy.max_processes, policy.weight)
        except cgroups.CgroupError as e:
            raise TenantError(f"tenant {t.name!r}: {e}") from None

    def _create_tenant_fabric(self, t: Tenant) -> None:
        netns.netns_add(t.netns)  # only `lo`: the tenant has no path around NetKernel
        # Its own addresses also sit on its `lo` (routes to nowhere else): glibc's
        # getaddrinfo(AI_ADDRCONFIG) asks the kernel over netlink, which LD_PRELOAD cannot
        # see, whether the namespace has an IPv4 / IPv6 address before it looks a name up.
        for cidr in t.cidrs:
            netns.addr_add("lo", cidr, netns=t.netns)
        self._add_tenant_addresses(t, self._nsm(t.nsm))
        d = TENANTS_DIR / t.name
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(RESOLV_CONF)
        # Its private /run, /var/tmp and /dev/shm: a tmpfs of its own, its pages charged to its
        # cgroup, which bounds it; the host's /run is not where a tenant can fill it up.
        t.fs.mkdir(mode=0o700, exist_ok=True)
        netns.mount_tmpfs(t.fs, t.policy.max_process_memory, t.uid_base, t.uid_base)
        sandbox.prepare_private_fs(t.fs, t.uid_base)
        try:
            t.cgroups = self.cgroups.create(t.name, t.policy.max_process_memory,
                                            t.policy.max_processes, t.policy.weight)
        except (cgroups.CgroupError, OSError) as e:
            raise TenantError(f"tenant {t.name!r}: cannot make its cgroups: {e}") from None

    @staticmethod
    def _add_tenant_addresses(t: Tenant, nsm: NSM) -> None:
        if nsm.external:
            return  # the engine hands them to the NSM's process with the tenant's region
        for cidr in t.cidrs:
            netns.addr_add("eth0", cidr, netns=nsm.netns)

    def _remove_tenant_addresses(self, t: Tenant, nsm_name: str) -> None:
        nsm = self.nsms.get(nsm_name)
        if nsm is not None and not nsm.external:
            for cidr in t.cidrs:
                netns.addr_del("eth0", cidr, netns=nsm.netns)

    def _delete_tenant_fabric(self, t: Tenant) -> None:
        netns.kill_netns_processes([t.netns])
        for nsm_name in [t.nsm, *t.draining]:
            self._remove_tenant_addresses(t, nsm_name)
        netns.netns_del(t.netns)
        # Anything of it the namespace did not find (its cgroup holds every process it forked).
        self.cgroups.kill(t.name)
        netns.umount_all(TENANTS_DIR / t.name)
        shutil.rmtree(TENANTS_DIR / t.name, ignore_errors=True)
        self.cgroups.remove(t.name)

    def delete_tenant(self, name: str) -> None:
        with self.lock:
            t = self._tenant(name)
            netns.kill_netns_processes([t.netns])
            try:
                self.engine_client.tenant_del(name)
            except EngineError as e:
                log.warning("tenant %s: %s", name, e)  # gone from the engine is what we want
            if t.steered:
                try:
                    steer.forget_tenant(BRIDGE, t.ipv4, t.ipv6)
                except Exception as e:  # the tenant goes anyway; its rules match nothing now
                    log.warning("tenant %s: removing its steering rules failed: %s", name, e)
            self._delete_tenant_fabric(t)
            del self.tenants[name]
            self._samples.pop(name, None)
            self.rates.pop(name, None)
            self._refused.pop(name, None)
            log_event("tenant_deleted", tenant=name, nsm=t.nsm)

    def move_tenant(self, name: str, nsm_name: str) -> tuple[Tenant, int | None, str | None]:
        """Move a tenant to another NSM: new connections go there, open ones stay where they
        are until they close. Returns the tenant, the number of flows pinned to the old NSM
        (None if the tenant was already on ``nsm_name``) and the engine's warning if some of
        the tenant's listeners could not follow."""
        with self.lock:
            t = self._tenant(name)
            new = self._nsm(nsm_name)
            if t.nsm == new.name:
                return t, None, None
            old = self._nsm(t.nsm)
            # Moving back to an NSM it is still draining from: its addresses are still there.
            present = set(netns.addr_list("eth0", netns=new.netns))
            added = not set(t.cidrs) <= present
            warning = None
            try:
                # Steer first: pin the flows that live in the old NSM and point new traffic at
                # the new one before it holds the addresses. Adding them first would let a
                # peer that re-resolves the address meanwhile send an old connection's
                # packets to the new NSM, which answers them with a reset.
                t.steered = True
                steer.begin_move(BRIDGE, t.ipv4, t.ipv6, old.netns, new.netns,
                                 **self._steer_args(t, old, new))
                if added:
                    self._add_tenant_addresses(t, new)
                try:
                    self.engine_client.tenant_move(name, new.name)
                except EngineError as e:
                    if e.errno_name in ("ENOENT", "EINVAL"):
                        raise TenantError(f"the engine refused: {e.engine_message}") from None
                    # The engine did move the tenant, but some listener could not be opened in
                    # the new NSM: finish the move (the engine is already there) and say so.
                    warning = e.engine_message
                # Connections the old NSM accepted or opened meanwhile get pinned too.
                time.sleep(MOVE_SETTLE)
                pinned = steer.begin_move(BRIDGE, t.ipv4, t.ipv6, old.netns, new.netns,
                                          **self._steer_args(t, old, new))
                self.engine_client.tenant_move_done(name)
            except BaseException as e:
                self._undo_move(t, old, new, added)
                if isinstance(e, NetKernelError | OSError | subprocess.SubprocessError):
                    raise TenantError(f"moving tenant {name!r} to {new.name!r} failed and was undone: "
                                      f"{e}") from None
                raise
            t.nsm = new.name
            if new.name in t.draining:
                t.draining.remove(new.name)
            if old.name not in t.draining:
                t.draining.append(old.name)
            log_event("tenant_moved", logging.WARNING if warning else logging.INFO, tenant=name,
                      nsm=new.name, from_nsm=old.name, pinned_flows=pinned, warning=warning)
            return t, pinned, warning

    def _undo_move(self, t: Tenant, old: NSM, new: NSM, added: bool) -> None:
        """Best effort back to before a failed move: the engine and the steering on ``old``."""
        for undo, what in (
            (lambda: self.engine_client.tenant_move(t.name, old.name), "engine tenant-move back"),
            (lambda: self.engine_client.tenant_move_done(t.name), "engine tenant-move-done"),
            (lambda: steer.begin_move(BRIDGE, t.ipv4, t.ipv6, new.netns, old.netns,
                                      **self._steer_args(t, new, old)), "steering back"),
        ):
            try:
                undo()
            except Exception as e:
                log.error("tenant %s: undoing a failed move: %s failed: %s", t.name, what, e)
        if added:
            self._remove_tenant_addresses(t, new.name)

    @staticmethod
    def lwip_mac(nsm: NSM, t: Tenant) -> str:
        """The MAC of the tenant's netif in an lwIP NSM (csrc/nsm/lwip: 02:4e:4b:NSM:TENANT)."""
        return f"02:4e:4b:{(nsm.index + 1) & 0xFF:02x}:{(t.id >> 8) & 0xFF:02x}:{t.id & 0xFF:02x}"

    def _engine_flows(self, t: Tenant, nsm: NSM, addresses: set[steer.IPAddress]) -> set[steer.Flow]:
        """The tenant's TCP connections on an external NSM, as the engine sees them."""
        flows: set[steer.Flow] = set()
        for c in self.engine_client.conns(t.name):
            if c.nsm != nsm.name or c.proto != "tcp" or c.kind != "stream" or not c.local or not c.peer:
                continue
            try:
                local, lport = _split_hostport(c.local)
                remote, rport = _split_hostport(c.peer)
            except ValueError:
                continue
            if local in addresses and rport:
                flows.add(steer.Flow(6, remote, rport, local, lport))
        return flows

    def _steer_args(self, t: Tenant, old: NSM, new: NSM | None) -> dict[str, Any]:
        """What steer needs to know about lwIP NSMs on either side of a move."""
        args: dict[str, Any] = {}
        if old.external:
            args["old_mac"] = self.lwip_mac(old, t)
            args["old_flows"] = lambda addresses: self._engine_flows(t, old, addresses)
        if new is not None and new.external:
            args["new_mac"] = self.lwip_mac(new, t)
        return args

    def drain_once(self) -> None:
        """Finish moves whose old NSM carries no connection of the tenant any more."""
        with self.lock:
            for t in list(self.tenants.values()):
                for old in list(t.draining):
                    if old not in self.nsms:
                        t.draining.remove(old)
                        continue
                    args = self._steer_args(t, self.nsms[old], None)
                    if steer.finish_if_drained(BRIDGE, t.ipv4, t.ipv6, self.nsms[old].netns, **args):
                        self._remove_tenant_addresses(t, old)
                        t.draining.remove(old)
                        log_event("tenant_drained", tenant=t.name, nsm=old)

    def _drain_loop(self) -> None:
        while not self.stop_event.wait(DRAIN_INTERVAL):
            try:
                self.drain_once()
            except Exception:  # try again next round; the log says why
                log.exception("checking moved tenants' old NSMs failed")

    # -- rates --------------------------------------------------------------------------------
    def _sample_loop(self) -> None:
        while not self.stop_event.wait(SAMPLE_INTERVAL):
            try:
                stats = self.engine_client.stats()
            except NetKernelError as e:
                log.debug("stats sample failed: %s", e)
                continue
            self.record_sample(stats, time.monotonic())

    @staticmethod
    def _rate(samples: dict[str, tuple[float, int, int]], name: str, now: float,
              tx: int | None, rx: int | None) -> tuple[float, float] | None:
        if tx is None or rx is None:
            return None
        prev = samples.get(name)
        samples[name] = (now, tx, rx)
        if prev is None or now <= prev[0]:
            return None
        dt = now - prev[0]
        # Counters start again at 0 when a tenant is re-created under the same name.
        return max(0.0, (tx - prev[1]) * 8 / dt), max(0.0, (rx - prev[2]) * 8 / dt)

    def record_sample(self, stats: EngineStats, now: float) -> None:
        """Rates from two successive samples, and a log event when limits refused sockets."""
        for s in stats.tenants:
            rate = self._rate(self._samples, s.name, now, s.tx_bytes, s.rx_bytes)
            if rate is not None:
                self.rates[s.name] = rate
            refused = (s.refused_sockets or 0, s.refused_memory or 0)
            before = self._refused.get(s.name, refused)
            self._refused[s.name] = refused
            for reason, count, prev, limit in (("max_sockets", refused[0], before[0], s.max_sockets),
                                               ("max_memory", refused[1], before[1], s.max_memory)):
                if count > prev:
                    log_event("sockets_refused", logging.WARNING, tenant=s.name, nsm=s.nsm, reason=reason,
                              limit=limit, count=count - prev)
        for n in stats.nsms:
            rate = self._rate(self._nsm_samples, n.name, now, n.tx_bytes, n.rx_bytes)
            if rate is not None:
                self.nsm_rates[n.name] = rate

    # -- API ------------------------------------------------------------------------------
    def api_handlers(self) -> dict[str, Handler]:
        def policy_changes(req: dict[str, Any]) -> dict[str, object]:
            return {k: req[k] for k in Policy.__dataclass_fields__ if k in req}

        def tenant_create(req: dict[str, Any]) -> dict[str, Any]:
            changes = policy_changes(req)
            try:
                policy = policy_with(self.config.defaults, changes) if changes else None
            except ValueError as e:
                raise TenantError(str(e)) from None
            t, created = self.create_tenant(req["name"], req.get("nsm"), policy)
            return {"tenant": t.record(), "created": created}

        def tenant_set(req: dict[str, Any]) -> dict[str, Any]:
            changes = policy_changes(req)
            if not changes:
                raise DaemonError("tenant-set: nothing to change; give one or more of "
                                  + ", ".join(Policy.__dataclass_fields__))
            return {"tenant": self.set_policy(req["name"], changes).record()}

        def tenant_move(req: dict[str, Any]) -> dict[str, Any]:
            t, pinned, warning = self.move_tenant(req["name"], req["nsm"])
            return {"tenant": t.record(), "moved": pinned is not None, "pinned_flows": pinned,
                    "warning": warning}

        def tenant_delete(req: dict[str, Any]) -> dict[str, Any]:
            self.delete_tenant(req["name"])
            return {}

        def nsm_add(req: dict[str, Any]) -> dict[str, Any]:
            self.add_nsm(req["name"], req.get("congestion_control"), req.get("bandwidth"),
                         req.get("sysctl", {}), req.get("kind", "kernel"))
            return {"nsm": next(n for n in self.nsm_list() if n["name"] == req["name"])}

        def nsm_remove(req: dict[str, Any]) -> dict[str, Any]:
            self.remove_nsm(req["name"])
            return {}

        def shutdown(req: dict[str, Any]) -> dict[str, Any]:
            self.stop_event.set()
            return {"pid": os.getpid()}

        return {
            "status": lambda req: self.status(),
            "ps": lambda req: {"tenants": self.ps()},
            "conns": lambda req: {"conns": self.conns(req.get("tenant"))},
            "tenant-create": tenant_create,
            "tenant-delete": tenant_delete,
            "tenant-set": tenant_set,
            "tenant-move": tenant_move,
            "nsm-list": lambda req: {"nsms": self.nsm_list()},
            "nsm-add": nsm_add,
            "nsm-remove": nsm_remove,
            "shutdown": shutdown,
        }

    def _nsm_summary(self, nsm: NSM) -> dict[str, Any]:
        c = self.config
        # An external NSM's namespace holds no address of its own: its stack holds the tenants'.
        return {"name": nsm.name, "kind": nsm.config.kind, "netns": nsm.netns,
                "ipv4": None if nsm.external else str(c.nsm_ipv4(nsm.index)),
                "ipv6": None if nsm.external else str(c.nsm_ipv6(nsm.index)),
                "congestion_control": nsm.config.congestion_control,
                "bandwidth": nsm.config.bandwidth,
                "tenants": sum(1 for t in list(self.tenants.values()) if t.nsm == nsm.name)}

    def status(self) -> dict[str, Any]:
        return {
            "running": True,
            "pid": os.getpid(),
            "engine_pid": self.engine.pid if self.engine else None,
            "uptime": round(time.time() - self.started, 1),
            "nsms": [self._nsm_summary(n) for n in list(self.nsms.values())],
            "tenants": len(self.tenants),
            "api_socket": str(self.config.api_socket),
            "metrics": f"http://{self.metrics.address}/metrics" if self.metrics else None,
            "abi_version": abi_version(),
            # How tenants are held (threat-model.md): controllers their cgroups have, and
            # the ones this host lacks (their limits are then not enforced).
            "sandbox": {"cgroups": {c: ("v2" if p.v2 else "v1") for c, p in self.cgroups.places.items()},
                        "cgroups_missing": self.cgroups.missing(),
                        "firewall": f"nft inet {guard.table_name(BRIDGE)}"},
        }

    def _engine_stats(self) -> EngineStats | None:
        try:
            return self.engine_client.stats()
        except NetKernelError as e:
            log.warning("stats unavailable: %s", e)
            return None

    def nsm_list(self) -> list[dict[str, Any]]:
        stats = self._engine_stats()
        tenants = list(self.tenants.values())
        out = []
        for nsm in list(self.nsms.values()):
            s = stats.nsm(nsm.name) if stats else None
            rates = self.nsm_rates.get(nsm.name)
            out.append({
                **self._nsm_summary(nsm),
                # What the namespace really runs, not only what was asked.
                "congestion_control": None if nsm.external else
                netns.sysctl_get("net.ipv4.tcp_congestion_control", nsm.netns),
                "sysctl": dict(nsm.config.sysctls),
                "tenants": sorted(t.name for t in tenants if t.nsm == nsm.name),
                "draining": sorted(t.name for t in tenants if nsm.name in t.draining),
                "sockets": s.sockets if s else None,
                "tx_bytes": s.tx_bytes if s else None,
                "rx_bytes": s.rx_bytes if s else None,
                "tx_bps": round(rates[0]) if rates else None,
                "rx_bps": round(rates[1]) if rates else None,
                # An external NSM: its process (restarted by the daemon when it dies).
                "pid": self.nsm_procs[nsm.name].pid if nsm.name in self.nsm_procs else None,
                "up": bool(s.up) if s and s.up is not None else None,
                "restarts": max((s.connects or 0) - 1, 0) if s and nsm.external else 0,
            })
        return out

    def ps(self) -> list[dict[str, Any]]:
        stats = self._engine_stats()
        out = []
        for t in sorted(list(self.tenants.values()), key=lambda t: t.name):
            s = stats.tenant(t.name) if stats else None
            rates = self.rates.get(t.name)
            out.append({
                "name": t.name, "nsm": t.nsm, "id": t.id, "ipv4": t.ipv4, "ipv6": t.ipv6,
                "netns": t.netns,
                "pids": sandbox.programs(t.name, netns.pids_in_netns(t.netns)),
                "uid_base": t.uid_base, "uid_count": sandbox.TENANT_UID_COUNT,
                "sockets": s.sockets if s else None,
                "memory": s.memory if s else None,
                "tx_bytes": s.tx_bytes if s else None,
                "rx_bytes": s.rx_bytes if s else None,
                "tx_bps": round(rates[0]) if rates else None,
                "rx_bps": round(rates[1]) if rates else None,
                "refused_sockets": s.refused_sockets if s else None,
                "refused_memory": s.refused_memory if s else None,
                "engine_seconds": s.engine_ns / 1e9 if s and s.engine_ns is not None else None,
                "engine_skips": s.engine_skips if s else None,
                "fds": s.fds if s else None,
                "fd_limit": s.fd_limit if s else None,
                "dns_relayed": s.dns_relayed if s else None,
                "dns_dropped": s.dns_dropped if s else None,
                "region_bytes": s.region_bytes if s else None,
                "throttle_wakes": s.throttle_wakes if s else None,
                "throttle_late_seconds": (s.throttle_late_ns / 1e9
                                          if s and s.throttle_late_ns is not None else None),
                "rate_late_credit_bytes": s.rate_late_credit if s else None,
                "policy": asdict(t.policy),
                "draining": list(t.draining),
            })
        return out

    def conns(self, tenant: str | None) -> list[dict[str, Any]]:
        if tenant is not None:
            self._tenant(tenant)
        return [asdict(c) for c in self.engine_client.conns(tenant)
                if tenant is None or c.tenant == tenant]

    def metrics_snapshot(self) -> Snapshot:
        try:
            stats: EngineStats | None = self.engine_client.stats()
        except NetKernelError:
            stats = None
        tenants = list(self.tenants.values())
        return Snapshot(
            up=stats is not None,
            tenants=tuple(TenantSample(t.name, t.nsm, t.policy, stats.tenant(t.name) if stats else None)
                          for t in tenants),
            nsms=tuple(NSMSample(n.name, sum(1 for t in tenants if t.nsm == n.name),
                                 stats.nsm(n.name) if stats else None)
                       for n in list(self.nsms.values())),
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the daemon process (``python -m netkernel.daemon``)."""
    p = argparse.ArgumentParser(prog="netkernel-daemon")
    p.add_argument("--config", type=Path)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    configure_logging(args.log_level, config.log_format)
    return Daemon(config).run()


if __name__ == "__main__":
    sys.exit(main())
