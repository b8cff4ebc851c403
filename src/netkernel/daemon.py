"""The NetKernel daemon: builds the fabric, runs the engine and the DNS responder, and
serves the control API until told to stop (or until the engine dies).

Fabric (DESIGN §F): a bridge ``nk0`` in the root namespace holding the first address of each
subnet; per NSM a namespace ``nk-nsm-<name>`` joined to the bridge by a veth pair and holding
the addresses of its tenants; per tenant a namespace ``nk-t-<name>`` with only ``lo``. There is
no default route, forwarding or NAT: an NSM reaches the bridge's L2 segment and nothing else.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import netns
from .api import ApiServer
from .config import (
    ADMIN_SOCKET,
    BRIDGE,
    DAEMON_SOCKET,
    ENGINE_PID_FILE,
    ENGINE_SOCKET,
    LOCK_FILE,
    MAX_TENANTS,
    NSM_NETNS_PREFIX,
    NSM_VETH_PREFIX,
    PID_FILE,
    RUN_DIR,
    TENANT_NETNS_PREFIX,
    TENANTS_DIR,
    Config,
    check_tenant_name,
    engine_binary,
    load_config,
)
from .dns import TENANT_SUFFIX, Addrs, DNSServer, HostsFile
from .engine import EngineClient, wait_ready
from .errors import (
    DaemonAlreadyRunningError,
    DaemonError,
    EngineError,
    NetKernelError,
    TenantError,
    UnknownNSMError,
)

log = logging.getLogger("netkernel.daemon")

RESOLV_CONF = "nameserver 127.0.0.53\n"  # the engine's stub inside each tenant namespace


def abi_version() -> int | None:
    """The shared-memory ABI version GuestLib and the engine were built with (generated from
    include/netkernel/abi.h at build time; absent in a source tree that was never built)."""
    try:
        abi = importlib.import_module("netkernel._abi")
    except ImportError:
        return None
    return int(abi.NK_ABI_VERSION)


def nsm_netns(name: str) -> str:
    return NSM_NETNS_PREFIX + name


def tenant_netns(name: str) -> str:
    return TENANT_NETNS_PREFIX + name


@dataclass
class Tenant:
    name: str
    nsm: str
    index: int  # N in 198.18.1.N
    id: int  # the engine's tenant id
    ipv4: str
    ipv6: str

    @property
    def netns(self) -> str:
        return tenant_netns(self.name)

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "netns": self.netns,
            "netns_path": str(netns.netns_path(self.netns)),
            "resolv_conf": str(TENANTS_DIR / self.name / "resolv.conf"),
            "engine_socket": str(ENGINE_SOCKET),
        }


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
    for link in netns.link_names():
        if link == BRIDGE or link.startswith(NSM_VETH_PREFIX):
            netns.link_del(link)
            removed.append(f"link {link}")
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
        shutil.rmtree(TENANTS_DIR, ignore_errors=True)
        removed.append(str(TENANTS_DIR))
    try:
        RUN_DIR.rmdir()  # only if empty: leave anything we did not put there
    except OSError:
        pass
    return removed


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tenants: dict[str, Tenant] = {}
        self.engine: subprocess.Popen[bytes] | None = None
        self.engine_client = EngineClient(ADMIN_SOCKET)
        self.dns: DNSServer | None = None
        self.api: ApiServer | None = None
        self.hosts = HostsFile()
        self.stop_event = threading.Event()
        self.stopping = False
        self.exit_code = 0
        self.lock = threading.Lock()  # serialises tenant create/delete
        self._lock_fd: int | None = None
        self.started = time.time()

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
        self.build_fabric()
        self.start_engine()
        self.dns = DNSServer(str(self.config.bridge_ipv4), 53, self.resolve)
        self.dns.start()
        log.info("dns: answering on %s:53", self.config.bridge_ipv4)
        self.api = ApiServer(DAEMON_SOCKET, self.handle)
        self.api.start()
        log.info("ready: api on %s (pid %d)", DAEMON_SOCKET, os.getpid())

    def build_fabric(self) -> None:
        c = self.config
        plen4, plen6 = c.ipv4_subnet.prefixlen, c.ipv6_prefix.prefixlen
        netns.bridge_add(BRIDGE)
        netns.addr_add(BRIDGE, f"{c.bridge_ipv4}/{plen4}")
        netns.addr_add(BRIDGE, f"{c.bridge_ipv6}/{plen6}")
        for i, nsm in enumerate(c.nsms):
            ns = nsm_netns(nsm.name)
            netns.netns_add(ns)
            # Tenants bind only their own addresses; never let an NSM bind a foreign one.
            netns.sysctl("net.ipv4.ip_nonlocal_bind", "0", netns=ns)
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0", netns=ns)
            netns.veth_into(NSM_VETH_PREFIX + nsm.name, ns, "eth0", BRIDGE)
            netns.addr_add("eth0", f"{c.nsm_ipv4(i)}/{plen4}", netns=ns)
            netns.addr_add("eth0", f"{c.nsm_ipv6(i)}/{plen6}", netns=ns)
            log.info("nsm %s: netns %s, eth0 %s %s", nsm.name, ns, c.nsm_ipv4(i), c.nsm_ipv6(i))

    def start_engine(self) -> None:
        binary = engine_binary()
        for path in (ENGINE_SOCKET, ADMIN_SOCKET):
            path.unlink(missing_ok=True)
        cmd = [str(binary), "--control", str(ENGINE_SOCKET), "--admin", str(ADMIN_SOCKET)]
        log.info("starting engine: %s", " ".join(cmd))
        # The engine logs to stderr, which is the daemon's log.
        self.engine = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        engine = self.engine
        # Recorded so that `netkernel down` can stop an engine orphaned by a killed daemon.
        ENGINE_PID_FILE.write_text(f"{engine.pid}\n")
        wait_ready(ADMIN_SOCKET, lambda: engine.poll() is None)
        if ENGINE_SOCKET.exists():
            # Tenant processes that dropped root (nginx workers) must still reach the engine;
            # it tells tenants apart by network namespace, not by file permissions.
            os.chmod(ENGINE_SOCKET, 0o666)
        threading.Thread(target=self._watch_engine, name="engine-watch", daemon=True).start()
        for nsm in self.config.nsms:
            self.engine_client.nsm_add(nsm.name, str(netns.netns_path(nsm_netns(nsm.name))))
        self.engine_client.dns_upstream(str(self.config.bridge_ipv4), 53)
        log.info("engine ready (pid %d)", engine.pid)

    def _watch_engine(self) -> None:
        assert self.engine is not None
        status = self.engine.wait()
        if not self.stopping:
            log.error("the engine exited unexpectedly (status %d); stopping the daemon", status)
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
        log.info("stopping")
        if self.api:
            self.api.stop()
        if self.dns:
            self.dns.stop()
        netns.kill_netns_processes(t.netns for t in self.tenants.values())
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
        log.info("stopped")

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

    # -- tenants ------------------------------------------------------------------------
    def create_tenant(self, name: str, nsm_name: str | None) -> tuple[Tenant, bool]:
        check_tenant_name(name)
        if nsm_name is not None and self.config.nsm(nsm_name) is None:
            known = ", ".join(n.name for n in self.config.nsms)
            raise UnknownNSMError(f"unknown NSM {nsm_name!r} (configured: {known})")
        with self.lock:
            existing = self.tenants.get(name)
            if existing is not None:
                if nsm_name is not None and nsm_name != existing.nsm:
                    raise TenantError(
                        f"tenant {name!r} is on NSM {existing.nsm!r}; moving a tenant to "
                        f"another NSM is not supported yet (delete it first: "
                        f"netkernel tenant delete {name})")
                return existing, False
            nsm = nsm_name or self.config.nsms[0].name
            used = {t.index for t in self.tenants.values()}
            index = next((n for n in range(1, MAX_TENANTS + 1) if n not in used), None)
            if index is None:
                raise TenantError(f"too many tenants (limit {MAX_TENANTS})")
            t = Tenant(name, nsm, index, -1, str(self.config.tenant_ipv4(index)),
                       str(self.config.tenant_ipv6(index)))
            try:
                self._create_tenant_fabric(t)
                t.id = self.engine_client.tenant_add(
                    name, str(netns.netns_path(t.netns)), nsm, t.ipv4, t.ipv6)
            except BaseException:
                self._delete_tenant_fabric(t)
                raise
            self.tenants[name] = t
            log.info("tenant %s: id %d, nsm %s, %s %s", name, t.id, nsm, t.ipv4, t.ipv6)
            return t, True

    def _create_tenant_fabric(self, t: Tenant) -> None:
        netns.netns_add(t.netns)  # only `lo`: the tenant has no path around NetKernel
        # Its own addresses also sit on its `lo` (routes to nowhere else): glibc's
        # getaddrinfo(AI_ADDRCONFIG) asks the kernel over netlink, which LD_PRELOAD cannot
        # see, whether the namespace has an IPv4 / IPv6 address before it looks a name up.
        netns.addr_add("lo", f"{t.ipv4}/32", netns=t.netns)
        netns.addr_add("lo", f"{t.ipv6}/128", netns=t.netns)
        ns = nsm_netns(t.nsm)
        netns.addr_add("eth0", f"{t.ipv4}/32", netns=ns)
        netns.addr_add("eth0", f"{t.ipv6}/128", netns=ns)
        d = TENANTS_DIR / t.name
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(RESOLV_CONF)

    def _delete_tenant_fabric(self, t: Tenant) -> None:
        netns.kill_netns_processes([t.netns])
        ns = nsm_netns(t.nsm)
        netns.addr_del("eth0", f"{t.ipv4}/32", netns=ns)
        netns.addr_del("eth0", f"{t.ipv6}/128", netns=ns)
        netns.netns_del(t.netns)
        shutil.rmtree(TENANTS_DIR / t.name, ignore_errors=True)

    def delete_tenant(self, name: str) -> None:
        with self.lock:
            t = self.tenants.get(name)
            if t is None:
                raise TenantError(f"no tenant named {name!r}")
            netns.kill_netns_processes([t.netns])
            try:
                self.engine_client.tenant_del(name)
            except EngineError as e:
                log.warning("tenant %s: %s", name, e)  # gone from the engine is what we want
            self._delete_tenant_fabric(t)
            del self.tenants[name]
            log.info("tenant %s deleted", name)

    # -- API ------------------------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "status":
            return self.status()
        if op == "tenant-create":
            nsm = req.get("nsm")
            t, created = self.create_tenant(str(req.get("name", "")), str(nsm) if nsm else None)
            return {"tenant": t.record(), "created": created}
        if op == "tenant-delete":
            self.delete_tenant(str(req.get("name", "")))
            return {}
        if op == "ps":
            return {"tenants": self.ps()}
        if op == "conns":
            return {"conns": self.conns(req.get("tenant"))}
        if op == "shutdown":
            self.stop_event.set()
            return {"pid": os.getpid()}
        raise DaemonError(f"unknown op {op!r}")

    def status(self) -> dict[str, Any]:
        c = self.config
        return {
            "running": True,
            "pid": os.getpid(),
            "engine_pid": self.engine.pid if self.engine else None,
            "uptime": round(time.time() - self.started, 1),
            "nsms": [
                {"name": n.name, "kind": n.kind, "netns": nsm_netns(n.name),
                 "ipv4": str(c.nsm_ipv4(i)), "ipv6": str(c.nsm_ipv6(i)),
                 "tenants": sum(1 for t in self.tenants.values() if t.nsm == n.name)}
                for i, n in enumerate(c.nsms)
            ],
            "tenants": len(self.tenants),
            "abi_version": abi_version(),
        }

    def ps(self) -> list[dict[str, Any]]:
        try:
            stats = {s.name: s for s in self.engine_client.stats()}
        except NetKernelError as e:
            log.warning("stats unavailable: %s", e)
            stats = {}
        out = []
        for t in sorted(self.tenants.values(), key=lambda t: t.name):
            s = stats.get(t.name)
            out.append({
                "name": t.name, "nsm": t.nsm, "id": t.id, "ipv4": t.ipv4, "ipv6": t.ipv6,
                "netns": t.netns, "pids": netns.pids_in_netns(t.netns),
                "sockets": s.sockets if s else None,
                "tx_bytes": s.tx_bytes if s else None,
                "rx_bytes": s.rx_bytes if s else None,
            })
        return out

    def conns(self, tenant: Any) -> list[dict[str, Any]]:
        if tenant is not None and tenant not in self.tenants:
            raise TenantError(f"no tenant named {tenant!r}")
        return [asdict(c) for c in self.engine_client.conns()
                if tenant is None or c.tenant == tenant]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s netkernel[%(process)d] %(levelname)s %(name)s: %(message)s",
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
    except NetKernelError as e:
        log.error("%s", e)
        return 1
    return Daemon(config).run()


if __name__ == "__main__":
    sys.exit(main())
