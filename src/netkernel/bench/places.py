"""Where the bench runs programs: the peer, native and user-mode namespaces it attaches to
the bridge, the tenants it makes, and the processes it starts there."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .. import api, netns
from ..config import BRIDGE, LOG_FILE, lwip_binary
from ..errors import NetKernelError
from .catalogue import CONFIGS, LWIP, PEERS, STATIC, BenchError, Configuration, Options
from .parse import tail

TENANT = "nkbench"
NOISY_TENANT = "nkbench-noisy"
PEER_NS = "nkb-peer"
NATIVE_NS = "nkb-native"
NOISY_NS = "nkb-noisy"
PEER_V4, PEER_V6 = "198.19.250.1", "fd6e:6b00::ff:fa"
NATIVE_V4, NATIVE_V6 = "198.19.251.1", "fd6e:6b00::ff:fb"
NOISY_V4, NOISY_V6 = "198.19.252.1", "fd6e:6b00::ff:fc"
# The user-mode peers: each runs in a "host" namespace of ours (attached to nk0 like the
# native one, no route anywhere else) and serves a sandbox namespace through a tap device.
PASTA_GW = "198.19.253.254"  # pasta's gateway for the sandbox: an address nobody has
SLIRP_GUEST_V4 = "10.0.2.100"  # slirp4netns's fixed guest address
USERMODE_PORTS = (80, 6379)  # forwarded into the sandbox: nginx and redis-server
PREFIX_V4, PREFIX_V6 = 15, 64
FABRIC_V4 = ipaddress.ip_network("198.18.0.0/15")  # the default config's subnet

MUX_TENANT = "nkbench-mux"  # nkbench-mux0, nkbench-mux1, ...
MUX_NS = "nkb-mux"  # nkb-mux0, ...: the native counterparts
LWIP_TENANT = "nkbench-lw"  # the netkernel-lwip configuration's tenant, on NSM LWIP_NSM
LWIP_NSM = "nkbenchlw"
COLO_TENANT = "nkbench-colo"  # the server side of the colocated workloads


@dataclass(frozen=True)
class Place:
    """Where a program runs: a namespace we made (via `ip netns exec`) or the tenant
    (via `netkernel run`)."""

    name: str  # "peer", or a configuration's name
    addr: str  # where the peer reaches its servers
    netns: str | None = None
    tenant: str | None = None
    listen: str | None = None  # the address its servers bind, when not addr (slirp4netns)
    guestlib: bool = True  # False: the tenant's program runs without it (the relay's path)

    def argv(self, cmd: Sequence[str], scratch: Path | None = None) -> list[str]:
        if self.tenant is not None:
            # The host's files are read-only in a tenant: the bench's scratch directory is
            # granted (nginx writes its pid, logs and temp files there).
            grant = ["--rw", str(scratch)] if scratch is not None else []
            bare = [] if self.guestlib else ["env", "-u", "LD_PRELOAD"]
            return [
                sys.executable,
                "-m",
                "netkernel",
                "run",
                "--tenant",
                self.tenant,
                *grant,
                "--",
                *bare,
                *cmd,
            ]
        assert self.netns is not None
        return ["ip", "netns", "exec", self.netns, *cmd]


# Python for programs the bench runs, in tenants too: the system's, which a tenant's
# unprivileged users can reach (one under /root, as pyenv installs it, they cannot).
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
# The programs and configuration files the workloads run, shipped in the package.
PROGRAMS = Path(__file__).with_name("programs")


def program(name: str) -> str:
    """The text of programs/NAME. The Python programs are run as ``python3 -c TEXT``: a
    tenant's users may not reach the package's files (pip under /root, say)."""
    return (PROGRAMS / name).read_text()


class Fabric:
    """The bench's namespaces and tenants around the daemon's bridge, the user-mode stacks
    serving theirs, and every process it starts in them: made by setup(), all undone by
    cleanup(), which also runs after an error or an interruption half-way through."""

    def __init__(self, opts: Options, progress: TextIO | None = None) -> None:
        self.opts = opts
        self.out = progress if progress is not None else sys.stderr
        self.tmp = Path(tempfile.mkdtemp(prefix="netkernel-bench-"))
        # Tenants run as unprivileged host users, one uid range each, and several tenants
        # write here (nginx's pid, logs, temp files): open to all, sticky, as /tmp is.
        self.tmp.chmod(0o1777)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started_daemon = False
        self.made_tenant = False
        self.made_noisy_tenant = False
        self.made_lwip = False
        self.mux_tenants: list[str] = []
        self.colo_server: Place | None = None
        self.usermode: dict[str, subprocess.Popen[bytes]] = {}  # pasta / slirp4netns
        self.made_ns: list[str] = []
        self.peer = Place("peer", PEER_V4, netns=PEER_NS)
        self.native = Place("native", NATIVE_V4, netns=NATIVE_NS)
        self.tenant: Place | None = None
        self.places: dict[str, Place] = {}  # configuration name -> where its programs run
        self.tenant_netns = ""
        self.status: dict[str, Any] = {}
        self.engine_pid: int | None = None

    # -- output ----------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"bench: {msg}", file=self.out, flush=True)

    # -- processes ---------------------------------------------------------------------------
    def run(
        self, place: Place, cmd: Sequence[str], timeout: float, what: str, ok_codes: Sequence[int] = (0,)
    ) -> str:
        """Run to completion; return stdout+stderr; BenchError on timeout or a bad status."""
        argv = place.argv(cmd, self.tmp)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=self.tmp,
            )
        except subprocess.TimeoutExpired as e:
            out = (e.output or b"").decode(errors="replace")
            raise BenchError(
                f"{what}: `{' '.join(cmd)}` ({place.name}) did not finish within "
                f"{timeout:.0f}s\n{tail(out)}" + self._log_hint(place)
            ) from None
        out = proc.stdout.decode(errors="replace")
        if proc.returncode not in ok_codes:
            raise BenchError(
                f"{what}: `{' '.join(cmd)}` ({place.name}) exited with status "
                f"{proc.returncode}\n{tail(out)}" + self._log_hint(place)
            )
        return out

    def _log_hint(self, place: Place) -> str:
        return f"\n(see {LOG_FILE} for the engine's side)" if place.tenant else ""

    def spawn(self, place: Place, cmd: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "wb")  # the child keeps its own copy
        try:
            # Own session: a Ctrl-C on the terminal reaches us, and we stop servers in order.
            p = subprocess.Popen(
                place.argv(cmd, self.tmp),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
            )
        finally:
            log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def log_text(self, log_name: str) -> str:
        try:
            return (self.tmp / log_name).read_text(errors="replace")
        except OSError:
            return ""

    def _died(self, p: subprocess.Popen[bytes], place: Place, what: str, log_name: str) -> BenchError:
        return BenchError(
            f"{what} ({place.name}) exited with status {p.returncode} while starting:\n"
            f"{tail(self.log_text(log_name))}" + self._log_hint(place)
        )

    def _until(
        self,
        ready: Callable[[], bool],
        p: subprocess.Popen[bytes],
        place: Place,
        what: str,
        log_name: str,
        timeout: float,
    ) -> bool:
        """Poll ready() every 0.1 s while p starts: True once it holds, False after timeout;
        an error with the end of p's log if p exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise self._died(p, place, what, log_name)
            if ready():
                return True
            time.sleep(0.1)
        return False

    def wait_listening(
        self,
        ns: str,
        port: int,
        p: subprocess.Popen[bytes],
        place: Place,
        what: str,
        log_name: str,
        timeout: float = 20,
    ) -> None:
        """A server in one of our namespaces: wait for its listening socket (no probe
        connection, which iperf3 would count as a test)."""

        def listening() -> bool:
            r = subprocess.run(
                ["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
            )
            return bool(r.stdout.strip())

        if not self._until(listening, p, place, what, log_name, timeout):
            raise BenchError(
                f"{what} ({place.name}) not listening on port {port} after {timeout:.0f}s:\n"
                f"{tail(self.log_text(log_name))}"
            )

    def wait_accepting(
        self,
        addr: str,
        port: int,
        p: subprocess.Popen[bytes],
        place: Place,
        what: str,
        log_name: str,
        timeout: float = 20,
    ) -> None:
        """Poll from the peer namespace until addr:port accepts (the path the load takes)."""
        if place.name in PEERS and place.netns:
            # pasta and slirp4netns accept on the host side before they try the sandbox.
            self.wait_listening(place.netns, port, p, place, what, log_name, timeout)
        if not self._until(lambda: netns.tcp_accepts(PEER_NS, addr, port), p, place, what, log_name, timeout):
            raise BenchError(
                f"{what} ({place.name}) not accepting on {addr}:{port} after "
                f"{timeout:.0f}s:\n{tail(self.log_text(log_name))}" + self._log_hint(place)
            )

    def wait_gone(self, place: Place, port: int, timeout: float = 5) -> None:
        """After a server stopped: until its port refuses connections from the peer, so that
        the next run's server finds it free. In a tenant the relay's listener for a static
        server outlives it for a moment (until the relay sees the server's listener go);
        nginx started with GuestLib then found the port taken and the run measured 0."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and netns.tcp_accepts(PEER_NS, place.addr, port, 0.2):
            time.sleep(0.05)

    # -- setup and teardown ----------------------------------------------------------------
    def setup(self) -> None:
        self.status = api.ping() or {}
        if not self.status:
            self.say("the daemon is not running: starting it (built-in config); it is stopped at the end")
            self.started_daemon = True  # even if `up` is interrupted half-way: `down` cleans up
            r = subprocess.run(
                [sys.executable, "-m", "netkernel", "up"], capture_output=True, text=True, timeout=120
            )
            if r.returncode != 0:
                raise BenchError(f"`netkernel up` failed ({r.returncode}):\n{r.stdout}{r.stderr}")
            self.status = api.ping() or {}
            if not self.status:
                raise BenchError("the daemon started but does not answer")
        else:
            self.say(f"using the running daemon (pid {self.status.get('pid')})")
        nsms = self.status.get("nsms") or []
        if nsms:
            nsm_v4 = ipaddress.ip_address(str(nsms[0]["ipv4"]).split("/")[0])
            if nsm_v4 not in FABRIC_V4:
                raise BenchError(
                    f"the daemon's subnet is not the default {FABRIC_V4} (NSM "
                    f"{nsms[0]['name']} has {nsm_v4}); the bench needs the default "
                    "[network] addresses for its peer namespaces"
                )
        if self.status.get("engine_pid"):
            self.engine_pid = int(self.status["engine_pid"])
        self._remove_leftovers()
        for ns, v4, v6 in ((PEER_NS, PEER_V4, PEER_V6), (NATIVE_NS, NATIVE_V4, NATIVE_V6)):
            self._attach_ns(ns, v4, v6)
        # The load generator: wrk closes a `Connection: close` connection as soon as it has
        # the response, for a few per cent of them before the server's FIN arrives, so the
        # peer collects TIME_WAIT sockets (a few hundred a second). Once they fill its even ephemeral
        # ports (~14k of 28k) every connect() scans the port range and wrk becomes
        # CPU-bound in the kernel (measured: 12k -> 300 req/s for whichever side runs then).
        # Reusing TIME_WAIT ports for outgoing connections is the usual load-generator
        # setting; it touches only the peer, never the stacks being compared.
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1", netns=PEER_NS)
        self.made_tenant = True  # set first: an interrupted create may still have happened
        reply = api.call("tenant-create", name=TENANT)
        t = reply["tenant"]
        self.tenant = Place("netkernel", str(t["ipv4"]), tenant=TENANT)
        self.tenant_netns = str(t["netns"])
        self.places = {"native": self.native, "netkernel": self.tenant}
        self.say(
            f"peer {PEER_NS} {PEER_V4}, native {NATIVE_NS} {NATIVE_V4}, tenant {TENANT} "
            f"{t['ipv4']} (NSM {t['nsm']}); all on bridge {BRIDGE}"
        )
        if any(c.name == STATIC for c in self.opts.configs):
            self.places[STATIC] = Place(STATIC, self.tenant.addr, tenant=TENANT, guestlib=False)
        if any(c.name == LWIP for c in self.opts.configs):
            self.places[LWIP] = self._setup_lwip()
        for c in self.opts.configs:
            if c.host_ns is not None:
                self.places[c.name] = self._setup_usermode(c)
                self.say(
                    f"{c.name}: sandbox {c.netns} behind {c.name} in {c.host_ns} "
                    f"{c.host_v4}, MTU {c.mtu}; started afresh for each run"
                )

    def _setup_lwip(self) -> Place:
        """An lwIP NSM of our own and a tenant on it."""
        try:
            lwip_binary()
        except NetKernelError as e:
            raise BenchError(f"{LWIP}: {e} (or leave it out: --configs none)") from None
        self.made_lwip = True  # set first: an interrupted create may still have happened
        api.call("nsm-add", name=LWIP_NSM, kind="lwip")
        t = api.call("tenant-create", name=LWIP_TENANT, nsm=LWIP_NSM)["tenant"]
        self.say(f"{LWIP}: tenant {LWIP_TENANT} {t['ipv4']} on lwIP NSM {LWIP_NSM}")
        return Place(LWIP, str(t["ipv4"]), tenant=LWIP_TENANT)

    def _restart_usermode(self, c: Configuration, whole: bool) -> Place:
        """A new pasta or slirp4netns process with a new sandbox, for every run: slirp4netns
        slows down by an order of magnitude after tens of thousands of connections
        (measured: nginx `Connection: close` 7,112 req/s in a first 5-s run, 347 in the
        second against the same process) and, later, resets connections; that must be
        charged neither to the next run nor to the next workload. whole: the host namespace
        too (between workloads), and the peer forgets its old MAC address."""
        assert c.host_ns is not None and c.netns is not None
        p = self.usermode.pop(c.name, None)
        if p is not None:
            self.stop(p)
        gone = [c.netns] + ([c.host_ns] if whole else [])
        self._del_namespaces([n for n in gone if n in self.made_ns])
        self.made_ns = [n for n in self.made_ns if n not in gone]
        if whole:
            subprocess.run(["ip", "-n", PEER_NS, "neigh", "flush", "to", c.host_v4], capture_output=True)
        self.places[c.name] = self._setup_usermode(c, fresh=whole)
        return self.places[c.name]

    def _setup_usermode(self, c: Configuration, fresh: bool = True) -> Place:
        """A sandbox namespace served by pasta or slirp4netns, which run in a host namespace
        of ours: their sockets reach the peer over the bridge and nothing else (no default
        route). nginx's and redis-server's ports are forwarded into the sandbox."""
        assert c.host_ns is not None and c.netns is not None
        sandbox = c.netns
        if fresh:
            self._attach_ns(c.host_ns, c.host_v4, c.host_v6)
        self.made_ns.append(sandbox)
        netns.netns_add(sandbox)
        netns.ip("link", "set", "lo", "up", netns=sandbox)
        host = Place(f"{c.name} host", c.host_v4, netns=c.host_ns)
        log = f"{c.name}.log"
        if c.name == "pasta":
            # As root pasta would switch to nobody, who may not join our namespace.
            p = self.spawn(
                host,
                [
                    "pasta",
                    "--runas",
                    "0",
                    "-f",
                    "-q",
                    "--config-net",
                    "-4",
                    "-m",
                    str(c.mtu),
                    "-i",
                    "eth0",
                    "-g",
                    PASTA_GW,
                    "-t",
                    ",".join(map(str, USERMODE_PORTS)),
                    "-u",
                    "none",
                    "-T",
                    "none",
                    "-U",
                    "none",
                    "--netns",
                    sandbox,
                ],
                log,
            )
            place = Place(c.name, c.host_v4, netns=sandbox)
            self._wait_sandbox(sandbox, c.host_v4, p, place, log)
        else:
            api_sock = self.tmp / f"{c.name}.sock"
            api_sock.unlink(missing_ok=True)
            p = self.spawn(
                host,
                [
                    "slirp4netns",
                    "--configure",
                    f"--mtu={c.mtu}",
                    "--disable-host-loopback",
                    "--api-socket",
                    str(api_sock),
                    "--netns-type=path",
                    f"/run/netns/{sandbox}",
                    "tap0",
                ],
                log,
            )
            place = Place(c.name, c.host_v4, netns=sandbox, listen=SLIRP_GUEST_V4)
            self._wait_sandbox(sandbox, SLIRP_GUEST_V4, p, place, log)
            deadline = time.monotonic() + 10
            while not api_sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # created after the tap is configured
            for port in USERMODE_PORTS:
                self._slirp_forward(api_sock, c.host_v4, port, place)
        self.usermode[c.name] = p
        return place

    def _wait_sandbox(
        self, sandbox: str, addr: str, p: subprocess.Popen[bytes], place: Place, log: str, timeout: float = 20
    ) -> None:
        def configured() -> bool:
            r = subprocess.run(
                ["ip", "-n", sandbox, "-4", "-o", "addr", "show"], capture_output=True, text=True
            )
            return f" {addr}/" in r.stdout

        if not self._until(configured, p, place, place.name, log, timeout):
            raise BenchError(
                f"{place.name}: the sandbox has no address {addr} after {timeout:.0f}s:\n"
                f"{tail(self.log_text(log))}"
            )

    def _slirp_forward(self, api_sock: Path, host_addr: str, port: int, place: Place) -> None:
        req = {
            "execute": "add_hostfwd",
            "arguments": {"proto": "tcp", "host_addr": host_addr, "host_port": port, "guest_port": port},
        }
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(api_sock))
                s.sendall(json.dumps(req).encode())
                reply = json.loads(s.recv(4096) or b"{}")
        except (OSError, ValueError) as e:
            raise BenchError(f"{place.name}: forwarding port {port}: {e}") from None
        if "return" not in reply:
            raise BenchError(f"{place.name}: forwarding port {port}: {reply}")

    def _attach_ns(self, ns: str, v4: str, v6: str) -> None:
        """Like tests/conftest.py's peer_ns: a veth from the namespace to nk0."""
        self.made_ns.append(ns)
        netns.netns_add(ns)
        # Root-side veth named like the namespace (<= 15 bytes), the inner end is eth0, with a
        # MAC address made from its IPv4 address: the same namespace made again by the next
        # run keeps its MAC, so the NSMs' neighbour caches (reachable for ~30 s) stay right.
        # (A new random one made back-to-back runs' connects time out while they re-probe.)
        mac = "02:4e:62:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(v4).packed[1:])
        netns.ip("link", "add", ns, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", ns)
        netns.ip("link", "set", ns, "master", BRIDGE, "up")
        netns.sysctl("net.ipv6.conf.eth0.accept_dad", "0", netns=ns)
        netns.addr_add("eth0", f"{v4}/{PREFIX_V4}", netns=ns)
        netns.addr_add("eth0", f"{v6}/{PREFIX_V6}", netns=ns)  # nodad
        netns.ip("link", "set", "eth0", "up", netns=ns)

    def _remove_leftovers(self) -> None:
        """An aborted earlier run (kill -9) may have left our namespaces or tenant."""
        ours = [PEER_NS, NATIVE_NS, NOISY_NS]
        for c in CONFIGS:
            if c.host_ns is not None:
                ours += [c.host_ns, c.netns or ""]
        stale = [n for n in netns.netns_list() if n in ours]
        if stale:
            self.say(f"removing leftovers of an earlier run: {', '.join(stale)}")
            self._del_namespaces(stale)
        for link in ours:
            netns.link_del(link)
        stale_mux = [n for n in netns.netns_list() if n.startswith(MUX_NS)]
        if stale_mux:
            self._del_namespaces(stale_mux)
        for t in api.call("ps").get("tenants", []):
            name = str(t.get("name"))
            if name in (TENANT, NOISY_TENANT, LWIP_TENANT) or name.startswith(MUX_TENANT):
                self.say(f"removing tenant {t['name']} left by an earlier run")
                api.call("tenant-delete", name=t["name"])
        if any(n.get("name") == LWIP_NSM for n in api.call("nsm-list").get("nsms", [])):
            self.say(f"removing NSM {LWIP_NSM} left by an earlier run")
            api.call("nsm-remove", name=LWIP_NSM)

    @staticmethod
    def _del_namespaces(names: list[str]) -> None:
        netns.kill_netns_processes(names)
        for n in names:
            netns.netns_del(n)
            netns.link_del(n)

    def cleanup(self) -> list[str]:
        """Undo everything; never raises. Returns what went wrong (for a warning)."""
        problems: list[str] = []
        for p in list(self.procs):
            try:
                self.stop(p, timeout=5)
            except Exception as e:  # keep cleaning
                problems.append(f"stopping pid {p.pid}: {e}")
        tenants = [
            (self.made_tenant, TENANT),
            (self.made_noisy_tenant, NOISY_TENANT),
            (self.colo_server is not None, COLO_TENANT),
            (self.made_lwip, LWIP_TENANT),
        ]
        tenants += [(True, name) for name in self.mux_tenants]
        for made, name in tenants:
            if not made:
                continue
            try:
                if any(t.get("name") == name for t in api.call("ps").get("tenants", [])):
                    api.call("tenant-delete", name=name)
            except NetKernelError as e:
                if api.ping() is not None:  # a daemon that died took the tenant with it
                    problems.append(f"deleting tenant {name}: {e}")
        if self.made_lwip:
            try:
                if any(n.get("name") == LWIP_NSM for n in api.call("nsm-list").get("nsms", [])):
                    api.call("nsm-remove", name=LWIP_NSM)
            except NetKernelError as e:
                if api.ping() is not None:
                    problems.append(f"removing NSM {LWIP_NSM}: {e}")
        try:
            self._del_namespaces(list(self.made_ns))
        except Exception as e:
            problems.append(f"removing namespaces: {e}")
        left = [n for n in netns.netns_list() if n in self.made_ns]
        if left:
            problems.append(f"namespaces still present: {', '.join(left)}")
        if self.started_daemon:
            r = subprocess.run(
                [sys.executable, "-m", "netkernel", "down"], capture_output=True, text=True, timeout=120
            )
            if r.returncode != 0:
                problems.append(f"`netkernel down` failed: {r.stdout}{r.stderr}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    # -- places that only some workloads use ------------------------------------------
    def _mux_places(self, n: int) -> dict[str, list[Place]]:
        """n native namespaces and n tenants (made once, for the largest n first asked)."""
        have = len(self.mux_tenants)
        for i in range(have, n):
            ns = f"{MUX_NS}{i}"
            self._attach_ns(ns, f"198.19.254.{i + 1}", f"fd6e:6b00::ff:{0xE0 + i:x}")
            name = f"{MUX_TENANT}{i}"
            self.mux_tenants.append(name)  # first: an interrupted create may still have happened
            api.call("tenant-create", name=name)
        t = {x.get("name"): x for x in api.call("ps").get("tenants", [])}
        return {
            "native": [Place("native", f"198.19.254.{i + 1}", netns=f"{MUX_NS}{i}") for i in range(n)],
            "netkernel": [
                Place(
                    "netkernel", str(t[f"{MUX_TENANT}{i}"]["ipv4"]).split("/")[0], tenant=f"{MUX_TENANT}{i}"
                )
                for i in range(n)
            ],
        }

    def _colo(self, side: Place) -> tuple[Place, Place, str]:
        """(client, server, the address the client dials) for one side: native is one
        namespace over loopback; NetKernel is our tenant dialling a second tenant."""
        if side.tenant is None:
            return self.native, self.native, "127.0.0.1"
        assert self.tenant is not None
        if self.colo_server is None:
            self.colo_server = Place("netkernel", "", tenant=COLO_TENANT)  # first: see cleanup
            t = api.call("tenant-create", name=COLO_TENANT)["tenant"]
            self.colo_server = Place("netkernel", str(t["ipv4"]), tenant=COLO_TENANT)
        return self.tenant, self.colo_server, self.colo_server.addr

    def _noisy_places(self) -> tuple[Place, Place]:
        """Where the floods come from: a namespace of their own (native) and a second tenant."""
        if NOISY_NS not in self.made_ns:
            self._attach_ns(NOISY_NS, NOISY_V4, NOISY_V6)
        self.made_noisy_tenant = True
        t = api.call("tenant-create", name=NOISY_TENANT)["tenant"]
        return Place("native", NOISY_V4, netns=NOISY_NS), Place(
            "netkernel", str(t["ipv4"]), tenant=NOISY_TENANT
        )
