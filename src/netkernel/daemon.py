"""The NetKernel daemon: builds the fabric, runs the engine and the DNS responder, and
serves the control API and the metrics endpoint until told to stop (or until the engine dies).

Start-up is all or nothing: everything the config asks for (NSMs with their sysctls, tenants
with their policy, the metrics endpoint) is in place before the API socket appears, and any
failure tears everything down again.

Beside it: the fabric (fabric.py), the engine and NSM processes (supervise.py) and the log
(daemon_log.py).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import cgroups, fabric, guard, netns, sandbox, steer, supervise
from .api import ApiServer, Handler
from .config import (
    ADMIN_SOCKET,
    BRIDGE,
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
from .engine import EngineClient, EngineStats
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



class Daemon:
    """The NSMs and tenants the daemon runs, and its servers and child processes.

    ``lock`` serialises every change to NSMs and tenants: the methods here that change them
    take it for all they do, and the NSM watcher in supervise.py takes it to restart a
    process. What these call (fabric.py, supervise.py) runs under it and takes no lock of its
    own. Start-up builds the configured NSMs and starts the engine without it, before the
    API, through which changes come, is open.
    """

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
        fabric.build_bridge(self.config)
        for nsm_config in self.config.nsms:
            self._create_nsm(nsm_config)
        supervise.start_engine(self)
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
            supervise.stop_nsm_process(self, name)
        self.engine_client.close()
        supervise.stop_engine(self)
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
            supervise.stop_nsm_process(self, name)
            fabric.remove_nsm(nsm)
            log_event("nsm_removed", nsm=name)

    # -- tenants ------------------------------------------------------------------------
    def get_tenant(self, name: str) -> Tenant:
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
                self.get_nsm(nsm_name)
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
                fabric.create_tenant(t, self.nsms[nsm], self.cgroups)
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
            t = self.get_tenant(name)
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

    def _delete_tenant_fabric(self, t: Tenant) -> None:
        holding = [self.nsms[n] for n in [t.nsm, *t.draining] if n in self.nsms]
        fabric.delete_tenant(t, holding, self.cgroups)

    def delete_tenant(self, name: str) -> None:
        with self.lock:
            t = self.get_tenant(name)
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
            t = self.get_tenant(name)
            new = self.get_nsm(nsm_name)
            if t.nsm == new.name:
                return t, None, None
            old = self.get_nsm(t.nsm)
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
                    fabric.add_tenant_addresses(t, new)
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
            fabric.remove_tenant_addresses(t, new)

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
                        fabric.remove_tenant_addresses(t, self.nsms[old])
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

    def nsm_list(self) -> list[dict[str, Any]]:
        stats = self.engine_stats()
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
        stats = self.engine_stats()
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
            self.get_tenant(tenant)
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
