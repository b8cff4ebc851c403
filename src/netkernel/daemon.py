"""The NetKernel daemon: builds the fabric, runs the engine and the DNS responder, and
serves the control API and the metrics endpoint until told to stop. An engine that dies is
restarted (supervise.py); one that keeps dying is left down, and the daemon says why.

Start-up is all or nothing: everything the config asks for (NSMs with their sysctls, tenants
with their policy, the metrics endpoint) is in place before the API socket appears, and any
failure tears everything down again.

This module holds the daemon's state and its changes; the rest is beside it: the fabric
(fabric.py), the engine and NSM processes (supervise.py), tenant moves (move.py), what the
API and metrics show (views.py), the API's operations (handlers.py) and the log
(daemon_log.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from . import cgroups, fabric, handlers, move, netns, sandbox, steer, supervise, views
from .api import ApiServer
from .config import (
    ADMIN_SOCKET,
    BRIDGE,
    ENGINE_SOCKET,
    LOCK_FILE,
    MAX_NSMS,
    MAX_TENANTS,
    NSM_KINDS,
    NSM_NETNS_PREFIX,
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
    load_config,
    parse_rate,
    policy_with,
)
from .daemon_log import configure_logging, log, log_event
from .dns import TENANT_SUFFIX, Addrs, DNSServer, HostsFile
from .dns import TTL as DNS_TTL
from .dns import ask as dns_ask
from .engine import EngineClient, EngineStats
from .errors import (
    ConfigError,
    DaemonAlreadyRunningError,
    EngineError,
    NetKernelError,
    NSMError,
    TenantError,
    UnknownNSMError,
)
from .keep import Keeper
from .metrics import MetricsServer
from .records import NSM, Tenant

# Names asked of other hosts ([dns] forward) whose answers are kept; past this the table is
# emptied (a tenant asking random names must not grow the daemon).
FORWARD_CACHE_MAX = 4096


class Daemon:
    """The NSMs and tenants the daemon runs, and its servers and child processes.

    ``lock`` serialises every change to NSMs and tenants: the methods here that change them,
    move.move_tenant and move.drain_once take it for all they do, and the NSM watcher in
    supervise.py takes it to restart a process. What these call (fabric.py, supervise.py)
    runs under it and takes no lock of its own. Start-up builds the configured NSMs and
    starts the engine without it, before the API, through which changes come, is open;
    views.py reads without it.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.nsms: dict[str, NSM] = {}  # in creation order: the first is the default
        self.tenants: dict[str, Tenant] = {}
        self.engine: subprocess.Popen[bytes] | None = None
        # Kept across engines (supervise.py): the socket tenants reach the engine on, and
        # what tenants hold of the engine (regions, doorbells, listeners).
        self.control_sock: socket.socket | None = None
        self.keeper = Keeper()
        self.keep_reader: threading.Thread | None = None  # reads the running engine's channel
        self.upgrade_requested = threading.Event()  # SIGHUP
        self.engine_crashes: list[float] = []  # monotonic times of deaths, CRASH_WINDOW back
        self.engine_restarts = 0
        self.engine_failed: str | None = None  # why no engine runs, when none does
        self.fd_limit: supervise.FdLimit | None = None  # set as the engine starts
        self.engine_client = EngineClient(ADMIN_SOCKET)
        self.dns: DNSServer | None = None
        self.api: ApiServer | None = None
        self.metrics: MetricsServer | None = None
        self.hosts = HostsFile()
        self._forward_cache: dict[str, tuple[float, Addrs | None]] = {}
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
        self.rates = views.Rates()
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
        leftovers = [n for n in netns.netns_list() if n.startswith((TENANT_NETNS_PREFIX, NSM_NETNS_PREFIX))]
        if leftovers or netns.link_exists(BRIDGE):
            log.warning("removing leftovers of a previous run: %s", ", ".join(leftovers) or BRIDGE)
            self._cleanup_keep_lock()
        PID_FILE.write_text(f"{os.getpid()}\n")
        TENANTS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        sandbox.bwrap()  # fail now, with the install hint, not at the first `netkernel run`
        sandbox.install_guestlib()
        fabric.build_bridge(self.config)
        for nsm_config in self.config.nsms:
            self._create_nsm(nsm_config)
        supervise.start_engine(self)
        self.engine_client.serve()  # no tenant yet: its processes may come at once
        self.dns = DNSServer(
            str(self.config.bridge_ipv4), 53, self.resolve, slow=lambda n: self.forward_server(n) is not None
        )
        self.dns.start()
        log.info("dns: answering on %s:53", self.config.bridge_ipv4)
        missing = self.cgroups.missing()
        if missing:
            log.warning(
                "no %s cgroup controller on this host: tenants run without that limit", ", ".join(missing)
            )
        for tc in self.config.tenants:
            self.create_tenant(tc.name, tc.nsm, tc.policy, rw=tc.rw, ro=tc.ro)
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            self.metrics = MetricsServer(host, port, lambda: views.metrics_snapshot(self))
            self.metrics.start()
        for target, name in ((views.sample_loop, "stats-sampler"), (move.drain_loop, "move-drainer")):
            threading.Thread(target=target, args=(self,), name=name, daemon=True).start()
        # Last: `netkernel up` waits for this socket, so it sees a daemon that is complete.
        self.api = ApiServer(self.config.api_socket, handlers.api_handlers(self), self.config.api_group)
        self.api.start()
        log_event(
            "daemon_ready",
            pid=os.getpid(),
            api=self.config.api_socket,
            api_group=self.config.api_group,
            metrics=self.metrics.address if self.metrics else None,
            nsms=",".join(self.nsms),
            tenants=len(self.tenants),
        )

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

        # SIGHUP upgrades the engine live (as `netkernel upgrade`), as daemons reload: the
        # main loop below does it, woken through stop_event.
        def on_hup(*_: object) -> None:
            self.upgrade_requested.set()
            self.stop_event.set()

        signal.signal(signal.SIGHUP, on_hup)
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
        while True:
            self.stop_event.wait(1.0)
            if self.upgrade_requested.is_set():
                self.upgrade_requested.clear()
                self.stop_event.clear()
                try:
                    supervise.upgrade_engine(self)
                except NetKernelError as e:
                    log.error("upgrade (SIGHUP) failed: %s", e)
                continue
            if self.stop_event.is_set():
                break
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
            supervise.stop_nsm_process(self, name)
        self.engine_client.close()
        supervise.stop_engine(self)
        self.keeper.close()
        if self.control_sock is not None:
            self.control_sock.close()
            self.control_sock = None
            ENGINE_SOCKET.unlink(missing_ok=True)
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
        for item in fabric.cleanup_all(keep_lock=True):
            log.debug("removed %s", item)

    def engine_stats(self) -> EngineStats | None:
        try:
            return self.engine_client.stats()
        except NetKernelError as e:
            log.warning("stats unavailable: %s", e)
            return None

    # -- DNS ----------------------------------------------------------------------------
    def resolve(self, name: str) -> Addrs | None:
        zone = self.config.dns_zone
        for suffix in (TENANT_SUFFIX, f".{zone}" if zone else None):
            if suffix and name.endswith(suffix):
                t = self.tenants.get(name[: -len(suffix)])
                if t is None:
                    return None
                return [ipaddress.ip_address(t.ipv4), ipaddress.ip_address(t.ipv6)]
        server = self.forward_server(name)
        if server is not None:
            return self._forwarded(server, name)
        configured = [ipaddress.ip_address(a) for n, a in self.config.dns_hosts if n == name]
        if configured:
            return configured
        return self.hosts.lookup(name)

    def forward_server(self, name: str) -> str | None:
        """The DNS server of another host's zone that ``name`` is in ([dns] forward), if any."""
        for fzone, server in self.config.dns_forward:
            if name.endswith("." + fzone):
                return server
        return None

    def _forwarded(self, server: str, name: str) -> Addrs | None:
        """Another host's answer, kept for the answers' TTL: a tenant asking the same name in
        a loop costs that host one question per TTL."""
        now = time.monotonic()
        hit = self._forward_cache.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        addrs = dns_ask(server, name)
        if len(self._forward_cache) >= FORWARD_CACHE_MAX:
            self._forward_cache.clear()
        self._forward_cache[name] = (now + DNS_TTL, addrs)
        return addrs

    # -- NSMs -------------------------------------------------------------------------------
    def get_nsm(self, name: str) -> NSM:
        nsm = self.nsms.get(name)
        if nsm is None:
            raise UnknownNSMError(f"unknown NSM {name!r} (configured: {', '.join(self.nsms) or 'none'})")
        return nsm

    def _free_nsm_index(self) -> int:
        live = {n.index for n in self.nsms.values()}
        for candidates in (self._nsm_indices_used | live, live):
            index = next((i for i in range(MAX_NSMS) if i not in candidates), None)
            if index is not None:
                return index
        raise NSMError(f"too many NSMs (limit {MAX_NSMS})")

    def _create_nsm(self, nsm_config: NSMConfig) -> NSM:
        """The NSM's fabric, and the NSM among the daemon's."""
        nsm = NSM(nsm_config, self._free_nsm_index())
        fabric.create_nsm(self.config, nsm)
        self.nsms[nsm.name] = nsm
        self._nsm_indices_used.add(nsm.index)
        return nsm

    def add_nsm(
        self,
        name: str,
        congestion_control: str | None,
        bandwidth: object,
        sysctls: dict[str, object],
        kind: str = "kernel",
    ) -> NSM:
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
            nsm = self._create_nsm(NSMConfig(name, kind, cc, rate, checked))
            try:
                supervise.register_nsm(self, nsm)
            except BaseException:
                supervise.stop_nsm_process(self, name)
                del self.nsms[name]
                try:
                    self.engine_client.nsm_del(name)
                except NetKernelError:
                    pass  # never registered
                fabric.remove_nsm(nsm)
                raise
            log_event("nsm_added", nsm=name)
            return nsm

    def remove_nsm(self, name: str) -> None:
        with self.lock:
            nsm = self.get_nsm(name)
            assigned = sorted(t.name for t in self.tenants.values() if t.nsm == name)
            if assigned:
                raise NSMError(
                    f"NSM {name!r} still serves tenant(s) {', '.join(assigned)}; move them "
                    f"(netkernel tenant move NAME --nsm OTHER) or delete them first"
                )
            draining = sorted(t.name for t in self.tenants.values() if name in t.draining)
            if draining:
                raise NSMError(
                    f"NSM {name!r} still carries connections of tenant(s) {', '.join(draining)} "
                    "moved away from it; try again once they have closed "
                    "(netkernel conns shows them)"
                )
            if len(self.nsms) == 1:
                raise NSMError(f"NSM {name!r} is the last one; tenants need at least one NSM")
            try:
                self.engine_client.nsm_del(name)
            except EngineError as e:
                if e.errno_name == "EBUSY":
                    raise NSMError(f"NSM {name!r} is busy: {e.engine_message}") from None
                raise NSMError(f"cannot remove NSM {name!r}: {e}") from None
            del self.nsms[name]
            supervise.stop_nsm_process(self, name)
            fabric.remove_nsm(nsm)
            log_event("nsm_removed", nsm=name)

    # -- tenants ------------------------------------------------------------------------
    def get_tenant(self, name: str) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            raise TenantError(f"no tenant named {name!r} (see: netkernel ps)")
        return t

    def create_tenant(
        self,
        name: str,
        nsm_name: str | None,
        policy: Policy | None = None,
        rw: tuple[Path, ...] = (),
        ro: tuple[Path, ...] = (),
        kind: str = "namespace",
    ) -> tuple[Tenant, bool]:
        """The tenant, created if new (policy None: the config's defaults), and whether it
        was created."""
        check_tenant_name(name)
        with self.lock:
            if nsm_name is not None:
                self.get_nsm(nsm_name)
            existing = self.tenants.get(name)
            if existing is not None:
                if nsm_name is not None and nsm_name != existing.nsm:
                    raise TenantError(
                        f"tenant {name!r} is on NSM {existing.nsm!r}; move it with: "
                        f"netkernel tenant move {name} --nsm {nsm_name}"
                    )
                if kind != existing.kind:
                    raise TenantError(
                        f"tenant {name!r} exists as a {existing.kind} tenant, not a {kind} one "
                        f"(its region is laid out for that): delete it first (netkernel tenant delete {name})"
                    )
                if policy is not None and policy != existing.policy:
                    raise TenantError(
                        f"tenant {name!r} exists with another policy ({existing.policy.describe()}); "
                        f"change it with: netkernel tenant set {name} ..."
                    )
                return existing, False
            if not self.nsms:
                raise TenantError("there is no NSM to put a tenant on (add one: netkernel nsm add NAME)")
            nsm = nsm_name or next(iter(self.nsms))
            used = {t.index for t in self.tenants.values()}
            index = next((n for n in range(1, MAX_TENANTS + 1) if n not in used), None)
            if index is None:
                raise TenantError(f"too many tenants (limit {MAX_TENANTS})")
            t = Tenant(
                name,
                nsm,
                index,
                -1,
                str(self.config.tenant_ipv4(index)),
                str(self.config.tenant_ipv6(index)),
                policy or self.config.defaults,
                rw=rw,
                ro=ro,
                # Its uid range belongs to its name; on a host with a DNS zone, to its full name
                # there: the hosts of a lab share this machine's record and must not share uids.
                uid_slot=sandbox.uid_slot(f"{name}.{self.config.dns_zone}" if self.config.dns_zone else name),
                kind=kind,
            )
            if t.region and not 0 < t.policy.max_sockets <= t.region[0]:
                # A VM's region has fewer slots: its default limit is what they hold.
                t.policy = dataclasses.replace(t.policy, max_sockets=t.region[0])
            engine_added = False
            try:
                fabric.create_tenant(t, self.nsms[nsm], self.cgroups)
                t.id = self.engine_client.tenant_add(
                    name, str(netns.netns_path(t.netns)), nsm, t.ipv4, t.ipv6, t.region
                )
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
            log_event(
                "tenant_created",
                tenant=name,
                nsm=nsm,
                id=t.id,
                ipv4=t.ipv4,
                ipv6=t.ipv6,
                **self._policy_fields(t.policy),
            )
            return t, True

    @staticmethod
    def _policy_fields(p: Policy) -> dict[str, int | bool]:
        return asdict(p)

    def _apply_policy(self, t: Tenant, policy: Policy) -> None:
        try:
            self.engine_client.tenant_set(t.name, policy.engine_args())
        except EngineError as e:
            raise TenantError(
                f"tenant {t.name!r}: the engine refused the policy: {e.engine_message}"
            ) from None

    def set_policy(self, name: str, changes: dict[str, object]) -> Tenant:
        with self.lock:
            t = self.get_tenant(name)
            try:
                policy = policy_with(t.policy, changes)
            except ValueError as e:
                raise TenantError(str(e)) from None
            self._apply_policy(t, policy)
            self._apply_cgroup_policy(t, policy)
            old = t.policy
            t.policy = policy
            changed = {
                k: v for k, v in self._policy_fields(policy).items() if v != self._policy_fields(old)[k]
            }
            log_event("tenant_policy_set", tenant=name, nsm=t.nsm, **changed)
            return t

    def _apply_cgroup_policy(self, t: Tenant, policy: Policy) -> None:
        try:
            self.cgroups.limit(t.name, policy.max_process_memory, policy.max_processes, policy.weight)
        except cgroups.CgroupError as e:
            raise TenantError(f"tenant {t.name!r}: {e}") from None

    def _delete_tenant_fabric(self, t: Tenant) -> None:
        holding = [self.nsms[n] for n in [t.nsm, *t.draining] if n in self.nsms]
        fabric.delete_tenant(t, holding, self.cgroups)

    def delete_tenant(self, name: str) -> None:
        with self.lock:
            t = self.get_tenant(name)
            netns.kill_netns_processes([t.netns])
            try:
                self.engine_client.tenant_del(name)
            except NetKernelError as e:
                # Gone from the engine is what we want; a dead engine's next one will not be
                # given the tenant (nor its region: keeper.forget below).
                log.warning("tenant %s: %s", name, e)
            if t.steered:
                try:
                    steer.forget_tenant(BRIDGE, t.ipv4, t.ipv6)
                except Exception as e:  # the tenant goes anyway; its rules match nothing now
                    log.warning("tenant %s: removing its steering rules failed: %s", name, e)
            self.keeper.forget(name)
            self._delete_tenant_fabric(t)
            del self.tenants[name]
            self.rates.forget(name)
            log_event("tenant_deleted", tenant=name, nsm=t.nsm)


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
